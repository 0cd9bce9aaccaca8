"""The Keras rules for `Trainer(loss=...)`: which loss applies to which output, and its value.

The default `Trainer.compute_terms` unpacks a batch as Keras does, calls the model and hands
`(loss, y, y_pred, sample_weight)` to `loss_terms`, which returns the named terms. The rules:

Batches. `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`; a list is read as a tuple and a dict
is `x` alone (the model's inputs), as in `keras.Model.fit`. A `loss` needs `y`.

Which loss applies to which output. The model's output `y_pred` is one tensor, a list or tuple
of them, or a (nested) dict of them. An output's name is its layer's name for list outputs
(`model.output_names`; `output_<i>` where the model has none), its keys joined by "/" for dict
outputs.

* A callable, on a model with one output: one term, `loss`.
* A Keras loss on a model with several outputs: one term per output, named by the output (Keras's
  `compile(loss="mse")` applies it to each output and sums them: so does the total here).
* Your own callable on a model with several outputs: one term, `loss`, from one call on the
  whole structures (`termwise.losses.mean_over_outputs`).
* A dict on a model with one output: one term per key, each loss on the one output.
* A dict on a model with several outputs: keyed by output names (nested dicts for nested dict
  outputs), one term per key, named by its output; outputs without a key have no term. A Keras
  loss keyed by a dict node of the outputs gives one term per output below it, your callable
  one term on the node's structures. A key naming no output is a `ValueError` listing them.
* A list or tuple, for a model with list or tuple outputs: one loss (or None) per output, the
  terms named by the outputs.
* Keras's `loss_weights` are `Trainer(weights=...)` keyed by these term names.

Targets and sample weights. `y` mirrors the outputs: one tensor for one output; a list or tuple
in output order, or a dict keyed by output names, for list outputs; a dict with the outputs'
keys for dict outputs. `sample_weight` is one tensor for every output, or a list, tuple or dict
like `y` (an output it leaves out, or gives None, is not weighted).

Values. A Keras loss (a `keras.losses.Loss`, or a function of `keras.losses`) gives exactly what
`keras.Model.compile`/`evaluate` reports for it: its `call` on `y_true` and `y_pred` converted to
its dtype (a function's aligned in rank by `squeeze_or_expand_to_same_rank`, as Keras wraps it),
masked by `y_pred`'s and the values' Keras masks, weighted by sample weights aligned as Keras
aligns them, and reduced by its reduction over the global batch: "sum_over_batch_size" and
"mean" divide the weighted sum by the number of values (by the unmasked ones under a mask),
"sum" is the sum, "mean_with_sample_weight" divides by the sum of the weights. The term holds
per-example values [batch] whose Termwise reduction (summed, divided by the global batch size)
is that number, so it is Keras's value on the whole batch on any number of replicas. A loss
that returns one value per batch (`Dice` and `Tversky` with `axis=None`) is a scalar term, a
statistic of each replica's batch: refused on more than one replica. Reductions None and
"none" are refused: Keras reports their mean but trains on their sum.

Your own callable follows the per-example rule: it gets `y_true` and `y_pred` aligned in rank
as Keras aligns them (labels [n] against predictions [n, 1] give [n] values, not an [n, n]
broadcast) and returns per-example values [batch, ...], which the Trainer sums over their other
axes and averages over the batch, or a scalar: a batch statistic, divided by the replicas.

Sample weights are applied once. One weight per example ([batch] or [batch, 1]) is what
`Trainer.sample_weight` returns: the Trainer's reduction weighs every per-example term with it
(`add_loss` terms and metrics too), and `loss_terms` only uses it where a reduction divides by
the weights. Per-output or per-value weights ([batch, T]) weigh the loss terms alone, here,
as Keras's weigh the compiled loss alone.

Example:
    ```python
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    price = keras.layers.Dense(1, name="price")(h)
    kind = keras.layers.Dense(3, name="kind")(h)
    trainer = tw.Trainer(
        keras.Model(inputs, [price, kind]), keras.optimizers.Adam(1e-3),
        loss={"price": keras.losses.MeanSquaredError(),            # Keras's numbers
              "kind": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        weights={"kind": 0.5},                                     # Keras's loss_weights
    )
    trainer.fit((x, {"price": prices, "kind": kinds}))           # loss/price, loss/kind
    ```
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf
from keras.src.backend import get_keras_mask
from keras.src.losses.loss import squeeze_or_expand_to_same_rank
from keras.src.losses.losses import LossFunctionWrapper

__all__ = [
    "REDUCTIONS",
    "check_loss",
    "check_outputs",
    "is_keras_loss",
    "is_per_example",
    "loss_terms",
    "unpack_batch",
]

REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
_NOT_LOSSES = ("get", "serialize", "deserialize")  # the callables of keras.losses that are not


def is_keras_loss(fn) -> bool:
    """True for a `keras.losses.Loss` object and for a loss function exported by `keras.losses`."""
    if isinstance(fn, keras.losses.Loss):
        return True
    name = getattr(fn, "__name__", None)
    return (
        inspect.isfunction(fn)
        and name not in _NOT_LOSSES
        and getattr(keras.losses, name or "", None) is fn
    )


def is_per_example(sample_weight) -> bool:
    """True for weights with one value per example: shape [batch], or [batch, 1, ...]."""
    shape = tf.TensorShape(getattr(sample_weight, "shape", None))
    return shape.rank is not None and shape.rank >= 1 and all(d == 1 for d in shape[1:])


def _describe(fn) -> str:
    if isinstance(fn, keras.losses.Loss):
        return type(fn).__name__
    return getattr(fn, "__name__", type(fn).__name__)


# ----------------------------------------------------------------------------------------------
# Checks of `loss` itself (at construction).


def check_loss(loss):
    """Checks a `loss` argument and returns it (dicts and lists copied, losses as given).

    Raises:
        ValueError: for anything but None, a callable, a non-empty dict (nested for nested
            outputs) or list of callables and Nones, or a Keras loss whose reduction is not one
            of `REDUCTIONS`; the message names the entry and what is allowed.
    """
    if loss is None:
        return None
    if not (callable(loss) or (isinstance(loss, (Mapping, list, tuple)) and loss)):
        raise ValueError(
            f"`loss` ({loss!r}) must be None, a callable (y_true, y_pred) -> per-example values, "
            "a Keras loss, a non-empty dict of them keyed by term or output names, or a list of "
            "them (one per output)."
        )
    return _checked(loss, "`loss`")


def _checked(loss, where: str):
    if callable(loss):
        if isinstance(loss, keras.losses.Loss) and loss.reduction not in REDUCTIONS:
            raise ValueError(
                f"{where} ({_describe(loss)} with reduction={loss.reduction!r}): Termwise "
                f"supports the reductions {', '.join(map(repr, REDUCTIONS))}. With None or "
                "'none' Keras reports the mean of the values but trains on their sum; for "
                "per-example values give a function (y_true, y_pred) -> values instead."
            )
        return loss
    if isinstance(loss, Mapping):
        out = {}
        for key, fn in loss.items():
            inner = f"{where[:-1]}[{key!r}]`"
            if not isinstance(key, str) or not key:
                raise ValueError(f"{inner}: the keys of `loss` must be non-empty strings.")
            if not (fn is None or callable(fn) or (isinstance(fn, Mapping) and fn)):
                raise ValueError(
                    f"{inner} ({fn!r}) must be callable (a Keras loss or a function "
                    "(y_true, y_pred) -> per-example values), None, or a non-empty dict of them."
                )
            out[key] = None if fn is None else _checked(fn, inner)
        if all(fn is None for fn in out.values()):
            raise ValueError(f"{where} ({loss!r}) gives no loss for any output.")
        return out
    out = []
    for i, fn in enumerate(loss):
        if not (fn is None or callable(fn)):
            raise ValueError(
                f"`loss[{i}]` ({fn!r}) must be callable (a Keras loss or a function "
                "(y_true, y_pred) -> per-example values) or None: a list gives one per output."
            )
        out.append(None if fn is None else _checked(fn, f"`loss[{i}]`"))
    if all(fn is None for fn in out):
        raise ValueError(f"`loss` ({loss!r}) gives no loss for any output.")
    return type(loss)(out)


def check_outputs(loss, model: keras.layers.Layer) -> None:
    """Checks `loss` against a built functional model's outputs (no-op for other models).

    Raises:
        ValueError: for a key naming no output, or a list whose length is not the outputs'.
    """
    if loss is None:
        return
    try:
        outputs = model.output
    except (AttributeError, ValueError, RuntimeError):  # subclassed, unbuilt or shared
        return
    _plan(loss, outputs, getattr(model, "output_names", None))


# ----------------------------------------------------------------------------------------------
# Batches and structures.


def unpack_batch(batch, *, needs_targets: bool = False) -> tuple[object, object, object]:
    """Splits a batch into `(x, y, sample_weight)` as Keras does (a list is a tuple).

    Args:
        batch: one batch of the data.
        needs_targets: `y` must be present (a `loss` is given).

    Raises:
        ValueError: for a tuple of more than three elements, or (with `needs_targets`) a batch
            without targets; the message says what was expected and what came.
    """
    if isinstance(batch, list):
        batch = tuple(batch)
    if isinstance(batch, tuple) and len(batch) > 3:
        raise ValueError(
            f"The default compute_terms takes batches x, (x, y) or (x, y, sample_weight), as "
            f"Keras does; got {_describe_value(batch)}. Override compute_terms to read other "
            "batches."
        )
    parts = batch if isinstance(batch, tuple) else (batch,)
    x, y, sample_weight = (*parts, None, None, None)[:3]
    if needs_targets and y is None:
        what = _describe_value(batch)
        if isinstance(batch, Mapping):
            what += " (a dict batch is the model's inputs alone, as in Keras)"
        raise ValueError(
            "`loss` needs targets: the default compute_terms takes batches (x, y) or "
            f"(x, y, sample_weight), got {what}. Give (x, y) batches (dataset.map(lambda d: "
            "(d['x'], d['y']))), or override compute_terms."
        )
    return x, y, sample_weight


def _shape(value) -> str:
    if value is None:
        return "None"
    if keras.tree.is_nested(value):
        return str(keras.tree.map_structure(lambda v: tuple(tf.TensorShape(v.shape)), value))
    return str(tuple(tf.TensorShape(getattr(value, "shape", None))))


def _describe_value(value) -> str:
    """What a batch or a structure is, for messages: its type and shapes."""
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(value)}"
    if isinstance(value, (tuple, list)):
        shapes = ", ".join(_shape(v) for v in value)
        return f"a {type(value).__name__} of {len(value)} elements (shapes {shapes})"
    return f"a tensor of shape {_shape(value)}"


@dataclasses.dataclass(frozen=True)
class _Term:
    name: str
    fn: Callable
    path: tuple | None  # where in y_pred; () the one output; None the whole structures
    where: str  # the `loss` entry, for messages


def _output_paths(y_pred, output_names) -> dict[tuple, str]:
    """Each output's path in `y_pred` and its name."""
    if not keras.tree.is_nested(y_pred):
        return {(): "loss"}
    flat = [path for path, _ in keras.tree.flatten_with_path(y_pred)]
    if isinstance(y_pred, (list, tuple)) and all(len(p) == 1 for p in flat):
        names = list(output_names or ())
        if len(names) != len(flat) or len(set(names)) != len(names):
            names = [f"output_{i}" for i in range(len(flat))]
        return {path: name for path, name in zip(flat, names, strict=True)}
    return {path: "/".join(str(p) for p in path) for path in flat}


def _plan(loss, y_pred, output_names) -> list[_Term]:
    """The terms that `loss` makes for outputs `y_pred` (the rules of the module doc)."""
    outputs = _output_paths(y_pred, output_names)
    single = not keras.tree.is_nested(y_pred)
    listed = ", ".join(repr(n) for n in outputs.values())
    if callable(loss):
        if single:
            return [_Term("loss", loss, (), "`loss`")]
        if not is_keras_loss(loss):
            return [_Term("loss", loss, None, "`loss`")]
        return [_Term(name, loss, path, "`loss`") for path, name in outputs.items()]
    if isinstance(loss, (list, tuple)):
        if single:
            raise ValueError(
                f"`loss` is a {type(loss).__name__} of {len(loss)} losses but the model has one "
                "output: give the loss itself, or a dict of losses keyed by term names."
            )
        if not isinstance(y_pred, (list, tuple)) or len(loss) != len(y_pred):
            raise ValueError(
                f"`loss` is a {type(loss).__name__} of {len(loss)} losses but the model has "
                f"{len(outputs)} outputs ({listed}) in a {type(y_pred).__name__}: give one loss "
                "per output of a list model, or a dict keyed by output names."
            )
        names = list(outputs.values())
        return [_Term(names[i], fn, (i,), f"`loss[{i}]`") for i, fn in enumerate(loss) if fn]
    if single:
        terms = []
        for key, fn in loss.items():
            if isinstance(fn, Mapping):
                raise ValueError(
                    f"`loss[{key!r}]` is a dict, but the model has one output: nested dicts "
                    "are for nested dict outputs."
                )
            if fn is not None:
                terms.append(_Term(key, fn, (), f"`loss[{key!r}]`"))
        return terms
    if isinstance(y_pred, (list, tuple)):
        by_name = {name: path for path, name in outputs.items()}
        terms = []
        for key, fn in loss.items():
            if key not in by_name or isinstance(fn, Mapping):
                raise ValueError(
                    f"`loss` key {key!r} names no output of the model; its outputs are "
                    f"{listed} (a dict loss on a model with several outputs is keyed by them)."
                )
            if fn is not None:
                terms.append(_Term(key, fn, by_name[key], f"`loss[{key!r}]`"))
        return terms
    return _dict_terms(loss, y_pred, (), listed)


def _dict_terms(loss: Mapping, node, path: tuple, listed: str) -> list[_Term]:
    terms = []
    for key, fn in loss.items():
        here = (*path, key)
        name = "/".join(str(p) for p in here)
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(
                f"`loss` key {name!r} names no output of the model; its outputs are {listed} "
                "(nested dicts for nested dict outputs)."
            )
        below = node[key]
        where = "`loss" + "".join(f"[{p!r}]" for p in here) + "`"
        if isinstance(fn, Mapping):
            terms.extend(_dict_terms(fn, below, here, listed))
        elif fn is not None and is_keras_loss(fn) and keras.tree.is_nested(below):
            for sub, _ in keras.tree.flatten_with_path(below):
                full = (*here, *sub)
                terms.append(_Term("/".join(str(p) for p in full), fn, full, where))
        elif fn is not None:
            terms.append(_Term(name, fn, here, where))
    return terms


def _resolve(structure, path: tuple):
    for key in path:
        structure = structure[key]
    return structure


def _lookup(value, path: tuple, y_pred, outputs: dict[tuple, str], what: str, *, shared: bool):
    """The entry of `y` (or of the sample weights) for the output at `path`.

    `shared`: a single tensor applies to every output (sample weights); else it must match.
    """
    listed = ", ".join(repr(n) for n in outputs.values())
    if value is None or not keras.tree.is_nested(value):
        if path == () or shared:
            return value
        raise ValueError(
            f"`{what}` is one tensor of shape {_shape(value)} but the model has "
            f"{len(outputs)} outputs ({listed}): give a list or a dict keyed by output names."
        )
    if path == ():
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return value[0]
        raise ValueError(
            f"The model has one output but `{what}` is {_describe_value(value)}: give one tensor."
        )
    if isinstance(y_pred, (list, tuple)):
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(outputs.values()))
            if unknown:
                raise ValueError(
                    f"`{what}` has keys {unknown} that name no output; the model's outputs are "
                    f"{listed}."
                )
            name = outputs[path]
            if name not in value:
                if shared:
                    return None
                raise ValueError(f"`{what}` has no entry for the output {name!r}.")
            return value[name]
        if isinstance(value, (list, tuple)) and len(value) == len(y_pred):
            return value[path[0]]
        raise ValueError(
            f"`{what}` is {_describe_value(value)} but the model has {len(y_pred)} outputs "
            f"({listed}): give a list of {len(y_pred)} or a dict keyed by output names."
        )
    if not isinstance(value, Mapping):
        raise ValueError(
            f"`{what}` is {_describe_value(value)} but the model's outputs are a dict "
            f"({listed}): give a dict with the same keys."
        )
    unknown = sorted(set(value) - set(y_pred))
    if unknown:
        raise ValueError(
            f"`{what}` has keys {unknown} that name no output; the model's outputs are {listed}."
        )
    node = value
    for key in path:
        if not isinstance(node, (Mapping, list, tuple)) or (
            isinstance(node, Mapping) and key not in node
        ):
            if shared:
                return None
            raise ValueError(
                f"`{what}` has no entry for the output {outputs.get(path, path)!r}; the model's "
                f"outputs are {listed}."
            )
        node = node[key]
    return node


# ----------------------------------------------------------------------------------------------
# Values.


def loss_terms(
    loss,
    y,
    y_pred,
    sample_weight=None,
    *,
    weighted_outside: bool = False,
    output_names: Sequence[str] | None = None,
) -> dict[str, tf.Tensor]:
    """Applies `loss` to the targets `y` and the outputs `y_pred` (the module doc's rules).

    Args:
        loss: what `check_loss` returned.
        y: the targets, structured as the module doc says.
        y_pred: the model's outputs.
        sample_weight: the sample weights (one tensor, or one per output), or None.
        weighted_outside: the Trainer's reduction applies `sample_weight`, a [batch] tensor, to
            every per-example term: the values here are then unweighted (the weights only enter
            reductions that divide by them).
        output_names: the model's output names (`model.output_names`), for list outputs.

    Returns:
        Term name to per-example values [batch, ...] (or a scalar, for a batch statistic).

    Raises:
        ValueError: for targets or sample weights that do not match the outputs, shapes the
            loss cannot take, or sample weights that cannot weigh its values.
    """
    plan = _plan(loss, y_pred, output_names)
    outputs = _output_paths(y_pred, output_names)
    if weighted_outside and not (sample_weight is None or is_per_example(sample_weight)):
        raise ValueError(
            f"Trainer.sample_weight must return one weight per example ([batch]); got shape "
            f"{_shape(sample_weight)}."
        )
    terms = {}
    for term in plan:
        what = f"{term.where} ({_describe(term.fn)})"
        keras_loss = is_keras_loss(term.fn)
        if term.path is None:  # your callable, on all the outputs at once
            if keras.tree.is_nested(sample_weight):
                raise ValueError(
                    f"{what} takes all the outputs at once, so `sample_weight` must be one "
                    "tensor, not one per output."
                )
            y_true, output, weights = y, y_pred, sample_weight
            if isinstance(y_pred, (list, tuple)) and isinstance(y, Mapping):
                y_true = type(y_pred)(
                    _lookup(y, path, y_pred, outputs, "y", shared=False) for path in outputs
                )
        else:
            if term.path:
                what += f" for the output {outputs.get(term.path, term.name)!r}"
            output = _resolve(y_pred, term.path)
            if term.path == () and not keras_loss:
                y_true = y  # your callable on the one output takes `y` as it comes
            else:
                y_true = _lookup(y, term.path, y_pred, outputs, "y", shared=False)
            weights = _lookup(
                sample_weight, term.path, y_pred, outputs, "sample_weight", shared=True
            )
        if keras_loss:
            value = _keras_values(term.fn, y_true, output, weights, weighted_outside, what)
        else:
            value = _own_values(term.fn, y_true, output, weights, weighted_outside, what)
        terms[term.name] = value
    return terms


def _as_keras_loss(fn) -> keras.losses.Loss:
    """A Keras loss object: `fn` itself, or a function wrapped as `compile` wraps it."""
    if isinstance(fn, keras.losses.Loss):
        return fn
    return LossFunctionWrapper(fn, name=fn.__name__)


def _call(fn, y_true, y_pred, what: str):
    try:
        return fn(y_true, y_pred)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{what} cannot be applied to y_true of shape {_shape(y_true)} and y_pred of "
            f"shape {_shape(y_pred)}: {first}"
        ) from error


def _check_batch(y_true, y_pred, what: str) -> None:
    for value in (y_true, y_pred):
        if value is None or keras.tree.is_nested(value):
            return
    a, b = tf.TensorShape(y_true.shape), tf.TensorShape(y_pred.shape)
    if a.rank and b.rank and not a[:1].is_compatible_with(b[:1]):
        raise ValueError(
            f"{what}: y_true of shape {_shape(y_true)} and y_pred of shape {_shape(y_pred)} "
            "have different batch sizes."
        )


def _fits(values: tf.Tensor, weights: tf.Tensor) -> bool:
    """Whether `weights` (aligned) broadcast to `values` without changing their shape."""
    v, w = values.shape, weights.shape
    if v.rank is None or w.rank is None or w.rank != v.rank:
        return w.rank == 0 if w.rank is not None else False
    return all(b in (1, a) or a is None or b is None for a, b in zip(v, w, strict=True)) and (
        v[:1].is_compatible_with(w[:1])
    )


def _weight_error(what: str, weights, values) -> ValueError:
    return ValueError(
        f"{what}: sample weights of shape {_shape(weights)} cannot weigh its values of shape "
        f"{_shape(values)}: give one weight per example ([batch] or [batch, 1]) or one per "
        "value (the values' shape)."
    )


def _global_sum(values: tf.Tensor) -> tf.Tensor:
    """Sums over replicas in a replica context; the local values elsewhere."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _per_example_sum(values: tf.Tensor) -> tf.Tensor:
    if values.shape.rank <= 1:
        return values
    return tf.reduce_sum(values, axis=list(range(1, values.shape.rank)))


def _keras_values(fn, y_true, y_pred, sample_weight, weighted_outside: bool, what: str):
    """Per-example values whose mean over the global batch is Keras's value of the loss."""
    loss = _as_keras_loss(fn)
    _check_batch(y_true, y_pred, what)
    in_mask = get_keras_mask(y_pred)
    y_pred = keras.ops.convert_to_tensor(y_pred, dtype=loss.dtype)
    y_true = keras.ops.convert_to_tensor(y_true, dtype=loss.dtype)
    values = _call(loss.call, y_true, y_pred, what)
    out_mask = get_keras_mask(values)
    masks = [m for m in (in_mask, out_mask) if m is not None]
    mask = None if not masks else masks[0] if len(masks) == 1 else masks[0] & masks[1]
    values = keras.ops.convert_to_tensor(values, dtype=loss.dtype)
    if values.shape.rank is None:
        raise ValueError(f"{what} returns values of unknown rank; Termwise needs a static rank.")
    dtype = values.dtype
    weights = None if sample_weight is None else tf.cast(sample_weight, dtype)
    float_mask = None if mask is None else tf.cast(mask, dtype)
    if values.shape.rank == 0:
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError(
                f"{what} returns one value per batch, not per example: on "
                f"{tf.distribute.get_strategy().num_replicas_in_sync} replicas it would be the "
                "mean of the replicas' values, not the value of the whole batch. Give the loss "
                "an axis that keeps the batch (Dice(axis=...)), outputs of shape [batch, 1] "
                "rather than [batch], or run on one replica."
            )
        if weights is None and float_mask is None:
            return values  # a batch statistic: Keras applies no reduction to it
        values = values * tf.ones_like(float_mask if float_mask is not None else weights)

    # Keras's weights for this output (`reduce_weighted_values`, with the mask unscaled): `full`
    # enters the divisors, `inside` is what is applied here (all of it unless the Trainer's
    # reduction applies the per-example weights).
    if weights is not None and is_per_example(weights):
        if float_mask is not None:
            values, float_mask = squeeze_or_expand_to_same_rank(values, float_mask)
        column = tf.reshape(weights, [-1] + [1] * (values.shape.rank - 1))
        full = column if float_mask is None else column * float_mask
        inside = float_mask if weighted_outside else full
    else:
        full = weights
        if float_mask is not None:
            if full is None:
                full = float_mask
            else:
                aligned_mask, full = squeeze_or_expand_to_same_rank(float_mask, full)
                full = full * aligned_mask
        if full is not None:
            values, full = squeeze_or_expand_to_same_rank(values, full)
            if not _fits(values, full):
                raise _weight_error(what, sample_weight, values)
        inside = full
    weighted = values if inside is None else values * inside
    numerators = _per_example_sum(weighted)

    size = tf.cast(tf.size(values), dtype)
    batch = tf.cast(tf.shape(values)[0], dtype)
    reduction = loss.reduction
    if reduction in ("sum_over_batch_size", "mean") and float_mask is None:
        return numerators * (batch / size)  # each example's mean: the same on every replica
    stats = [batch, size]
    if float_mask is not None:
        stats += [tf.cast(tf.size(mask), dtype), tf.reduce_sum(tf.cast(mask, dtype))]
    else:
        stats += [tf.zeros([], dtype), tf.zeros([], dtype)]
    stats.append(tf.zeros([], dtype) if full is None else tf.reduce_sum(full))
    batch, size, mask_size, valid, weight_sum = tf.unstack(
        _global_sum(tf.stop_gradient(tf.stack(stats)))
    )
    if reduction == "sum":
        factor = batch
    elif reduction == "mean_with_sample_weight":
        factor = tf.math.divide_no_nan(batch, size if full is None else weight_sum)
    else:  # a masked mean: Keras scales the unmasked values by size(mask) / sum(mask)
        factor = tf.math.divide_no_nan(batch * mask_size, valid * size)
    return numerators * factor


def _align(y_true, y_pred):
    """`y_true` and `y_pred` aligned in rank as Keras aligns them, leaf by leaf."""

    def pair(a, b):
        if a is None or b is None:
            return a, b
        a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
        if a.shape.rank is None or b.shape.rank is None:
            return a, b
        return squeeze_or_expand_to_same_rank(a, b)

    nested = keras.tree.is_nested
    if not nested(y_true) and not nested(y_pred):
        return pair(y_true, y_pred)
    both = (list, tuple)
    if isinstance(y_true, both) and isinstance(y_pred, both) and len(y_true) == len(y_pred):
        if not any(nested(v) for v in (*y_true, *y_pred)):
            pairs = [pair(a, b) for a, b in zip(y_true, y_pred, strict=True)]
            return type(y_true)(a for a, _ in pairs), type(y_pred)(b for _, b in pairs)
    if isinstance(y_true, Mapping) and isinstance(y_pred, Mapping) and set(y_true) == set(y_pred):
        if not any(nested(v) for v in (*y_true.values(), *y_pred.values())):
            pairs = {k: pair(y_true[k], y_pred[k]) for k in y_pred}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return y_true, y_pred


def _own_values(fn, y_true, y_pred, sample_weight, weighted_outside: bool, what: str):
    """A user's loss: per-example values (other axes summed later), or a scalar."""
    _check_batch(y_true, y_pred, what)
    y_true, y_pred = _align(y_true, y_pred)
    values = _call(fn, y_true, y_pred, what)
    try:
        values = tf.convert_to_tensor(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must return a tensor, got {type(values).__name__}.") from error
    if sample_weight is None or weighted_outside:
        return values
    if values.shape.rank == 0:
        raise ValueError(
            f"{what} returns a scalar, which sample weights cannot weigh; return per-example "
            "values [batch, ...]."
        )
    weights = tf.cast(sample_weight, values.dtype)
    if is_per_example(weights):
        return _per_example_sum(values) * tf.reshape(weights, [-1])
    values, weights = squeeze_or_expand_to_same_rank(values, weights)
    if not _fits(values, weights):
        raise _weight_error(what, sample_weight, values)
    return values * weights
