"""Loss terms: recording `add_loss` values, naming them, and reducing them.

Keras 3 sums every `add_loss` value into one anonymous `model.losses` list, and clears that list
at every outermost call, so a discriminator called on real then fake data keeps only the second
call's losses. Termwise instead records each value at the moment a layer adds it:

* `LossRecorder` is a context manager. While one is active on a thread, every
  `keras.layers.Layer.add_loss(value)` on that thread is also recorded, with the layer and the
  call of that layer that added it. Recording per thread is what
  `tf.distribute.MirroredStrategy` needs: its replicas trace on their own threads but share
  each layer's `_losses` list.
* `LossRecorder.terms()` names the values (the rules below) and sums each name's values over the
  calls of the step, since `add_loss` means "add this".
* `regularization_loss(variables)` is the one `regularization` term: `sum(v.regularizer(v))`
  over the variables that have a regularizer, as Keras computes it.
* `Naming` holds a Trainer's decisions across its phases and its two modes (training and
  evaluation): which names are qualified by their phase, and the checks below.
* `reduce_terms` turns each term into this replica's share of the global value:
  a per-example term (rank >= 1, leading axis the batch) is summed over its other axes, sample
  weighted, summed and divided by the global batch size; a scalar term is divided by the number
  of replicas. Summing the shares over replicas gives the same number on 1 or N replicas. A
  term of rank >= 1 whose leading dimension is not the batch size (a [features] vector) is a
  `ValueError` naming the term, its shape and the batch size, not a mean over the wrong axis.

Naming rules. A term's name is the same in `fit` and `evaluate`, in the logs and TensorBoard tags
(`loss/<name>`), in checkpoints (a balancer's state is ordered by its phase's term names) and in
the keys of `weights`:

1. A term returned by `compute_terms` is named by its key.
2. A value a layer adds is named by the layer, `<layer>`, and by the name the layer gives it:
   `add_term(layer, "smoothness", value)` or `self.add_loss({"smoothness": value})` adds the
   term `<layer>/smoothness`. Values the layer does not name are named by position: `<layer>`
   for a layer that adds one per call, `<layer>/0`, `<layer>/1`, ... for one that adds several.
   Positional names depend on how many values the layer adds, so a layer that adds unnamed
   values both in training and in evaluation must add as many in both; otherwise the Trainer
   raises a `ValueError` naming the layer (in `build`, or when `fit` or `evaluate` traces its
   step having seen the other mode). Name such values with `add_term`.
3. `<layer>` is the layer's name when no other layer of the models has that name. Where the
   name repeats across nested sub-models, it is the layer's path through them: the sub-models'
   names below the outermost model, joined by "/" (`enc_a/kl`, `enc_b/kl` for two encoders,
   built by one function, that each hold a layer `kl`). Whether a name repeats is read from the
   models' structure, not from which layers added values in a step, so it does not change
   between steps or modes. A layer object used in several places is one layer and one term
   (named by its first path, depth first). Two distinct layers with the same name and the same
   path (possible only across the models of a dict) are a `ValueError`.
4. The weight-regularizer losses of a phase's variables form the one term `regularization`.
5. With several phases, a name that occurs in more than one phase (in training or in evaluation)
   is qualified by its phase wherever it occurs, `<phase>/<name>`: two models that both carry
   weight regularizers give `discriminator/regularization` and `generator/regularization`.
   Names that occur in one phase stay plain. A `weights` key is a term's name, or the bare name
   of qualified terms, which then weighs that term in every phase where it occurs (a qualified
   key takes precedence over the bare one).

Two terms of one phase with the same name, or a name that is not a non-empty string, are a
`ValueError` listing the known term names.

The recorder wraps `Layer.add_loss` and `Layer.__call__` once per process (`__call__` to tell
one call of a shared layer from the next, which Keras's call context, kept for the outermost
call only, cannot). The wrappers record only while a recorder is active on the calling thread,
and never during Keras's symbolic calls (building a functional model); otherwise they just call
Keras's own methods.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import keras
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

REGULARIZATION = "regularization"
ASSERTION_PREFIX = "termwise:"  # starts the message of every graph-time check of terms

_active = threading.local()
_install_lock = threading.Lock()

# Python that runs while a step is traced (naming, checks, reduction) and that has no control
# flow on tensors: autograph has nothing to convert in it, and converting it cost about a
# second per process. (Not for functions that call user code, which autograph must convert.)
_trace_time = tf.autograph.experimental.do_not_convert


def _install_hooks() -> None:
    """Wraps `keras.layers.Layer.add_loss` so that active recorders see every value, and
    `Layer.__call__` so that they tell one call of a layer from the next."""
    with _install_lock:
        original = keras.layers.Layer.add_loss
        if getattr(original, "_termwise_recording", False):
            return
        original_call = keras.layers.Layer.__call__

        @functools.wraps(original)
        def add_loss(layer, loss):
            original(layer, loss)
            recorder = getattr(_active, "recorder", None)
            # A symbolic call (building a functional model, shape inference) adds values from a
            # scratch graph that no step can use: they are not losses of any batch.
            if recorder is not None and not in_symbolic_scope():
                recorder.record(layer, loss)

        @functools.wraps(original_call)
        def __call__(layer, *args, **kwargs):  # noqa: N807
            recorder = getattr(_active, "recorder", None)
            if recorder is None:
                return original_call(layer, *args, **kwargs)
            # A layer called twice in one model call (a shared encoder) adds its values once
            # per call of its own; Keras's call context only marks the outermost call.
            outer = recorder._open_calls.get(id(layer))
            recorder._open_calls[id(layer)] = object()
            try:
                return original_call(layer, *args, **kwargs)
            finally:
                if outer is None:
                    recorder._open_calls.pop(id(layer), None)
                else:
                    recorder._open_calls[id(layer)] = outer

        add_loss._termwise_recording = True
        keras.layers.Layer.add_loss = add_loss
        keras.layers.Layer.__call__ = __call__  # `functools.wraps`: autograph leaves it, as Keras


def is_recording() -> bool:
    """True while a `LossRecorder` is active on this thread (a Termwise step is running).

    Penalty layers ask it to tell the Trainer's reduction from Keras's (`losses.add_penalty`).
    """
    return getattr(_active, "recorder", None) is not None


def _check_label(layer: keras.layers.Layer, label) -> None:
    if not isinstance(label, str) or not label:
        raise ValueError(
            f"Layer {layer.name!r} names a loss term {label!r}; a term's name (an `add_term` "
            "name, or a key of the dict given to add_loss) must be a non-empty string."
        )


def add_term(layer: keras.layers.Layer, name: str, value) -> None:
    """Adds `value` with `layer.add_loss` as the loss term `<layer>/<name>`.

    Call it where `add_loss` may be called (in the layer's `call` or `build`). Unnamed `add_loss`
    values are named by their position (`<layer>`, or `<layer>/0`, `<layer>/1`, ...), which
    changes when a layer adds a value only in training; named values keep their names in `fit`
    and `evaluate` alike. `layer.add_loss({"smoothness": v1, "scale": v2})` names them the same
    way. Keras sees an ordinary `add_loss` value (`model.losses`, `keras.Model.fit`).

    Example:
        ```python
        class TwoPenalties(keras.layers.Layer):
            def call(self, x, training=False):
                if training:
                    losses.add_term(self, "smoothness", smoothness(x))      # twopen/smoothness
                losses.add_term(self, "scale", tf.reduce_sum(x**2, axis=-1))  # twopen/scale
                return x

        TwoPenalties(name="twopen")
        ```

    `<layer>` follows the naming rules of `termwise.trainer.terms`: the layer's name, or its
    path through nested sub-models where that name repeats (`enc_a/kl/scale`). The Trainer
    weighs the term by `weights["twopen/smoothness"]`, logs it as `loss/twopen/smoothness`, and
    reduces it like any term: a [batch, ...] value is per example, a scalar a batch statistic.

    Args:
        layer: the layer that adds the value (usually `self`).
        name: the term's name below the layer's: a non-empty string.
        value: a float tensor, per example ([batch, ...]) or a scalar.

    Raises:
        ValueError: if `layer` is not a Keras layer or `name` is not a non-empty string.
    """
    if not isinstance(layer, keras.layers.Layer):
        raise ValueError(f"add_term `layer` ({layer!r}) must be a keras.layers.Layer.")
    _check_label(layer, name)
    layer.add_loss({name: value})


@dataclasses.dataclass(frozen=True, eq=False)
class _Record:
    layer: keras.layers.Layer
    call: object  # Keras's CallContext of the outermost call (None outside any call)
    token: object  # this call of `layer` (None when it adds a value outside its own call)
    label: str | None  # the name the layer gave the value; None for a positional value
    value: tf.Tensor


class _LayerPaths:
    """Each layer under some root layers, with its path of names below its root.

    Roots are indexed in order, each depth first; a layer reached again (shared, or a root that
    is a sub-model of an earlier root) keeps its first path.
    """

    def __init__(self, roots: Iterable[keras.layers.Layer]):
        self._paths: dict[int, tuple[str, ...]] = {}
        self._names: collections.Counter[str] = collections.Counter()
        for root in roots:
            self.add_root(root)

    def add_root(self, root: keras.layers.Layer) -> None:
        if id(root) in self._paths:
            return
        self._paths[id(root)] = (root.name,)
        self._names[root.name] += 1
        self._visit(root, ())

    def _visit(self, layer: keras.layers.Layer, path: tuple[str, ...]) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in self._paths:
                continue
            child_path = (*path, child.name)
            self._paths[id(child)] = child_path
            self._names[child.name] += 1
            self._visit(child, child_path)

    def name(self, layer: keras.layers.Layer) -> str:
        """The layer's name, or its path where another layer has the same name."""
        self.add_root(layer)  # a layer under no root is a root
        if self._names[layer.name] == 1:
            return layer.name
        return "/".join(self._paths[id(layer)])


def positional_names(layer_name: str, count: int) -> list[str]:
    """The names of `count` unnamed values added by a layer (per call)."""
    return [layer_name] if count == 1 else [f"{layer_name}/{i}" for i in range(count)]


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
        self._records: list[_Record] = []
        self._open_calls: dict[int, object] = {}  # layer -> a token of its running call
        self._outer: LossRecorder | None = None

    def __enter__(self) -> LossRecorder:
        _install_hooks()
        self._outer = getattr(_active, "recorder", None)
        _active.recorder = self
        return self

    def __exit__(self, *exc_info) -> None:
        _active.recorder = self._outer

    def record(self, layer: keras.layers.Layer, loss) -> None:
        """Records the values `layer` added in its current outermost call.

        Raises:
            ValueError: for a dict whose keys are not non-empty strings or whose values are not
                single tensors.
        """
        call = global_state.get_global_attribute("current_call_ctx")
        token = self._open_calls.get(id(layer))
        if isinstance(loss, Mapping):
            for label, value in loss.items():
                _check_label(layer, label)
                if isinstance(value, (Mapping, list, tuple)):
                    raise ValueError(
                        f"Layer {layer.name!r} adds the loss term {label!r} as a "
                        f"{type(value).__name__}; give add_loss one tensor per name."
                    )
                self._records.append(_Record(layer, call, token, label, value))
            return
        for value in tf.nest.flatten(loss):
            self._records.append(_Record(layer, call, token, None, value))

    @_trace_time
    def terms(self, roots: Iterable[keras.layers.Layer] = ()) -> dict[str, tf.Tensor]:
        """Returns the recorded values, named by the module's rules and summed over calls.

        Args:
            roots: the models whose structure decides where a layer's name repeats (rule 3);
                the outermost layers of the recorded calls are added after them.

        Raises:
            ValueError: if two distinct layers get one name.
        """
        return self._named(roots)[0]

    @_trace_time
    def positional_counts(self, roots: Iterable[keras.layers.Layer] = ()) -> dict[str, int]:
        """How many unnamed values each layer added per call, by the layer's name (rule 3)."""
        return self._named(roots)[1]

    def _named(self, roots) -> tuple[dict[str, tf.Tensor], dict[str, int]]:
        paths = _LayerPaths(roots)
        for record in self._records:
            if record.call is not None:
                paths.add_root(record.call.entry_layer)
        layers: dict[int, keras.layers.Layer] = {}
        groups: dict[int, dict[int | str, list[tf.Tensor]]] = {}  # layer -> key -> values
        position: dict[int, tuple[object, int]] = {}  # layer -> (its last call, next index)
        for record in self._records:
            key = id(record.layer)
            layers[key] = record.layer
            group = groups.setdefault(key, {})
            if record.label is None:
                last_call, index = position.get(key, (None, 0))
                if record.token is None or record.token is not last_call:
                    index = 0
                position[key] = (record.token, index + 1)
                group.setdefault(index, []).append(record.value)
            else:
                group.setdefault(record.label, []).append(record.value)
        terms: dict[str, tf.Tensor] = {}
        owners: dict[str, keras.layers.Layer] = {}
        counts: dict[str, int] = {}
        for key, group in groups.items():
            layer = layers[key]
            prefix = paths.name(layer)
            count = sum(isinstance(k, int) for k in group)
            if count:
                counts[prefix] = count
            unnamed = positional_names(prefix, count)
            for label, values in group.items():
                name = unnamed[label] if isinstance(label, int) else f"{prefix}/{label}"
                if name in owners:
                    if owners[name] is layer:
                        raise ValueError(
                            f"Layer {prefix!r} adds two loss terms named {name!r}: a named "
                            "value and an unnamed one; name every value with add_term."
                        )
                    raise ValueError(
                        f"Two layers add losses under the name {name!r}: distinct layers with "
                        "the same name and the same path through the models; rename one of "
                        f"them (known term names: {sorted(terms)})."
                    )
                owners[name] = layer
                terms[name] = values[0] if len(values) == 1 else tf.add_n(values)
        return terms, counts


def regularization_loss(variables) -> tf.Tensor | None:
    """Sum of `v.regularizer(v)` over the variables that carry a weight regularizer.

    Returns:
        The scalar sum, or None when no variable has a regularizer.
    """
    values = [v.regularizer(v) for v in variables if getattr(v, "regularizer", None) is not None]
    if not values:
        return None
    return tf.add_n([tf.cast(v, tf.float32) for v in values])


@_trace_time
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


class Naming:
    """A Trainer's term names across its phases and its two modes (training and evaluation).

    The step records the names each phase's terms get from `LossRecorder.terms` and
    `compute_terms` when it traces them (`record`), and asks for their final names (`final`):
    the same names, qualified by the phase (rule 5 of the module doc) where they occur in
    several phases. The step must record every phase in both modes before it hands out a name
    (`missing` says which are left), since a later phase may share a name with an earlier one.

    Args:
        phases: the phase names, in their run order.
    """

    def __init__(self, phases: Sequence[str]):
        self.phases = tuple(phases)
        self._names: dict[tuple[str, bool], dict[str, None]] = {}  # ordered sets
        self._counts: dict[tuple[str, bool], dict[str, int]] = {}
        self._given: dict[tuple[str, str], str] = {}  # (phase, name) -> its final name

    @_trace_time
    def missing(self) -> list[tuple[str, bool]]:
        """With several phases, the (phase, training) pairs not recorded yet; else []."""
        if len(self.phases) < 2:
            return []
        return [(p, t) for p in self.phases for t in (True, False) if (p, t) not in self._names]

    @_trace_time
    def record(
        self, phase: str, training: bool, names: Iterable[str], counts: Mapping[str, int]
    ) -> None:
        """Records one phase's term names in one mode, and its layers' unnamed value counts.

        Raises:
            ValueError: if a layer adds a different number of unnamed values in training and in
                evaluation (their positional names would differ between `fit` and `evaluate`).
        """
        self._names.setdefault((phase, training), {}).update(dict.fromkeys(names))
        self._counts[(phase, training)] = dict(counts)
        other = self._counts.get((phase, not training), {})
        for layer, count in counts.items():
            if layer in other and other[layer] != count:
                in_training, in_evaluation = (count, other[layer])[:: 1 if training else -1]
                raise ValueError(
                    f"Layer {layer!r} adds {in_training} unnamed add_loss value(s) per call in "
                    f"training but {in_evaluation} in evaluation (phase {phase!r}), so its terms "
                    f"would be {positional_names(layer, in_training)} in fit and "
                    f"{positional_names(layer, in_evaluation)} in evaluate. Name each value "
                    "in the layer's call: termwise.losses.add_term(self, 'name', value), or "
                    "self.add_loss({'name': value})."
                )

    def _shared(self) -> set[str]:
        """Names that occur in more than one phase."""
        phases: dict[str, set[str]] = {}
        for (phase, _), names in self._names.items():
            for name in names:
                phases.setdefault(name, set()).add(phase)
        return {name for name, where in phases.items() if len(where) > 1}

    def _finals(self, shared: set[str]) -> dict[tuple[str, str], str]:
        finals = {}
        for (phase, _), names in self._names.items():
            for name in names:
                finals[(phase, name)] = f"{phase}/{name}" if name in shared else name
        return finals

    @_trace_time
    def final(self, phase: str, names: Iterable[str]) -> dict[str, str]:
        """Maps each of a phase's recorded names to its final name.

        Raises:
            ValueError: if a qualified name equals another term's, or a name handed out
                earlier would now change (a later trace found it in another phase).
        """
        finals = self._finals(self._shared())
        owners: dict[str, tuple[str, str]] = {}
        for key, final in finals.items():
            if final in owners and owners[final][0] != key[0]:
                (p1, n1), (p2, n2) = owners[final], key
                raise ValueError(
                    f"Term {n1!r} of phase {p1!r} and term {n2!r} of phase {p2!r} would both be "
                    f"named {final!r}; rename one of them (names that occur in several phases "
                    "are qualified by their phase)."
                )
            owners[final] = key
        for key, given in self._given.items():
            if finals[key] != given:
                raise ValueError(
                    f"Term {key[1]!r} of phase {key[0]!r} was traced as {given!r}, but another "
                    f"phase's terms, traced since, make it {finals[key]!r}: a term's name must "
                    "not depend on the batch or the trace."
                )
        out = {name: finals[(phase, name)] for name in names}
        self._given.update({(phase, name): final for name, final in out.items()})
        return out

    @_trace_time
    def known(self) -> list[str]:
        """Every final term name of every phase and mode, sorted."""
        return sorted(set(self._finals(self._shared()).values()))

    @_trace_time
    def weight(self, weights: Mapping[str, object], name: str):
        """The entry of `weights` for the term `name`: its own, else its bare name's; or None."""
        if name in weights:
            return weights[name]
        for (_, bare), final in self._given.items():
            if final == name and final != bare:
                return weights.get(bare)
        return None

    @_trace_time
    def check_weights(self, weights: Mapping[str, object]) -> None:
        """Checks that every key of `weights` names a known term (or qualified terms' bare name).

        Raises:
            ValueError: listing the unknown keys and the known term names.
        """
        finals = self._finals(self._shared())
        accepted = set(finals.values()) | {bare for (_, bare), f in finals.items() if f != bare}
        unknown = sorted(set(weights) - accepted)
        if unknown:
            raise ValueError(
                f"`weights` names terms that do not exist: {unknown}; known term names: "
                f"{self.known()}."
            )


def trace_only(fn: Callable, spec, strategy: tf.distribute.Strategy) -> None:
    """Traces `fn(batch)`, for batches of type `spec`, into a scratch graph that never runs.

    Names are decided when a step is traced, so a trace finds them without running anything: no
    variable, random state or optimizer changes. Inside a trace (the step's, in a replica
    context) the scratch graph inherits that context; outside one, it is traced in
    `strategy`'s scope.

    Args:
        fn: a function of one batch.
        spec: the batch's `tf.TypeSpec` structure (`dataset.element_spec`).
        strategy: the Trainer's strategy.
    """
    function = tf.function(fn)
    if tf.inside_function():
        function.get_concrete_function(spec)
    else:
        with strategy.scope():
            function.get_concrete_function(spec)


@_trace_time
def spec_of(batch):
    """The `tf.TypeSpec` structure of a batch of tensors."""
    return tf.nest.map_structure(tf.type_spec_from_value, batch)


@_trace_time
def num_replicas() -> int:
    """Number of replicas in sync in the current replica (or cross-replica) context."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def _lead_message(kind: str, name: str, shape: tf.TensorShape) -> str:
    return (
        f"{kind} {name!r} of shape {shape.as_list()} does not lead with the batch axis: a term "
        "of rank >= 1 is per example, [batch, ...], and is averaged over the batch. Return a "
        "batch statistic as a scalar."
    )


def lead_error(error: tf.errors.OpError) -> ValueError | None:
    """The `ValueError` that a failed graph-time check of `reduce_terms` stands for.

    `reduce_terms` checks a per-example term's leading dimension in the graph when it is not
    known at trace time; the step then fails with a `tf.errors.InvalidArgumentError` whose
    message holds `ASSERTION_PREFIX`. The Trainer re-raises it as this `ValueError`.

    Returns:
        The error to raise (naming the term, its shape and the batch size), or None when `error`
        is not such a check.
    """
    text = getattr(error, "message", str(error))
    found = re.search(
        re.escape(ASSERTION_PREFIX)
        + r" (.*?)\] \[Condition x == y did not hold.*?\] \[x \(.*?\) = \] \[(-?\d+)\]"
        r" \[y \(.*?\) = \] \[(-?\d+)\]",
        text,
        re.S,
    )
    if found is None:
        return None
    message = found.group(1).replace("\\'", "'")
    return ValueError(
        f"{message} Its leading dimension is {found.group(2)}; the batch has {found.group(3)} "
        "examples."
    )


@_trace_time
def reduce_terms(
    terms: Mapping[str, tf.Tensor],
    sample_weight: tf.Tensor | None = None,
    batch_size: tf.Tensor | int | None = None,
    *,
    kind: str = "Loss term",
) -> dict[str, tf.Tensor]:
    """Reduces each term to this replica's float32 share of its global value.

    For a per-example term ``l`` (rank >= 1, leading axis the batch) with sample weights ``s``,
    on replica ``r`` of ``R`` with local batch ``B_r``::

        share_r = sum_i s_i * sum_{other axes} l_i  /  sum_r B_r

    and for a scalar term ``c``: ``share_r = c / R``. The sum of the shares over replicas is
    the sample-weighted mean over the global batch (resp. the replicas' mean), whatever ``R``.

    With `batch_size`, a term of rank >= 1 whose leading dimension is not the batch size (a
    [features] vector, a [samples, batch] tensor) is an error, not a silently wrong mean: at
    trace time when both sizes are static, otherwise by a graph-time check whose failure (a
    `tf.errors.InvalidArgumentError` whose message holds `ASSERTION_PREFIX`; `lead_error`
    turns it into the `ValueError`) stops the step. XLA (`jit_compile`) drops graph-time
    checks: there only the static check applies.

    Args:
        terms: term name to tensor, as returned by `merge_terms`.
        sample_weight: optional [batch] (or [batch, 1]) weights applied to per-example terms.
        batch_size: this replica's batch size (`data.batch_size_of(batch)`), to check that
            every per-example term leads with it; None checks nothing.
        kind: what the terms are, for messages ("Loss term", "Metric").

    Returns:
        Term name to scalar float32 tensor.

    Raises:
        ValueError: if a per-example term's batch size differs from the sample weights', or
            its leading dimension statically differs from `batch_size`; the message names the
            term, its shape and the batch size.
    """
    replicas = num_replicas()
    reduced: dict[str, tf.Tensor] = {}
    sums: dict[str, tf.Tensor] = {}
    sizes: dict[str, tf.Tensor] = {}
    static_batch = None
    if batch_size is not None:
        batch_size = tf.cast(batch_size, tf.int32)
        static_batch = tf.get_static_value(batch_size)
    if sample_weight is not None:
        sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    for name, value in terms.items():
        value = tf.cast(value, tf.float32)
        if value.shape.rank == 0:
            reduced[name] = value / replicas if replicas > 1 else value
            continue
        if value.shape.rank is None:
            raise ValueError(f"{kind} {name!r} has unknown rank; give it a static rank.")
        if batch_size is not None:
            lead = value.shape[0]
            if lead is not None and static_batch is not None:
                if lead != static_batch:
                    raise ValueError(
                        f"{_lead_message(kind, name, value.shape)} Its leading dimension is "
                        f"{lead}; the batch has {int(static_batch)} examples."
                    )
            else:
                check = tf.debugging.assert_equal(
                    tf.shape(value)[0],
                    batch_size,
                    message=f"{ASSERTION_PREFIX} {_lead_message(kind, name, value.shape)}",
                )
                with tf.control_dependencies([check]):
                    value = tf.identity(value)
        if value.shape.rank > 1:
            value = tf.reduce_sum(value, axis=list(range(1, value.shape.rank)))
        if sample_weight is not None:
            if not value.shape[:1].is_compatible_with(sample_weight.shape[:1]):
                raise ValueError(
                    f"{kind} {name!r} has batch size {value.shape[0]} but the sample "
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
