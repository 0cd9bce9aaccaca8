"""Turning what users pass to `fit` and `evaluate` into a `tf.data.Dataset`.

Accepted: a `tf.data.Dataset` (used as it is: already batched), arrays (sliced along their
first axis and batched), a `keras.utils.PyDataset`, and a Python generator or iterator of
batches (through `tf.data.Dataset.from_generator`, its structure taken from the first batch).
A dataset read through Python (the last two) cannot have its position saved in a checkpoint
(`is_python_fed`).
"""

from __future__ import annotations

import collections.abc
import itertools

import keras
import numpy as np
import tensorflow as tf

from termwise.trainer.errors import first_line

_PYTHON_FED = "_termwise_python_fed"
_HEAD = "_termwise_first_batch"


def _spec_of(batch):
    """The `tf.TensorSpec` structure of a batch, its leading (batch) axis left free."""

    def spec(value):
        tensor = tf.convert_to_tensor(value)
        shape = [None, *tensor.shape[1:]] if tensor.shape.rank else []
        return tf.TensorSpec(shape, tensor.dtype)

    return tf.nest.map_structure(spec, tuple(batch) if isinstance(batch, list) else batch)


def _from_python(make_iterator, first, length: int | None) -> tf.data.Dataset:
    def generator():
        for batch in make_iterator():
            yield tuple(batch) if isinstance(batch, list) else batch

    dataset = tf.data.Dataset.from_generator(generator, output_signature=_spec_of(first))
    if length is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(length))
    setattr(dataset, _PYTHON_FED, "once" if length is None else "repeatable")
    setattr(dataset, _HEAD, tf.nest.map_structure(tf.convert_to_tensor, _spec_like(first)))
    return dataset


def _spec_like(batch):
    return tuple(batch) if isinstance(batch, list) else batch


def is_python_fed(dataset: tf.data.Dataset) -> bool:
    """Whether the dataset reads Python objects (its position cannot be checkpointed)."""
    return bool(getattr(dataset, _PYTHON_FED, False))


def is_read_once(dataset: tf.data.Dataset) -> bool:
    """Whether the dataset is a Python generator's: one pass, never repeated."""
    return getattr(dataset, _PYTHON_FED, None) == "once"


def first_batch(dataset: tf.data.Dataset, name: str):
    """The dataset's first batch (without reading a generator), or a ValueError naming `name`."""
    head = getattr(dataset, _HEAD, None)
    if head is not None:
        return head
    for batch in dataset.take(1):
        return batch
    raise ValueError(f"`{name}` holds no batch: nothing to train on or evaluate.")


def as_dataset(data, *, batch_size: int, shuffle: bool, seed: int | None = None) -> tf.data.Dataset:
    """Returns `data` as a batched `tf.data.Dataset`.

    Args:
        data: a `tf.data.Dataset` (used as it is: already batched), arrays to slice along the
            first axis (an array, or a tuple/list/dict of arrays: `(x, y[, sample_weight])`), a
            `keras.utils.PyDataset`, or a generator (an iterator) of batches.
        batch_size: batch size for arrays.
        shuffle: reshuffle arrays every pass.
        seed: shuffle seed.

    Raises:
        ValueError: for anything else, or arrays whose first dimensions differ.
    """
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, keras.utils.PyDataset):
        length = data.num_batches
        if length == 0:
            raise ValueError("`data` is a PyDataset of 0 batches: nothing to train on.")

        def batches():
            if length is None:
                yield from (data[i] for i in itertools.count())
            else:
                yield from (data[i] for i in range(length))
            data.on_epoch_end()

        return _from_python(batches, data[0], length)
    if isinstance(data, collections.abc.Iterator):
        try:
            head = next(data)
        except StopIteration:
            raise ValueError("`data` is a generator that yields no batch.") from None
        rest = itertools.chain([head], data)  # one pass: a second iteration yields nothing
        return _from_python(lambda: rest, head, None)
    data = keras.tree.lists_to_tuples(data)  # Keras's structures: (x, [ya, yb]) is two targets
    if isinstance(data, (np.ndarray, tf.Tensor)):
        arrays = data
    elif isinstance(data, (tuple, list, dict)) and data:
        arrays = tuple(data) if isinstance(data, list) else data
    else:
        raise ValueError(
            f"`data` must be a tf.data.Dataset or arrays (an array, or a tuple/dict of arrays), "
            f"got {type(data).__name__}."
        )
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in tf.nest.flatten(arrays)}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"The arrays in `data` must share their first (batch) dimension, got lengths "
            f"{sorted(str(n) for n in lengths)}."
        )
    (length,) = lengths
    if length == 0:  # before shuffle, whose buffer of 0 is a TensorFlow error
        raise ValueError("`data` holds no batch (its arrays have no rows): nothing to train on.")
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(length, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size)


def batches_per_pass(dataset: tf.data.Dataset) -> int | None:
    """Number of batches in one pass over `dataset`, or None when unknown or infinite."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


def batch_size_of(batch) -> int | tf.Tensor:
    """The leading dimension of the first tensor of a batch: an int when it is static, else an
    int32 scalar tensor."""
    first = tf.nest.flatten(batch)[0]
    static = first.shape
    if static.rank and static[0] is not None:
        return int(static[0])
    return tf.shape(first)[0]


# ------------------------------------------------------------------------------------------
# The training data's position in checkpoints.
#
# TensorFlow saves an iterator's position in one of two ways. The default ("explicit") state
# holds every buffer of the pipeline (prefetched batches, the shuffle buffer, a half-built
# batch). Measured on TF 2.21, it is not exact: a `shuffle(reshuffle_each_iteration=True) ->
# batch -> prefetch` pipeline saved near the end of a pass restored the next pass in another
# order in 1 to 3 of every 6 runs (the saved state depends on how far the read-ahead had got),
# and `batch -> shuffle -> unbatch -> batch` restored other batches in every run. A "symbolic"
# position (`tf.data.Options.experimental_symbolic_checkpoint`) holds the cursors into the
# sources and recomputes the buffers on restore: exact for both in every run measured, and for
# parallel map, interleave, zip, concatenate, filter, padded_batch and sample_from_datasets.
# It is what the Trainer uses. Its price is more work per element while training (a
# whole-dataset shuffle of 1527 digits: about 1.2 ms more per batch of 64; the prefetch hides
# it where a step takes longer).
# It needs every transformation to support it: `cache` and `group_by_window` do not, and say so
# only at the first save (a scratch iterator read beforehand to find out would move the
# pipeline's shuffle seeds on, and so change the training data's order); the checkpoints are
# then saved without the position, with a warning (`Checkpoints.save`). It does not see the
# state of a random op inside a `map` function (the explicit state refused such a pipeline);
# `position_problem` finds those before the first step.

SYMBOLIC = " [symbolic position]"  # recorded after the batches' structure (run.json "data")


def position_problem(dataset: tf.data.Dataset) -> str | None:
    """Why no checkpoint can hold `dataset`'s position exactly, or None.

    A function with a stateful op (`tf.random.uniform` or `tf.py_function` in a `map`) keeps
    state outside the pipeline that neither kind of saved position holds: serializing the
    dataset's graph with `ExternalStatePolicy.FAIL` says so. A graph that cannot be serialized
    for another reason is left to the first save to report.
    """
    try:
        tf.raw_ops.DatasetToGraphV2(
            input_dataset=dataset._variant_tensor,  # noqa: SLF001 (TensorFlow's own route)
            external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL.value,
            strip_device_assignment=True,
        )
    except tf.errors.FailedPreconditionError as error:
        return first_line(error)
    except tf.errors.OpError:
        pass
    return None


def with_symbolic_position(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with its checkpointed position kept as cursors (recomputed buffers)."""
    options = tf.data.Options()
    options.experimental_symbolic_checkpoint = True
    return dataset.with_options(options)
