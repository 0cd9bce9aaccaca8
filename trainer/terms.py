"""Loss terms: collecting `add_loss` values by layer, naming them, and reducing them.

Keras 3 sums every `add_loss` value into one anonymous `model.losses` list, and clears that list
at every outermost call, so a discriminator called on real then fake data keeps only the second
call's losses. Termwise instead records each value at the moment a layer adds it:

* `LossRecorder` is a context manager. While one is active on a thread, every
  `keras.layers.Layer.add_loss(value)` on that thread is also recorded as `(layer, call, value)`.
  Recording per thread is what `tf.distribute.MirroredStrategy` needs: its replicas trace on
  their own threads but share each layer's `_losses` list.
* `LossRecorder.terms()` names the values: by the layer that added them (Keras layer names are
  unique within a model), `name/0`, `name/1`, ... for a layer that adds several per call, and the
  values of every call in the step summed under one name, since `add_loss` means "add this".
* `regularization_loss(variables)` is the one `regularization` term: `sum(v.regularizer(v))`
  over the variables that have a regularizer, as Keras computes it.
* `reduce_terms` turns each term into this replica's share of the global value:
  a per-example term (rank >= 1, leading axis the batch) is summed over its other axes, sample
  weighted, summed and divided by the global batch size; a scalar term is divided by the number
  of replicas. Summing the shares over replicas gives the same number on 1 or N replicas.

The recorder wraps `Layer.add_loss` once per process; the wrapper records only while a recorder
is active on the calling thread, and never during Keras's symbolic calls (building a functional
model), and otherwise just calls Keras's own method.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping

import keras
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

REGULARIZATION = "regularization"

_active = threading.local()
_install_lock = threading.Lock()


def _install_add_loss_hook() -> None:
    """Wraps `keras.layers.Layer.add_loss` so that active recorders see every value."""
    with _install_lock:
        original = keras.layers.Layer.add_loss
        if getattr(original, "_termwise_recording", False):
            return

        @functools.wraps(original)
        def add_loss(layer, loss):
            original(layer, loss)
            recorder = getattr(_active, "recorder", None)
            # A symbolic call (building a functional model, shape inference) adds values from a
            # scratch graph that no step can use: they are not losses of any batch.
            if recorder is not None and not in_symbolic_scope():
                recorder.record(layer, loss)

        add_loss._termwise_recording = True
        keras.layers.Layer.add_loss = add_loss


def is_recording() -> bool:
    """True while a `LossRecorder` is active on this thread (a Termwise step is running).

    Penalty layers ask it to tell the Trainer's reduction from Keras's (`losses.add_penalty`).
    """
    return getattr(_active, "recorder", None) is not None


class LossRecorder:
    """Records the `add_loss` values added on this thread while it is active.

    Example:
        ```python
        with LossRecorder() as recorder:
            model(x_real)
            model(x_fake)          # Keras clears model.losses here; the recorder does not.
        terms = recorder.terms()   # {"kl": value_real + value_fake}
        ```
    """

    def __init__(self):
        self._records: list[tuple[keras.layers.Layer, object, tf.Tensor]] = []
        self._outer: LossRecorder | None = None

    def __enter__(self) -> LossRecorder:
        _install_add_loss_hook()
        self._outer = getattr(_active, "recorder", None)
        _active.recorder = self
        return self

    def __exit__(self, *exc_info) -> None:
        _active.recorder = self._outer

    def record(self, layer: keras.layers.Layer, loss) -> None:
        """Records the values `layer` added in its current outermost call."""
        call = global_state.get_global_attribute("current_call_ctx")
        for value in tf.nest.flatten(loss):
            self._records.append((layer, call, value))

    def terms(self) -> dict[str, tf.Tensor]:
        """Returns the recorded values named by layer and summed over calls.

        Raises:
            ValueError: if two different layers share a name.
        """
        by_layer: dict[int, list] = {}
        layers: dict[int, keras.layers.Layer] = {}
        for layer, call, value in self._records:
            layers[id(layer)] = layer
            per_call = by_layer.setdefault(id(layer), [])
            if per_call and per_call[-1][0] is call and call is not None:
                per_call[-1][1].append(value)
            else:
                per_call.append((call, [value]))
        terms: dict[str, tf.Tensor] = {}
        owners: dict[str, keras.layers.Layer] = {}
        for key, per_call in by_layer.items():
            layer = layers[key]
            most = max(len(values) for _, values in per_call)
            for index in range(most):
                name = layer.name if most == 1 else f"{layer.name}/{index}"
                if name in owners:
                    raise ValueError(
                        f"Two layers add losses under the name {name!r}; rename one of them "
                        f"(known term names: {sorted(terms)})."
                    )
                values = [values[index] for _, values in per_call if len(values) > index]
                owners[name] = layer
                terms[name] = values[0] if len(values) == 1 else tf.add_n(values)
        return terms


def regularization_loss(variables) -> tf.Tensor | None:
    """Sum of `v.regularizer(v)` over the variables that carry a weight regularizer.

    Returns:
        The scalar sum, or None when no variable has a regularizer.
    """
    values = [v.regularizer(v) for v in variables if getattr(v, "regularizer", None) is not None]
    if not values:
        return None
    return tf.add_n([tf.cast(v, tf.float32) for v in values])


def merge_terms(*sources: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Merges named terms, converting each to a float tensor.

    Raises:
        ValueError: on a name given twice, or a term that is not a floating-point tensor; the
            message lists the known term names.
    """
    merged: dict[str, tf.Tensor] = {}
    for source in sources:
        for name, value in source.items():
            if name in merged:
                known = sorted({*merged, *(n for s in sources for n in s)})
                raise ValueError(
                    f"Two loss terms are named {name!r}. Term names must be unique; "
                    f"known term names: {known}."
                )
            merged[name] = value
    for name, value in merged.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Term names must be non-empty strings, got {name!r}.")
        dtype = getattr(value, "dtype", None)
        if dtype is None:
            try:
                value = tf.convert_to_tensor(value)
            except (TypeError, ValueError):
                value = None
            dtype = getattr(value, "dtype", None)
        if dtype is None or not tf.as_dtype(dtype).is_floating:
            raise ValueError(
                f"Loss term {name!r} must be a floating-point tensor, got {dtype or type(value)}; "
                f"known term names: {sorted(merged)}."
            )
        merged[name] = value
    return merged


def num_replicas() -> int:
    """Number of replicas in sync in the current replica (or cross-replica) context."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def reduce_terms(
    terms: Mapping[str, tf.Tensor], sample_weight: tf.Tensor | None = None
) -> dict[str, tf.Tensor]:
    """Reduces each term to this replica's float32 share of its global value.

    For a per-example term ``l`` (rank >= 1, leading axis the batch) with sample weights ``s``,
    on replica ``r`` of ``R`` with local batch ``B_r``::

        share_r = sum_i s_i * sum_{other axes} l_i  /  sum_r B_r

    and for a scalar term ``c``: ``share_r = c / R``. The sum of the shares over replicas is
    the sample-weighted mean over the global batch (resp. the replicas' mean), whatever ``R``.

    Args:
        terms: term name to tensor, as returned by `merge_terms`.
        sample_weight: optional [batch] (or [batch, 1]) weights applied to per-example terms.

    Returns:
        Term name to scalar float32 tensor.

    Raises:
        ValueError: if a per-example term's batch size differs from the sample weights'.
    """
    replicas = num_replicas()
    reduced: dict[str, tf.Tensor] = {}
    sums: dict[str, tf.Tensor] = {}
    sizes: dict[str, tf.Tensor] = {}
    if sample_weight is not None:
        sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    for name, value in terms.items():
        value = tf.cast(value, tf.float32)
        if value.shape.rank == 0:
            reduced[name] = value / replicas if replicas > 1 else value
            continue
        if value.shape.rank is None:
            raise ValueError(f"Loss term {name!r} has unknown rank; give it a static rank.")
        if value.shape.rank > 1:
            value = tf.reduce_sum(value, axis=list(range(1, value.shape.rank)))
        if sample_weight is not None:
            if not value.shape[:1].is_compatible_with(sample_weight.shape[:1]):
                raise ValueError(
                    f"Loss term {name!r} has batch size {value.shape[0]} but the sample "
                    f"weights have {sample_weight.shape[0]}."
                )
            value = value * sample_weight
        sums[name] = tf.reduce_sum(value)
        sizes[name] = tf.shape(value)[0]
    if sums:
        names = list(sums)
        local = tf.cast(tf.stack([sizes[n] for n in names]), tf.float32)
        if replicas > 1:
            ctx = tf.distribute.get_replica_context()
            local = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
        for i, name in enumerate(names):
            reduced[name] = tf.math.divide_no_nan(sums[name], local[i])
    return {name: reduced[name] for name in terms}
