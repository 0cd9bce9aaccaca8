"""Turning what users pass to `fit` and `evaluate` into a `tf.data.Dataset`."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def as_dataset(data, *, batch_size: int, shuffle: bool, seed: int | None = None) -> tf.data.Dataset:
    """Returns `data` as a batched `tf.data.Dataset`.

    Args:
        data: a `tf.data.Dataset` (used as it is: already batched), or arrays to slice along the
            first axis: an array, or a tuple/list/dict of arrays (`(x, y[, sample_weight])`).
        batch_size: batch size for arrays.
        shuffle: reshuffle arrays every pass.
        seed: shuffle seed.

    Raises:
        ValueError: for anything else, or arrays whose first dimensions differ.
    """
    if isinstance(data, tf.data.Dataset):
        return data
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
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        (length,) = lengths
        dataset = dataset.shuffle(length, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size)


def batches_per_pass(dataset: tf.data.Dataset) -> int | None:
    """Number of batches in one pass over `dataset`, or None when unknown or infinite."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


def batch_size_of(batch) -> tf.Tensor:
    """The leading dimension of the first tensor of a batch (an int32 scalar tensor)."""
    first = tf.nest.flatten(batch)[0]
    return tf.shape(first)[0]
