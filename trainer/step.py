"""What one update does: the Trainer's step, in replica context, and its compiled calls.

One training step, per phase (a phase has a name, an optimizer, its variables and its terms)::

    terms   = compute_terms(batch, training=True[, phase])       # user terms, by key
            + add_loss values recorded during that call          # by the layer that added them
            + {"regularization": sum of weight regularizers}     # if any variable has one
    shares  = reduce_terms(terms, sample_weight)                  # same totals on 1 or N replicas
    total   = sum_t weight_t(step) * share_t                      # weights: floats or schedules
                                                                  #   (x a balancer's weights)
    update  = optimizer.apply(d total / d variables)             # only if every term is finite

On a diagnostic step (every `grad_log_every` steps), and on every step of a phase whose
balancer needs gradients, the gradient is instead taken once per weighted term (trainer/
gradients.py); their Gramian gives `grad_norm/`, `grad_cosine/`, `grad_conflict/` and the
balancer's weights, and the update is their (weighted or mixed) sum: no extra backward pass.

`StepMixin` is the half of `Trainer` that runs inside `tf.function` (Keras 3 splits its
trainers the same way); it reads the Trainer's phases, weights, balancers and counters, and
writes nothing but variables: no files, no Python state a step depends on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
from collections.abc import Mapping

import keras
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.eager import context

from termwise.trainer import data as data_lib
from termwise.trainer import gradients as gradients_lib
from termwise.trainer import terms as terms_lib
from termwise.trainer.options import Phase

GRADIENT_TAGS = ("grad_norm/", "grad_cosine/", "grad_share/", "grad_conflict/")
COSINE_MATRIX = "grad_cosine_matrix"  # a [T, T] output of diagnostic steps, drawn as an image
LAYER_NORMS = "grad_layer_norms"  # a [T, L] output: each weighted term's gradient norm per layer
GRADIENT_VALUES = "grad_values"  # with histogram_every: each weighted term's gradient, flattened
EXAMPLES = "examples"  # per-step logs: the examples the step read
APPLIED = "applied"  # per-step logs: 1 when the step's updates were applied


_TERMWISE = "termwise."  # the modules of Termwise's own code


def user_code(fn):
    """`fn` as a `tf.function` with autograph would run it: converted, with what it calls.

    The compiled calls run the Trainer's own step code unconverted (`autograph=False`: it has
    no control flow on tensors, and converting it cost seconds per process, in the first step
    and again in the first diagnostic step), so the code they call that users write or
    override (`compute_terms`, `sample_weight`, weight schedules, balancers, regularizers) goes
    through this, and a Python `if` or `for` on a tensor in it works as it does under any
    `tf.function`. Outside a trace (`build`'s eager pass) `fn` itself is returned.

    Termwise's own code (the defaults users may override, the balancers, schedules and losses,
    the reference models) has no control flow on tensors and runs unconverted, as Keras's does:
    converting it took 0.1 to 0.4 s of a first step (`_no_autograph_in_termwise`).
    """
    if not tf.inside_function():
        return fn
    if inspect.ismethod(fn):
        function, bound = fn.__func__, fn.__self__
    elif inspect.isfunction(fn):
        function, bound = fn, None
    else:  # a callable object
        function, bound = inspect.getattr_static(type(fn), "__call__", None), fn
    if not inspect.isfunction(function) or (function.__module__ or "").startswith(_TERMWISE):
        return fn
    try:
        converted = tf.autograph.to_graph(function)
    except Exception:  # noqa: BLE001 - as autograph does: what it cannot convert runs as is
        return fn
    return converted if bound is None else functools.partial(converted, bound)


def _apply_update(phase: Phase, grads) -> tf.Tensor:
    """The phase's optimizer update from `grads`; True, as the branch of a `tf.cond`."""
    phase.optimizer.apply(grads, phase.variables)
    return tf.constant(True)


@contextlib.contextmanager
def _without_graph_optimisation():
    """Function calls on this thread, inside the block, skip Grappler (the meta optimizer).

    For the diagnostic function, run once every `grad_log_every` steps: Grappler was half of
    its instantiation's 0.29 s on the VAE (0.23 s on the CNN), which lands in the run's first
    steps, and saved 0.1 ms of its 2 ms step. The options are the thread's own with that one
    change (TensorFlow keeps them per thread, and instantiates a function once per options),
    so every call of it must be made inside this block, on whichever thread.
    """
    ctx = context.context()
    saved = ctx.function_call_options
    config = config_pb2.ConfigProto.FromString(saved.config_proto_serialized)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    ctx.function_call_options = context.FunctionCallOptions(saved.executor_type, config)
    try:
        yield
    finally:
        ctx.function_call_options = saved


def _unoptimised(function):
    """`function`, called inside `_without_graph_optimisation`."""

    @functools.wraps(function)
    def call(*args):
        with _without_graph_optimisation():
            return function(*args)

    return call


def _no_autograph_in_termwise() -> None:
    """Tells autograph not to convert the losses users call from `compute_terms`.

    Autograph converts what converted code calls, unless the callee's module is in its
    conversion rules (TensorFlow, Keras, NumPy are): `termwise.losses` joins them, through
    autograph's own rule list (not a public API: where it is missing, the losses are converted,
    which costs time only). `Trainer.add_metric` is marked `do_not_convert` where it is defined.
    """
    try:
        from tensorflow.python.autograph.core import config
    except ImportError:  # pragma: no cover - another TensorFlow layout: conversion still works
        return
    rule = config.DoNotConvert("termwise.losses")
    if not any(getattr(r, "_prefix", None) == "termwise.losses" for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)


_no_autograph_in_termwise()


class StepMixin:
    """The replica-context step and the compiled functions that run it (see the module doc)."""

    def _phase_terms(self, phase: Phase, batch, training: bool) -> dict[str, tf.Tensor]:
        """Computes, names, checks and reduces one phase's terms (and its metrics)."""
        merged = self._named_terms(phase, batch, training)
        sample_weight = user_code(self.sample_weight)(batch)
        # The leading axis of every per-example term; static when known (checked at trace time).
        batch_size = data_lib.batch_size_of(batch)
        metrics = self._phase_metrics.pop(phase.name, {})
        if metrics:  # logged beside the terms, never summed into the total
            self._phase_metrics[phase.name] = terms_lib.reduce_terms(
                metrics, sample_weight, batch_size, kind="Metric"
            )
        return terms_lib.reduce_terms(merged, sample_weight, batch_size)

    def _recorded_terms(self, phase: Phase, batch, training: bool):
        """One phase's terms, named as in one phase (no phase qualification), not reduced.

        Returns:
            (term name to tensor, the number of unnamed values each `add_loss` layer added per
            call: `terms.LossRecorder.positional_counts`).
        """
        self._metrics = {}
        with terms_lib.LossRecorder() as recorder:
            if self._terms_take_phase:
                user_terms = user_code(self.compute_terms)(batch, training, phase=phase.name)
            else:
                user_terms = user_code(self.compute_terms)(batch, training)
        if not isinstance(user_terms, Mapping):
            raise ValueError(
                f"compute_terms must return a dict of term name to tensor, got "
                f"{type(user_terms).__name__}."
            )
        regularization = user_code(terms_lib.regularization_loss)(phase.variables)
        extra = {} if regularization is None else {terms_lib.REGULARIZATION: regularization}
        roots = list(self._models.values())  # where a layer's name repeats, its path names it
        merged = terms_lib.merge_terms(user_terms, recorder.terms(roots), extra)
        return merged, recorder.positional_counts(roots)

    def _named_terms(self, phase: Phase, batch, training: bool) -> dict[str, tf.Tensor]:
        """One phase's terms under their final names, checked (not reduced); records the names.

        The names follow the rules of `termwise.trainer.terms`. With several phases, every
        phase's names in both modes are found first, by tracing them into a scratch graph that
        never runs (`terms.trace_only`), so that a name two phases share is qualified by its
        phase from the first trace on.
        """
        naming = self._naming
        missing = naming.missing()
        if missing:

            def discover(batch):
                for name, mode in missing:
                    terms, counts = self._recorded_terms(self.phases[name], batch, mode)
                    naming.record(name, mode, terms, counts)

            terms_lib.trace_only(discover, terms_lib.spec_of(batch), self.strategy)
        merged, counts = self._recorded_terms(phase, batch, training)
        naming.record(phase.name, training, merged, counts)
        if not merged:
            raise ValueError(
                f"Phase {phase.name!r} has no loss terms: compute_terms returned none and no "
                "layer called add_loss."
            )
        final = naming.final(phase.name, merged)
        merged = {final[name]: value for name, value in merged.items()}
        if training or phase.name not in self.term_names:  # the names fit sums and logs
            self.term_names[phase.name] = tuple(merged)
        clash = sorted(set(self._metrics) & {*merged, "total"})
        if clash:
            raise ValueError(
                f"add_metric names {clash} are also loss terms (or 'total'); give metrics their "
                f"own names. Known term names: {sorted(merged)}."
            )
        self._phase_metrics[phase.name], self._metrics = self._metrics, {}
        return merged

    def _check_weight_names(self) -> None:
        """Raises if a `weights` key names no term (see `terms.Naming.check_weights`)."""
        self._naming.check_weights(self.weights)

    def _weigh(self, reduced: Mapping[str, tf.Tensor], step: tf.Tensor):
        weights, weighted = {}, {}
        for name, value in reduced.items():
            fn = self._naming.weight(self.weights, name)  # its own key, else its bare name's
            w = tf.constant(1.0) if fn is None else tf.cast(user_code(fn)(step), tf.float32)
            weights[name] = w
            weighted[name] = w * value
        total = tf.add_n(list(weighted.values()))
        return weights, weighted, total

    @staticmethod
    def _reweigh(reduced: Mapping[str, tf.Tensor], weights: Mapping[str, tf.Tensor], factors):
        """Multiplies each term's weight by a balancer's factor (a [T] tensor, in term order)."""
        weights = {n: weights[n] * factors[i] for i, n in enumerate(reduced)}
        weighted = {n: weights[n] * reduced[n] for n in reduced}
        return weights, weighted, tf.add_n(list(weighted.values()))

    def _global_values(self, reduced: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The terms' global values as a [T] tensor, the same on every replica, no gradient."""
        values = tf.stop_gradient(tf.stack(list(reduced.values())))
        if self.strategy.num_replicas_in_sync > 1:
            ctx = tf.distribute.get_replica_context()
            values = ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)
        return values

    def _per_term_gradients(
        self, phase, tape, targets, weights, values, step, updates, diagnostic, rep_gram=None
    ):
        """The update from one backward pass per term, and the gradient diagnostics.

        The per-term gradients are all-reduced across replicas (so every replica holds the
        global ones), their Gramian gives the balancer's weights and the diagnostics, and the
        update is their combination, divided by the number of replicas because the optimizer
        sums the replicas' gradients in `apply`.

        With `rep_gram` (a balancer's `representation`), the balancer's weights come from that
        Gramian of the gradients at the representation, not from the parameters'.

        Returns:
            (gradients for `optimizer.apply`, the weights by term name, the balancer's state
            updates, the balancer's `valid` flags or None, the diagnostic logs: empty unless
            `diagnostic`).
        """
        names = list(weights)
        replicas = self.strategy.num_replicas_in_sync
        balancer = self.balancers.get(phase.name)
        per_term = gradients_lib.term_gradients(tape, targets, phase.variables)
        if replicas > 1:
            ctx = tf.distribute.get_replica_context()
            per_term = ctx.all_reduce(tf.distribute.ReduceOp.SUM, per_term)
        stacks = gradients_lib.stack_by_variable(per_term)
        # Scaled losses (mixed precision) scale the gradients; the Gramian is of the true ones.
        scale = 1.0
        if isinstance(phase.optimizer, keras.optimizers.LossScaleOptimizer):
            scale = 1.0 / tf.cast(phase.optimizer.scale_loss(1.0), tf.float32)
        target = self._balancer_targets.get(phase.name)
        gram = None
        if diagnostic or target is None:
            gram = gradients_lib.gramian(stacks) * tf.square(scale)
        coefficients = update = direct = valid = None  # None: 1 for every term
        if balancer is not None and balancer.needs_gradients:
            if rep_gram is not None:
                target_gram = rep_gram
            elif target is None:
                target_gram = gram
            else:
                target_gram = gradients_lib.gramian(stacks, target) * tf.square(scale)
            extra = {"stacks": [s * scale for s in stacks]} if balancer.needs_stacks else {}
            weighting = user_code(balancer.weights)(values, step, target_gram, **extra)
            coefficients = update = weighting.weights
            if weighting.mixing is not None:  # gradient surgery: g_i' = sum_k C_ik w_k g_k
                update = tf.reduce_sum(weighting.mixing, axis=0) * coefficients
            direct, valid = weighting.update, weighting.valid
            updates = tuple(updates) + tuple(weighting.updates)
            weights = {n: weights[n] * coefficients[i] for i, n in enumerate(names)}
        if direct is not None:  # the balancer's own update, in the true (unscaled) gradients' units
            grads = [
                tf.cast(tf.reshape(d / scale / float(replicas), tf.shape(v)), v.dtype)
                for d, v in zip(direct, phase.variables, strict=True)
            ]
        elif update is None:  # the plain sum: no multiplications
            grads = [tf.add_n(list(g)) for g in zip(*per_term, strict=True)]
            if replicas > 1:
                grads = [g / float(replicas) for g in grads]
        else:
            grads = gradients_lib.combine(stacks, update / float(replicas), phase.variables)
        logs = {}
        if diagnostic:
            if direct is not None:  # not a combination of the g_i: the products directly
                flat = [tf.reshape(tf.cast(d, tf.float32), [-1]) for d in direct]
                products = (
                    tf.add_n([tf.linalg.matvec(s, d) for s, d in zip(stacks, flat, strict=True)])
                    * scale
                )
                norm2 = tf.add_n([tf.reduce_sum(tf.square(d)) for d in flat])
                stats = gradients_lib.statistics(
                    gram, coefficients, products=products, update_norm2=norm2
                )
            else:
                stats = gradients_lib.statistics(gram, coefficients, update)
            for i, name in enumerate(names):
                logs[f"grad_norm/{name}"] = stats["norms"][i] / replicas
                logs[f"grad_cosine/{name}"] = stats["cosines"][i] / replicas
                logs[f"grad_share/{name}"] = stats["shares"][i] / replicas
            logs[f"grad_conflict/{phase.name}"] = stats["conflict"] / replicas
            logs[f"{COSINE_MATRIX}/{phase.name}"] = stats["cosine_matrix"] / replicas
            segments = self._layer_segments.get(phase.name)
            if segments is not None:
                norms = gradients_lib.layer_norms(stacks, segments) * scale
                w = tf.ones([len(names)]) if coefficients is None else coefficients
                logs[f"{LAYER_NORMS}/{phase.name}"] = tf.abs(w)[:, None] * norms / replicas
            if self.histogram_every:  # the weighted gradients themselves, for histograms
                w = tf.ones([len(names)]) if coefficients is None else coefficients
                flat = tf.concat(stacks, axis=1) * scale
                for i, name in enumerate(names):
                    logs[f"{GRADIENT_VALUES}/{name}"] = w[i] * flat[i] / replicas
        return grads, weights, updates, valid, logs

    def _replica_train_step(self, batches, diagnostic: bool = False):
        """One training step in replica context: every phase, each run on its own batch.

        Returns:
            (per-step logs, diagnostic logs). The per-step logs hold `loss/`, `weight/`,
            `weighted/` of every term, `total/<phase>`, the metrics, `examples` and `applied`
            (1 when the step's updates were applied); the diagnostic logs are empty unless
            `diagnostic`, when the last run of every phase takes one backward pass per term.
        """
        step = self._step.read_value()
        ok_all = tf.logical_not(self._halted.read_value())
        replicas = self.strategy.num_replicas_in_sync
        logs, diagnostics = {}, {}
        self._checked_names = []
        for phase in self.phases.values():
            runs = self.phase_steps.get(phase.name, 1)
            per_run = []
            for run in range(runs):
                ok_all, run_logs, run_diagnostics = self._phase_update(
                    phase, batches[run], step, ok_all, diagnostic and run == runs - 1, run
                )
                per_run.append(run_logs)
                diagnostics.update(run_diagnostics)
            for key in per_run[0]:  # a repeated phase logs the mean over its runs
                values = [r[key] for r in per_run]
                logs[key] = values[0] if runs == 1 else tf.add_n(values) / float(runs)
        self._check_weight_names()
        if self.on_nonfinite == "skip":
            self._skipped.assign_add(tf.cast(tf.logical_not(ok_all), tf.int64))
        used = batches[: max(self.phase_steps.values(), default=1)]
        logs[EXAMPLES] = tf.cast(tf.add_n([data_lib.batch_size_of(b) for b in used]), tf.float32)
        logs[APPLIED] = tf.cast(ok_all, tf.float32) / replicas
        return logs, diagnostics

    def _phase_update(self, phase: Phase, batch, step, ok_before, diagnostic: bool, run: int):
        """One run of one phase: its terms, their gradients, the checks, the update.

        Returns:
            (whether every update so far in this step was applied, the run's logs, its
            diagnostic logs).
        """
        replicas = self.strategy.num_replicas_in_sync
        scale_loss = isinstance(phase.optimizer, keras.optimizers.LossScaleOptimizer)
        balancer = self.balancers.get(phase.name)
        gradient_balancer = balancer is not None and balancer.needs_gradients
        at_representation = gradient_balancer and balancer.representation is not None
        per_term = diagnostic or (gradient_balancer and not at_representation)
        updates, values, valid, diagnostics = (), None, None, {}
        tap = (
            gradients_lib.OutputTap(self._layer_named(balancer.representation))
            if (at_representation)
            else contextlib.nullcontext([])
        )
        with tf.GradientTape(persistent=per_term or at_representation) as tape:
            with tap as representations:
                reduced = self._phase_terms(phase, batch, training=True)
            weights, weighted, total = self._weigh(reduced, step)
            if balancer is not None:
                user_code(balancer.build)(tuple(reduced), shapes=[v.shape for v in phase.variables])
                values = self._global_values(reduced)
            if balancer is not None and not balancer.needs_gradients:
                weighting = user_code(balancer.weights)(values, step)
                weights, weighted, total = self._reweigh(reduced, weights, weighting.weights)
                updates, valid = weighting.updates, weighting.valid
            scaled = phase.optimizer.scale_loss if scale_loss else (lambda loss: loss)
            many = per_term or at_representation
            targets = [scaled(weighted[n]) for n in reduced] if many else None
            target = None if many else scaled(total)
        rep_gram = None
        if at_representation:
            rep_gram = self._representation_gramian(phase, tape, targets, representations)
        if per_term:
            grads, weights, updates, gradient_valid, diagnostics = self._per_term_gradients(
                phase, tape, targets, weights, values, step, updates, diagnostic, rep_gram
            )
            valid = gradient_valid if valid is None else valid
        elif at_representation:  # T passes down to Z, then one full pass of sum_k u_k L_k
            weighting = user_code(balancer.weights)(values, step, rep_gram)
            coefficients = weighting.weights
            update = coefficients
            if weighting.mixing is not None:
                update = tf.reduce_sum(weighting.mixing, axis=0) * coefficients
            grads = tape.gradient(
                targets, phase.variables, output_gradients=[update[i] for i in range(len(targets))]
            )
            grads = [
                tf.zeros_like(v) if g is None else g
                for g, v in zip(grads, phase.variables, strict=True)
            ]
            updates, valid = tuple(updates) + tuple(weighting.updates), weighting.valid
            weights = {n: weights[n] * coefficients[i] for i, n in enumerate(reduced)}
        else:
            grads = tape.gradient(target, phase.variables)
        del tape
        if gradient_balancer:
            weighted = {n: weights[n] * reduced[n] for n in reduced}
            total = tf.add_n(list(weighted.values()))
        ok = tf.logical_and(ok_before, self._check(phase, reduced, weights, grads, valid, run))
        self._conditional_apply(phase, grads, ok)
        for variable, value in updates:  # balancer state: only with the update
            value = tf.cast(value, variable.dtype)
            variable.assign(tf.where(ok, value, tf.convert_to_tensor(variable)))
        logs = {}
        for name in reduced:
            logs[f"loss/{name}"] = reduced[name]
            logs[f"weight/{name}"] = weights[name] / replicas
            logs[f"weighted/{name}"] = weighted[name]
        logs[f"total/{phase.name}"] = total
        logs.update(self._phase_metrics.pop(phase.name, {}))
        return ok, logs, diagnostics

    def _representation_gramian(self, phase: Phase, tape, targets, representations):
        """The [T, T] Gramian of the terms' gradients at the tapped representation(s), global.

        ``G_ij = sum over the outputs Z the layer gave in this run (and their examples) of
        dL_i/dZ . dL_j/dZ``: one backward pass per term, through the heads only.
        """
        if not representations:
            raise ValueError(
                f"The balancer's representation layer {self.balancers[phase.name].representation!r}"
                f" was not called in phase {phase.name!r}'s terms."
            )
        per_term = gradients_lib.term_gradients(tape, targets, representations)
        gram = gradients_lib.gramian(gradients_lib.stack_by_variable(per_term))
        if isinstance(phase.optimizer, keras.optimizers.LossScaleOptimizer):
            gram = gram / tf.square(tf.cast(phase.optimizer.scale_loss(1.0), tf.float32))
        if self.strategy.num_replicas_in_sync > 1:  # each replica's examples: a sum
            gram = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gram)
        return gram

    def _check(self, phase: Phase, reduced, weights, grads, valid, run: int) -> tf.Tensor:
        """Whether this run's terms, weights, balancer preconditions and gradient are all sound.

        On the first failure of a run (with `on_nonfinite="raise"`) it records what failed and
        when, for `NonFiniteLossError`'s message (`_checked_names` holds what each flag is).

        The flags cost a few ops per step, not two per variable: the scalar terms and weights
        are checked as one stacked vector, and the whole gradient by one sum (`all_finite`).
        """
        replicas = self.strategy.num_replicas_in_sync
        checks = [("term", n) for n in reduced] + [("weight", n) for n in weights]
        values = [tf.convert_to_tensor(v) for v in (*reduced.values(), *weights.values())]
        if all(v.shape.rank == 0 and v.dtype == tf.float32 for v in values):
            parts = [tf.math.is_finite(tf.stack(values))]
        else:  # a weight that is not a float32 scalar (a user's schedule): one flag each
            parts = [tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in values])]
        if valid is not None:
            checks += [("balancer", n) for n in reduced]
            parts.append(tf.reshape(tf.cast(valid, tf.bool), [-1]))
        # A LossScaleOptimizer handles its own overflowing gradients.
        if not isinstance(phase.optimizer, keras.optimizers.LossScaleOptimizer):
            checks.append(("gradient", None))
            parts.append(tf.reshape(gradients_lib.all_finite(grads), [1]))
        flags = tf.cast(tf.concat(parts, axis=0), tf.int32)
        if replicas > 1:  # sound on every replica: the sum of the 0/1 flags is R
            flags = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, flags
            )
            flags = tf.cast(tf.equal(flags, replicas), tf.int32)
        offset = len(self._checked_names)
        self._checked_names.extend((phase.name, run, kind, name) for kind, name in checks)
        self._record_nonfinite(flags, offset)
        return tf.reduce_all(flags > 0)

    def _record_nonfinite(self, flags, offset: int) -> None:
        """On the first failed check, remembers which and when (for the error message)."""
        if self.on_nonfinite != "raise":
            return
        bad = tf.logical_and(tf.logical_not(self._halted), tf.logical_not(tf.reduce_all(flags > 0)))
        if not tf.distribute.has_strategy():
            # Written only on the failure, in a `tf.cond`: three unconditional `tf.where`
            # assignments cost about 4% of a small model's step (the VAE's, scripts/benchmark.py).
            def record():
                self._nonfinite_index.assign(tf.cast(tf.argmin(flags), tf.int32) + offset)
                self._nonfinite_step.assign(self._step + 1)
                self._halted.assign(True)
                return tf.constant(True)

            tf.cond(bad, record, lambda: tf.constant(False))
            return
        # Unconditional assignments: under MirroredStrategy an assignment inside a `tf.cond` in
        # replica context is a merge_call, which is not allowed there. `flags` is all-reduced,
        # so every replica writes the same values.
        first = tf.cast(tf.argmin(flags), tf.int32) + offset
        self._nonfinite_index.assign(tf.where(bad, first, self._nonfinite_index))
        self._nonfinite_step.assign(tf.where(bad, self._step + 1, self._nonfinite_step))
        self._halted.assign(tf.logical_or(self._halted, bad))

    def _conditional_apply(self, phase: Phase, grads, ok) -> None:
        """Applies the update only when `ok`, in the way each strategy allows."""
        if not tf.distribute.has_strategy():
            self._gated_apply(phase)(list(grads), ok)
            return

        # A cond whose branch calls `optimizer.apply` is not allowed in a replica context under
        # MirroredStrategy: branch in the cross-replica context (LossScaleOptimizer's pattern).
        # The gradients go through `merge_call`'s args, so each replica applies its own.
        def cross_replica(strategy, grads, ok):
            ok = strategy.experimental_local_results(ok)[0]

            def apply_each():
                strategy.extended.call_for_each_replica(
                    functools.partial(_apply_update, phase), args=(grads,)
                )
                return tf.constant(True)

            tf.cond(ok, apply_each, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, ok))

    def _gated_apply(self, phase: Phase):
        """`tf.cond(ok, apply(grads))` as one `tf.function` per phase, traced once for the plain
        and the diagnostic train functions alike (default strategy only).

        The optimizer's update is the largest part of a small model's trace (Adam: about 40
        ops per variable, half of the VAE's diagnostic trace): inlined in both functions, the
        diagnostic function traced it again inside the run's first `grad_log_every` steps.
        The call is inlined when the graph runs, so a step costs what it did.
        """
        function = self._apply_functions.get(phase.name)
        if function is None:

            def gated(grads, ok):
                return tf.cond(ok, lambda: _apply_update(phase, grads), lambda: tf.constant(False))

            function = tf.function(gated, autograph=False)
            self._apply_functions[phase.name] = function
        return function

    def _replica_eval_step(self, batch):
        step = self._step.read_value()
        logs = {}
        for phase in self.phases.values():
            reduced = self._phase_terms(phase, batch, training=False)
            _, weighted, total = self._weigh(reduced, step)
            logs.update({name: value for name, value in reduced.items()})
            key = "total" if len(self.phases) == 1 else f"total/{phase.name}"
            logs[key] = total
            logs.update(self._phase_metrics.pop(phase.name, {}))
        logs[EXAMPLES] = tf.cast(data_lib.batch_size_of(batch), tf.float32)
        return logs

    def _compile_step(self, replica_fn):
        """`replica_fn` over the strategy's replicas, its outputs summed across them.

        Under the default strategy it is `replica_fn` itself, inlined into the calling
        function's graph: no `strategy.run`/`reduce` wrapping and no nested function call per
        step. With `jit_compile` the step is its own XLA-compiled function.
        """
        strategy = self.strategy
        if self._distributed:

            def step(batch):
                per_replica = strategy.run(replica_fn, args=(batch,))
                return tf.nest.map_structure(
                    lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None),
                    per_replica,
                )

        else:
            step = replica_fn
        if self.jit_compile:
            return tf.function(step, jit_compile=True, reduce_retracing=True, autograph=False)
        return step

    def _next_batches(self, iterator) -> tuple:
        """The batches of one step: one per run of the phase that runs most (see `phase_steps`)."""
        return tuple(next(iterator) for _ in range(max(self.phase_steps.values(), default=1)))

    def _make_train_function(self, diagnostic: bool = False):
        """A compiled call that runs up to `num_steps` steps, or with `diagnostic` one step.

        Each step adds its logs to the window (`self._window`, whose means the host logs). The
        call ends early when training halts (a non-finite term with `on_nonfinite="raise"`) or
        when a stop is requested (`self._stop`: a signal). With `diagnostic`, the step takes
        per-term gradients and the call returns its diagnostic logs (`_concrete` runs it as the
        last step of a diagnostic call).

        The host loop calls the diagnostic function for the compiled call that ends on a
        multiple of `grad_log_every`, so a plain step never pays for diagnostics and no
        `tf.cond` has to choose between an update from one or from T backward passes.
        """
        if diagnostic:
            diagnose = self._compile_step(
                functools.partial(self._replica_train_step, diagnostic=True)
            )
        else:
            plain = self._compile_step(self._replica_train_step)
        step_var, halted, stop, window = self._step, self._halted, self._stop, self._window

        def one(fn, iterator):
            logs, diagnostics = fn(self._next_batches(iterator))
            step_var.assign_add(tf.cast(tf.logical_not(halted), tf.int64))
            window.add(logs)
            return diagnostics

        if diagnostic:  # the diagnostic step alone: its trace holds one step, not a loop too

            def train_function(iterator, num_steps):
                # One step; `_concrete` runs the call's other steps before it. With num_steps 0
                # nothing runs: `_compile_diagnostic_ahead` instantiates the graph that way.
                traced = []

                def step():
                    traced.append(one(diagnose, iterator))
                    return traced[0]

                def nothing():  # traced after `step` (cond_v2 traces the true branch first)
                    def zeros(t):  # of its static shape, unknown sizes 0
                        dims = t.shape.as_list() if t.shape.rank is not None else []
                        return tf.zeros([d or 0 for d in dims], t.dtype)

                    return tf.nest.map_structure(zeros, traced[0])

                out = tf.cond(num_steps > 0, step, nothing)
                return {**out, "step": step_var.read_value(), "halted": halted.read_value()}

        else:

            def train_function(iterator, num_steps):
                def more(count):  # a halt or a stop ends the call before the next step
                    running = tf.logical_not(tf.logical_or(halted.read_value(), stop.read_value()))
                    return tf.logical_and(count < num_steps, running)

                def plain_step(count):
                    one(plain, iterator)
                    return count + 1

                tf.while_loop(more, plain_step, [tf.constant(0, tf.int32)])
                return {"step": step_var.read_value(), "halted": halted.read_value()}

        # No autograph: the loop is explicit, and user code is converted where it is called.
        train_function = tf.function(train_function, autograph=False)
        return train_function

    def _concrete(self, iterator, diagnostic: bool):
        """The train function for `iterator`: its concrete function, or for a diagnostic call a
        callable of the same arguments that runs the plain function's `num_steps - 1` steps,
        then the diagnostic function's one step (so that trace holds one step, not a loop too;
        under the default strategy `_compile_diagnostic_ahead` traced it beside the first call).

        Calling the `tf.function` itself matches its arguments against its traces on every
        call, which for an iterator walks the whole element spec: on a small model that cost
        about as much as the step. The concrete function skips it.
        """
        plain = self._traced(iterator, False)
        if not diagnostic:
            return plain
        diagnose = self._traced(iterator, True)

        def call(iterator, num_steps):
            rest = int(num_steps) - 1
            if rest > 0:  # a stop or a halt ends these early; the diagnostic step runs anyway
                plain(iterator, tf.constant(rest, tf.int32))
            self._await_compiled_diagnostic()
            return _unoptimised(diagnose)(iterator, num_steps)

        return call

    def _compile_diagnostic_ahead(self, iterator) -> None:
        """Traces the diagnostic function, and instantiates it on a second thread (under the
        default strategy). `fit` runs this while its first call runs on the call thread.

        Tracing it at the run's first diagnostic step, and its first call's graph optimisation
        and kernel creation, took about 0.5 s of a VAE's first 1,000 steps (0.9 s at the steady
        state). The trace (about 0.2 s of Python) now runs while the first call's graph is
        optimised and run in C++, and the instantiation, a call with `num_steps` 0 which runs
        nothing, in C++ beside the calls after it; the first diagnostic call waits for it.
        Every call of it skips Grappler (`_without_graph_optimisation`), which halves that
        instantiation.
        """
        if not self.grad_log_every or self._distributed:
            return
        cached = self._calls.get(True)
        if cached is not None and cached[0] is iterator:
            return
        self._await_compiled_diagnostic()
        diagnose = self._traced(iterator, True)
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="termwise-compile")
        self._compiling = worker.submit(_unoptimised(diagnose), iterator, tf.constant(0, tf.int32))
        worker.shutdown(wait=False)  # its one thread ends with that call

    def _await_compiled_diagnostic(self) -> None:
        """Waits for `_compile_diagnostic_ahead`'s call, re-raising what it raised."""
        compiling, self._compiling = self._compiling, None
        if compiling is not None:
            compiling.result()

    def _traced(self, iterator, diagnostic: bool):
        cached = self._calls.get(diagnostic)
        if cached is None or cached[0] is not iterator:
            if diagnostic not in self._train_functions:
                self._train_functions[diagnostic] = self._make_train_function(diagnostic)
            function = self._train_functions[diagnostic]
            concrete = function.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
            self._window.allocate()  # the trace named the window's keys
            self._calls[diagnostic] = cached = (iterator, concrete)
        return cached[1]

    def _make_eval_function(self):
        step_fn = self._compile_step(self._replica_eval_step)

        def weighted(logs):
            n = logs[EXAMPLES]
            return {k: (v if k == EXAMPLES else v * n) for k, v in logs.items()}

        @tf.function
        def eval_function(iterator, num_steps):
            sums = weighted(step_fn(next(iterator)))
            for _ in tf.range(num_steps - 1):
                logs = weighted(step_fn(next(iterator)))
                sums = {k: sums[k] + logs[k] for k in sums}
            return sums

        return eval_function


class Window(tf.Module):
    """The sums of the per-step logs since the last logged step (and since the epoch began).

    `add(logs)` (inside the compiled call) adds a step's values where the step was applied and
    keeps the step's values as `last`; the host reads the means and resets at each logged step
    (`means`, `reset`) and at each epoch's end (`epoch_means`, `reset_epoch`: Keras's running
    means for callbacks). The keys are named by the first trace, which sizes the variables
    (`allocate`); the variables are part of the checkpoint, so a resume between two logged steps
    continues the same means.
    """

    def __init__(self):
        super().__init__(name="window")
        self.keys: tuple[str, ...] | None = None
        # Created empty before any trace and sized by `allocate` once the first trace has named
        # the keys: a variable created inside a trace makes `tf.function` trace the whole step
        # a second time (about half of the time to the first step).
        vector = tf.TensorShape([None])
        self.sums = tf.Variable(tf.zeros([0], tf.float64), shape=vector, trainable=False)
        self.count = tf.Variable(tf.zeros([], tf.float64), trainable=False)
        self.epoch_sums = tf.Variable(tf.zeros([0], tf.float64), shape=vector, trainable=False)
        self.epoch_count = tf.Variable(tf.zeros([], tf.float64), trainable=False)
        self.last = tf.Variable(tf.zeros([0], tf.float32), shape=vector, trainable=False)

    def add(self, logs: Mapping[str, tf.Tensor]) -> None:
        keys = tuple(k for k in logs if k != APPLIED)
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise ValueError(f"The step's logs changed from {list(self.keys)} to {list(keys)}.")
        values = tf.stack([tf.cast(logs[k], tf.float32) for k in keys])
        applied = tf.cast(logs[APPLIED], tf.float64)
        kept = tf.where(applied > 0, tf.cast(values, tf.float64), 0.0)
        self.sums.assign_add(kept)
        self.count.assign_add(applied)
        self.epoch_sums.assign_add(kept)
        self.epoch_count.assign_add(applied)
        self.last.assign(values)

    def allocate(self) -> None:
        """Sizes the variables for the keys the first trace named (zeros), before any call.

        A window restored from a checkpoint already holds one value per key; one of another
        size was saved by a run that logged other values per step, and cannot continue.

        Raises:
            ValueError: when the restored window's size is not the number of keys.
        """
        size, wanted = int(tf.size(self.sums)), len(self.keys or ())
        if size == wanted:
            return
        if size:
            raise ValueError(
                f"The checkpoint's logging window holds {size} values per step, but this run "
                f"logs {wanted} ({', '.join(self.keys)}): it was saved by a run with other "
                "terms or metrics, so its means cannot continue here."
            )
        self.sums.assign(tf.zeros([wanted], tf.float64))
        self.epoch_sums.assign(tf.zeros([wanted], tf.float64))
        self.last.assign(tf.zeros([wanted], tf.float32))

    @property
    def ready(self) -> bool:
        return self.keys is not None

    def means(self) -> dict[str, float]:
        """The means since the last reset, `examples` (per step) included; {} when none ran."""
        return self._means(self.sums, self.count)

    def epoch_means(self) -> dict[str, float]:
        """The means since the epoch began (the last `reset_epoch`), without `examples`."""
        means = self._means(self.epoch_sums, self.epoch_count)
        means.pop(EXAMPLES, None)
        return means

    def _means(self, sums, count) -> dict[str, float]:
        if self.keys is None:
            return {}
        count = float(count.numpy())
        if count <= 0:
            return {}
        values = sums.numpy() / count
        return {k: float(v) for k, v in zip(self.keys, values, strict=True)}

    def last_values(self) -> dict[str, float]:
        if self.keys is None:
            return {}
        return {k: float(v) for k, v in zip(self.keys, self.last.numpy(), strict=True)}

    def reset(self) -> None:
        if self.keys is not None:
            self.sums.assign(tf.zeros_like(self.sums))
            self.count.assign(0.0)

    def reset_epoch(self) -> None:
        if self.keys is not None:
            self.epoch_sums.assign(tf.zeros_like(self.epoch_sums))
            self.epoch_count.assign(0.0)
