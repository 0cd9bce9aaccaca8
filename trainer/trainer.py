"""The Trainer: a `tf.GradientTape` loop in which every loss term is named, weighted and logged.

This module holds the public `Trainer`: its options, its override points (`compute_terms`,
`phase_variables`, `sample_weight`, `add_metric`), its state (build, restore, iterators) and
the outer loop (`fit`, `evaluate`: logging, diagnostics, validation, checkpoints, progress).
The step it compiles is `termwise.trainer.step.StepMixin` (what one update does, in replica
context); the checks of its arguments are in `termwise.trainer.options`. As in Orbit, the
compiled step knows nothing of files: each compiled call runs up to `steps_per_execution` steps
and stops exactly at the next logging, diagnostic, checkpoint or validation step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise.trainer import data as data_lib
from termwise.trainer import gradients as gradients_lib
from termwise.trainer import options as options_lib
from termwise.trainer import outputs as outputs_lib
from termwise.trainer import terms as terms_lib
from termwise.trainer import validation
from termwise.trainer.checkpoints import Checkpoints
from termwise.trainer.options import ON_NONFINITE, BalancerArg, Weight
from termwise.trainer.progress import Progress
from termwise.trainer.step import COSINE_MATRIX, GRADIENT_TAGS, StepMixin
from termwise.trainer.summaries import SummaryWriter


def _seed_states(models) -> list:
    """The state variables of the models' `keras.random.SeedGenerator`s.

    `Layer.variables` holds them and `Layer.weights` does not, and Keras leaves them out of
    TensorFlow checkpoints: without them a resumed run would replay the random draws (dropout,
    noise, a VAE's samples) of its first steps.
    """
    states, seen = [], set()
    for model in models:
        weights = {id(w) for w in model.weights}
        for variable in model.variables:
            if id(variable) not in weights and id(variable) not in seen:
                seen.add(id(variable))
                states.append(variable)
    return states


class NonFiniteLossError(FloatingPointError):
    """A loss term (or a phase's gradient) became NaN or Inf; no update from it was applied."""


class Trainer(StepMixin):
    """Trains Keras models on a sum of named, weighted loss terms.

    The one method most users override is `compute_terms`. A VAE whose encoder adds its KL with
    `add_loss` from a layer named `kl`:

    ```python
    class VAETrainer(tw.Trainer):
        def compute_terms(self, batch, training):
            x = batch
            logits = self.model(x, training=training)      # the `kl` layer calls add_loss
            return {"reconstruction": tw.losses.bernoulli_nll(x, logits)}  # per example

    vae_trainer = VAETrainer(
        vae, keras.optimizers.Adam(1e-3),
        weights={"kl": "linear:0:1:2000"},                  # KL warm-up
        log_dir="runs/vae", checkpoint_dir="runs/vae/checkpoints",
    )
    vae_trainer.fit(images, steps=5000)   # TensorBoard: loss/reconstruction, loss/kl, weight/kl...
    ```

    Several phases (a GAN's discriminator then generator) take a dict of optimizers keyed by
    phase name and a `compute_terms(self, batch, training, phase)`; override `phase_variables`
    unless `model` is a dict whose keys are the phase names.

    Args:
        model: a Keras model, or a dict of them (their variables and states are all saved).
        optimizer: a Keras optimizer, or a dict of them keyed by phase name (one phase each, run
            in the dict's order within each step).
        loss: for the default `compute_terms`, applied by Keras's rules
            (`termwise.trainer.outputs`): a Keras loss (a `keras.losses.Loss` or a function of
            `keras.losses`; its term is what `keras.Model.evaluate` reports for it), your own
            callable `(y_true, y_pred) -> per-example values` (given y_true and y_pred aligned
            in rank), a dict of them (one term per key; on a model with several outputs the
            keys are output names), or a list of them (one per output of a list model, the
            terms named by the outputs). None: the model's `add_loss` terms alone.
        weights: term name to weight: a number, a schedule (`termwise.schedules`) or a schedule
            string (`"linear:0:1:5000"`). Terms without one weigh 1.
        balancer: a `termwise.balancers.Balancer`, its string form (`"pcgrad"`, `"gradnorm:1.5"`,
            see `balancers.parse`; with several phases, one balancer each), or a dict of them
            keyed by phase name. Its weights multiply the schedules' (`weight/<term>` logs the
            product); its state is checkpointed. A balancer that needs gradients makes every
            step of its phase take one backward pass per term.
        log_dir: TensorBoard run directory; None writes no events.
        log_every: write scalars every this many steps (0: only at the end of each `fit`).
        grad_log_every: every this many steps (0: never), take one backward pass per term (the
            update is their sum: no extra pass) and log `grad_norm/<term>`,
            `grad_cosine/<term>`, `grad_conflict/<phase>` and the image
            `images/grad_cosine/<phase>`.
        dominance_ratio: warn (once per pair) when, on 3 diagnostic steps in a row, one term's
            weighted gradient norm exceeds another's by more than this ratio; None: never.
        checkpoint_dir: checkpoint directory; None saves none. A directory that holds a
            checkpoint is restored from automatically.
        checkpoint_every: save every this many steps (0: only at the end of each `fit`).
        max_checkpoints: how many recent checkpoints to keep.
        checkpoint_data: save the training data iterator's position with each checkpoint.
        strategy: a `tf.distribute.Strategy`; models and optimizers must be created in its
            scope. None: the current (default) strategy.
        steps_per_execution: at most this many steps per compiled call. A call always stops
            at the next logging, diagnostic, validation or checkpoint step, so this changes
            speed, not what is logged or saved; on a small model the Python round trip per call
            costs as much as a step (scripts/benchmark.py).
        jit_compile: compile the step with XLA.
        on_nonfinite: "raise" stops with `NonFiniteLossError` naming the term and the step, and
            that step's update is not applied; "skip" drops such steps and counts them
            (`nonfinite/skipped`).
        progress: show a progress bar (True), write absl log lines (False), or decide from
            whether standard output is a terminal (None).
        hparams: extra hyperparameters to record for TensorBoard's hparams plugin.

    Raises:
        ValueError: on any invalid option, naming it, its value and what is allowed.
    """

    def __init__(
        self,
        model: keras.Model | Mapping[str, keras.Model],
        optimizer: keras.optimizers.Optimizer | Mapping[str, keras.optimizers.Optimizer],
        *,
        loss=None,
        weights: Mapping[str, Weight] | None = None,
        balancer: BalancerArg = None,
        log_dir: str | None = None,
        log_every: int = 100,
        grad_log_every: int = 100,
        dominance_ratio: float | None = 100.0,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1000,
        max_checkpoints: int = 3,
        checkpoint_data: bool = True,
        strategy: tf.distribute.Strategy | None = None,
        steps_per_execution: int = 10,
        jit_compile: bool = False,
        on_nonfinite: str = "raise",
        progress: bool | None = None,
        hparams: Mapping[str, object] | None = None,
    ):
        self.model = model
        self._models = options_lib.check_models(model)
        self.phases = options_lib.make_phases(optimizer)
        self.loss = options_lib.check_loss(loss)
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(f"`weights` ({weights!r}) must be a dict of term name to weight.")
        self.weights = {name: options_lib.as_weight(name, w) for name, w in (weights or {}).items()}
        self.log_dir = log_dir
        self.log_every = validation.non_negative_int(
            "log_every", log_every, zero_means="logs only the last step of each fit"
        )
        self.grad_log_every = validation.non_negative_int(
            "grad_log_every", grad_log_every, zero_means="turns gradient diagnostics off"
        )
        self.balancers = options_lib.check_balancers(balancer, self.phases)
        self._balancer_targets: dict[str, list[int] | None] = {}
        if dominance_ratio is not None and (
            isinstance(dominance_ratio, bool)
            or not isinstance(dominance_ratio, (int, float))
            or not dominance_ratio > 1
        ):
            raise ValueError(
                f"`dominance_ratio` ({dominance_ratio!r}) must be a number > 1, or None (no "
                "warning)."
            )
        self._dominance = (
            None if dominance_ratio is None else gradients_lib.DominanceMonitor(dominance_ratio)
        )
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = validation.non_negative_int(
            "checkpoint_every", checkpoint_every, zero_means="saves only at the end of each fit"
        )
        validation.positive_int("max_checkpoints", max_checkpoints)
        self.checkpoint_data = validation.boolean("checkpoint_data", checkpoint_data)
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise ValueError(f"`strategy` ({strategy!r}) must be a tf.distribute.Strategy or None.")
        self.strategy = strategy or tf.distribute.get_strategy()
        # The default strategy needs no distributed datasets nor cross-replica branching.
        self._distributed = type(self.strategy).__name__ != "_DefaultDistributionStrategy"
        self.steps_per_execution = validation.positive_int(
            "steps_per_execution", steps_per_execution
        )
        self.jit_compile = validation.boolean("jit_compile", jit_compile)
        self.on_nonfinite = validation.one_of("on_nonfinite", on_nonfinite, ON_NONFINITE)
        if progress is not None:
            validation.boolean("progress", progress)
        self.progress = progress
        self._extra_hparams = dict(hparams or {})
        if type(self).compute_terms is Trainer.compute_terms and isinstance(model, Mapping):
            raise ValueError(
                "`model` is a dict of models: subclass Trainer and override compute_terms to say "
                "how they are called."
            )
        signature = inspect.signature(self.compute_terms).parameters
        self._terms_take_phase = "phase" in signature or any(
            p.kind is p.VAR_KEYWORD for p in signature.values()
        )
        if len(self.phases) > 1 and not self._terms_take_phase:
            raise ValueError(
                f"With several phases ({list(self.phases)}), compute_terms must take a `phase` "
                "argument: compute_terms(self, batch, training, phase)."
            )

        with self.strategy.scope():
            self._step = self._counter("step", tf.int64)
            self._skipped = self._counter("nonfinite_skipped", tf.int64)
            self._halted = self._counter("halted", tf.bool)
            self._nonfinite_step = self._counter("nonfinite_step", tf.int64)
            self._nonfinite_index = self._counter("nonfinite_index", tf.int32)
        self.term_names: dict[str, tuple[str, ...]] = {}
        self._metrics: dict[str, tf.Tensor] = {}  # add_metric values of the current trace
        self._phase_metrics: dict[str, dict[str, tf.Tensor]] = {}
        self._checked_names: list[str] = []
        self._checkpoints = None
        if checkpoint_dir:
            trackables = {"step": self._step, "nonfinite_skipped": self._skipped}
            trackables.update({f"model_{k}": m for k, m in self._models.items()})
            trackables.update({f"optimizer_{p.name}": p.optimizer for p in self.phases.values()})
            trackables.update({f"balancer_{k}": b for k, b in self.balancers.items()})
            seed_states = _seed_states(self._models.values())
            if seed_states:
                trackables["seed_states"] = seed_states
            self._checkpoints = Checkpoints(
                checkpoint_dir,
                max_checkpoints,
                writer=self.strategy.extended.should_checkpoint,
                worker=options_lib.task_id(self.strategy),
                **trackables,
            )
        self._writer = None
        self._hparams_written = False
        self._state_ready = False
        self._restored_from = None
        self._train_dataset = None
        self._train_iterator = None
        self._train_function = None
        self._diagnostic_function = None
        self._calls: dict[bool, tuple] = {}  # diagnostic -> (iterator, concrete function)
        self._step_functions = None
        self._eval_function = None
        self._last_logs: dict[str, float] = {}
        if all(m.built for m in self._models.values()):
            self._prepare_state(None)

    def _counter(self, name: str, dtype: tf.DType) -> tf.Variable:
        return tf.Variable(
            tf.zeros([], dtype),
            trainable=False,
            name=name,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    # ----------------------------------------------------------------------------------------
    # Public properties and override points.

    @property
    def step(self) -> int:
        """The global step: updates run so far, restored from checkpoints."""
        return int(self._step.numpy())

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was dropped because a term was not finite (`on_nonfinite="skip"`)."""
        return int(self._skipped.numpy())

    def phase_variables(self, phase: str) -> list:
        """The variables a phase updates.

        Default: the trainable variables of `model[phase]` when `model` is a dict with that key,
        else all trainable variables of all models.
        """
        if phase in self._models and len(self._models) > 1:
            return list(self._models[phase].trainable_variables)
        seen, variables = set(), []
        for model in self._models.values():
            for v in model.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)
        return variables

    def compute_terms(self, batch, training: bool) -> dict[str, tf.Tensor]:
        """Returns the named loss terms of one batch: the override point.

        Each value is per example (shape [batch, ...]; the trainer sample-weights, sums and
        divides by the global batch size) or a scalar (divided by the number of replicas). The
        `add_loss` values of layers called here are collected as terms too, named by the layer.

        The default unpacks Keras's `x`, `(x, y)` or `(x, y, sample_weight)`, calls the model
        and applies `loss` by Keras's rules (`termwise.trainer.outputs`): a Keras loss gives
        what `keras.Model.evaluate` reports for it. Override it for anything else; the subclass
        then owns its batch, and no element of it is a sample weight unless it also overrides
        `sample_weight`:

        ```python
        class DenoisingTrainer(tw.Trainer):
            def compute_terms(self, batch, training):
                x, _ = batch
                noisy = x + 0.1 * tf.random.normal(tf.shape(x))
                x_hat = self.model(noisy, training=training)
                return {"reconstruction": tw.losses.mean_squared_error(x, x_hat)}
        ```

        A trainer with several phases defines `compute_terms(self, batch, training, phase)` and
        returns the terms of that phase.

        Raises:
            ValueError: (the default) for a batch that is not Keras's structure or has no
                targets for `loss`, targets or sample weights that do not match the model's
                outputs, or shapes the loss cannot take; the first line says what was expected
                and what came.
        """
        x, y, sample_weight = outputs_lib.unpack_batch(batch, needs_targets=self.loss is not None)
        y_pred = self.model(x, training=training)
        if self.loss is None:
            return {}
        per_example = self.sample_weight(batch)
        if per_example is not None:  # the reduction applies them to every per-example term
            sample_weight = per_example
        elif type(self).sample_weight is not Trainer.sample_weight:
            sample_weight = None  # the subclass's sample_weight says there are none
        elif type(self).compute_terms is not Trainer.compute_terms and sample_weight is not None:
            raise ValueError(
                "compute_terms is overridden, so the third element of the batch is not a sample "
                "weight (Trainer.sample_weight returns None); override sample_weight to return "
                "the weights to apply: def sample_weight(self, batch): return batch[2]."
            )
        return outputs_lib.loss_terms(
            self.loss,
            y,
            y_pred,
            sample_weight,
            weighted_outside=per_example is not None,
            output_names=getattr(self.model, "output_names", None),
        )

    def sample_weight(self, batch) -> tf.Tensor | None:
        """The per-example weights of a batch: every per-example term is weighted by them.

        The reduction multiplies each per-example term (`add_loss` terms and `add_metric`
        values included) by these [batch] weights before its mean over the batch; scalar terms
        are not weighted.

        Default: with the default `compute_terms`, the third element of Keras's
        `(x, y, sample_weight)` when it holds one weight per example ([batch] or [batch, 1]);
        per-output or per-value weights ([batch, T]) weigh the `loss` terms alone, as Keras's
        weigh the compiled loss alone, and this returns None. When `compute_terms` is
        overridden: None, since the subclass owns its batch; override this method to weigh
        the terms:

        ```python
        class WeightedTrainer(tw.Trainer):
            def compute_terms(self, batch, training):
                x, labels, _ = batch
                logits = self.model(x, training=training)
                return {"nll": keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True)}        # [batch]: weighted

            def sample_weight(self, batch):
                return batch[2]                               # one weight per example
        ```
        """
        if type(self).compute_terms is not Trainer.compute_terms:
            return None
        _, _, sample_weight = outputs_lib.unpack_batch(batch)
        if sample_weight is not None and outputs_lib.is_per_example(sample_weight):
            return sample_weight
        return None

    def add_metric(self, name: str, value) -> None:
        """Logs `value` under `name` this step; call it inside `compute_terms`.

        A metric is reduced like a term (a per-example value [batch, ...] to its sample-weighted
        mean over the global batch, a scalar to its mean over replicas) and logged under `name`
        at the logged steps and as `eval/<name>` by `evaluate`, but it is not a loss: it adds
        nothing to the total and no gradient flows from it.

        ```python
        def compute_terms(self, batch, training):
            x, y = batch
            logits = self.model(x, training=training)
            correct = tf.cast(tf.argmax(logits, -1) == tf.cast(y, tf.int64), tf.float32)
            self.add_metric("accuracy", correct)        # per example: the batch accuracy
            return {"cross_entropy": keras.losses.sparse_categorical_crossentropy(y, logits)}
        ```

        Raises:
            ValueError: for a name that is not a non-empty string, given twice in one call of
                `compute_terms`, or equal to a term's name.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"add_metric `name` ({name!r}) must be a non-empty string.")
        if name in self._metrics:
            raise ValueError(f"add_metric was called twice with the name {name!r} in one step.")
        self._metrics[name] = tf.stop_gradient(tf.cast(value, tf.float32))

    # ----------------------------------------------------------------------------------------
    # State: building, restoring, iterators.

    def _prepare_state(self, dataset: tf.data.Dataset | None) -> None:
        """Builds models and optimizers, then restores the latest checkpoint (once)."""
        if self._state_ready:
            return
        unbuilt = not all(m.built for m in self._models.values())
        if unbuilt:
            if dataset is None:
                return
            batch = next(iter(dataset))
            with self.strategy.scope(), terms_lib.LossRecorder():
                for phase in self.phases.values():
                    if self._terms_take_phase:
                        self.compute_terms(batch, False, phase=phase.name)
                    else:
                        self.compute_terms(batch, False)
        for phase in self.phases.values():
            phase.variables = list(self.phase_variables(phase.name))
            if not phase.variables:
                raise ValueError(f"Phase {phase.name!r} has no trainable variables.")
            if not phase.optimizer.built:
                with self.strategy.scope():
                    phase.optimizer.build(phase.variables)
        if self._checkpoints is not None:
            self._restored_from = self._checkpoints.restore()
        self._state_ready = True

    def build(self, data, *, batch_size: int = 32) -> dict[str, tuple[str, ...]]:
        """Builds models and optimizers, restores the latest checkpoint, and checks the terms.

        `fit` and `evaluate` do this themselves; call it to find a bad term name or `weights`
        key before any training (scripts turn these errors into one-line messages). It runs
        one eager forward pass per phase on the first batch of `data` with `training=False`,
        then traces (without running) each phase's terms with `training=True`, as `fit` will:
        so it knows the terms of both modes, accepts a `weights` key for a term that exists
        only in training, and rejects a layer whose unnamed `add_loss` values differ between
        the modes. It changes no weight.

        Args:
            data: a `tf.data.Dataset` of batches, or arrays, as for `fit`.
            batch_size: the batch size for arrays.

        Returns:
            Each phase's term names, in the order they are summed.

        Raises:
            ValueError: on duplicate or non-float terms, a `weights` key naming no term (the
                message lists the known term names), or a layer that adds a different number
                of unnamed `add_loss` values in training and in evaluation.
        """
        validation.positive_int("batch_size", batch_size)
        dataset = data_lib.as_dataset(data, batch_size=batch_size, shuffle=False)
        self._prepare_state(dataset)
        batch = next(iter(dataset))
        for phase in self.phases.values():
            self._named_terms(phase, batch, training=False)

        def training_terms(batch):  # fit's names and checks, traced only
            for phase in self.phases.values():
                self._named_terms(phase, batch, training=True)

        terms_lib.trace_only(training_terms, dataset.element_spec, self.strategy)
        self._phase_metrics.clear()  # tensors of those passes
        self._check_weight_names()
        self._build_balancers(dataset)  # a bad target layer fails here, before training
        return dict(self.term_names)

    def _train_iterator_for(self, dataset: tf.data.Dataset):
        if dataset is self._train_dataset:
            return self._train_iterator
        repeated = dataset.repeat()
        with self.strategy.scope():
            iterator = self._distribute(repeated)
        if self._restored_from and self.checkpoint_data and self._train_iterator is None:
            try:
                self._checkpoints.restore_extra(data=iterator)
            except (tf.errors.OpError, ValueError, AssertionError) as error:
                logging.warning("The data position was not restored: %s", error)
        self._train_dataset, self._train_iterator = dataset, iterator
        return iterator

    def _distribute(self, dataset: tf.data.Dataset):
        if self._distributed:
            return iter(self.strategy.experimental_distribute_dataset(dataset))
        return iter(dataset)

    # ----------------------------------------------------------------------------------------
    # The outer loop.

    def fit(
        self,
        data,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        until_step: int | None = None,
        validation_data=None,
        validation_every: int | None = None,
        batch_size: int = 32,
    ) -> dict[str, float]:
        """Trains for `steps` more steps (or `epochs` passes, or until a global step).

        Args:
            data: a `tf.data.Dataset` of batches, or arrays (`(x, y[, sample_weight])`) to batch
                and reshuffle every pass. It is repeated as needed; the same dataset object
                passed again continues where the last `fit` stopped.
            steps: how many more steps to run.
            epochs: how many passes over `data` to run (its length must be known).
            until_step: run until the global step reaches this; rerunning the same command
                after a preemption then finishes the same job. Give one of the three; none means
                one pass.
            validation_data: evaluated every `validation_every` steps and at the end, logged as
                `eval/<term>`.
            validation_every: steps between evaluations (default: one pass over `data` when
                its length is known, else only at the end).
            batch_size: the batch size for arrays.

        Returns:
            The last step's logs as floats: `loss/<term>`, `weight/<term>`, `weighted/<term>`,
            `total/<phase>`, `optimizer/<phase>/learning_rate`, `perf/...`, after a
            validation `eval/<term>`, and when the last step was a diagnostic step (a multiple
            of `grad_log_every`) `grad_norm/<term>`, `grad_cosine/<term>` and
            `grad_conflict/<phase>`.

        Raises:
            ValueError: on bad arguments or term names, before any update.
            NonFiniteLossError: with `on_nonfinite="raise"`, when a term becomes NaN or Inf.
        """
        validation.positive_int("batch_size", batch_size)
        dataset = data_lib.as_dataset(data, batch_size=batch_size, shuffle=True)
        if sum(x is not None for x in (steps, epochs, until_step)) > 1:
            raise ValueError(
                f"Give one of `steps` ({steps!r}), `epochs` ({epochs!r}) and `until_step` "
                f"({until_step!r}), not several."
            )
        per_pass = data_lib.batches_per_pass(dataset)
        self._prepare_state(dataset)
        if until_step is not None:
            steps = max(0, validation.non_negative_int("until_step", until_step) - self.step)
        elif epochs is not None:
            validation.positive_int("epochs", epochs)
            if per_pass is None:
                raise ValueError(
                    f"`epochs` ({epochs}) needs data of known length; this dataset's length is "
                    "unknown or infinite: pass `steps` instead."
                )
            steps = epochs * per_pass
        elif steps is None:
            if per_pass is None:
                raise ValueError(
                    "The dataset's length is unknown or infinite: pass `steps` or `until_step`."
                )
            steps = per_pass
        else:
            validation.non_negative_int("steps", steps)
        if validation_every is None:
            validation_every = per_pass or 0
        else:
            validation.positive_int("validation_every", validation_every)
        if validation_data is None:
            validation_every = 0
        if steps == 0:
            return dict(self._last_logs)

        self._build_balancers(dataset)
        iterator = self._train_iterator_for(dataset)
        if self._train_function is None:
            self._train_function = self._make_train_function()
        self._write_hparams()
        start = self.step
        end = start + steps
        progress = Progress(end, start, interactive=self.progress)
        cadences = [
            c
            for c in (self.log_every, self.checkpoint_every, validation_every, self.grad_log_every)
            if c
        ]
        host_step = start
        last_time, last_step = time.perf_counter(), start
        logs = {}
        while host_step < end:
            stop = min([end] + [(host_step // c + 1) * c for c in cadences])
            count = min(self.steps_per_execution, stop - host_step)
            diagnose = bool(self.grad_log_every) and (host_step + count) % self.grad_log_every == 0
            if diagnose and self._diagnostic_function is None:
                self._diagnostic_function = self._make_train_function(diagnostic=True)
            function = self._concrete(iterator, diagnose)
            outputs, halted = function(iterator, tf.constant(count, tf.int32))
            if self.on_nonfinite == "raise" and bool(halted):
                self._raise_nonfinite()
            host_step += count
            final = host_step == end
            log_now = final or (self.log_every and host_step % self.log_every == 0)
            outputs = dict(outputs)
            matrices = {k: outputs.pop(k) for k in list(outputs) if k.startswith(COSINE_MATRIX)}
            if diagnose:
                self._write_diagnostics(host_step, outputs, matrices, also_scalars=not log_now)
            if log_now or progress.due():
                logs = self._host_logs(outputs)
            if log_now:
                now = time.perf_counter()
                rate = (host_step - last_step) / max(now - last_time, 1e-9)
                logs["perf/steps_per_sec"] = rate
                logs["perf/examples_per_sec"] = rate * logs.pop("examples", 0.0)
                if self.on_nonfinite == "skip":
                    logs["nonfinite/skipped"] = float(self.skipped_steps)
                self._write(host_step, logs)
                last_time, last_step = now, host_step
            if validation_every and (final or host_step % validation_every == 0):
                results = self.evaluate(validation_data, batch_size=batch_size)
                logs.update({f"eval/{k}": v for k, v in results.items()})
            if self._checkpoints is not None and (
                final or (self.checkpoint_every and host_step % self.checkpoint_every == 0)
            ):
                self.save()
            if final or (progress.due() if progress.interactive else log_now):
                progress.update(host_step, logs, final=final)
        logs.pop("examples", None)
        self._last_logs = logs
        if self._writer is not None:
            self._writer.flush()
        return dict(logs)

    def _write_diagnostics(self, step: int, outputs, matrices, *, also_scalars: bool) -> None:
        """Writes a diagnostic step's gradient tags and cosine heatmaps; checks for dominance."""
        if self._dominance is not None:
            for phase, names in self.term_names.items():
                norms = {n: float(outputs[f"grad_norm/{n}"]) for n in names}
                weights = {n: float(outputs[f"weight/{n}"]) for n in names}
                self._dominance.update(phase, norms, weights, step)
        if self.writer is None:
            return
        if also_scalars:  # otherwise they go with this step's other scalars
            self._write(
                step, {k: float(v) for k, v in outputs.items() if k.startswith(GRADIENT_TAGS)}
            )
        for key, matrix in matrices.items():
            self.writer.cosine_matrix(key.split("/", 1)[1], np.asarray(matrix), step)

    def _build_balancers(self, dataset: tf.data.Dataset) -> None:
        """Creates each balancer's state for its phase's terms, before the step is traced.

        The term names come from tracing (not running) each phase's terms with `training=True`,
        so they are the names the step will see; then the balancer's state is restored from the
        checkpoint that `_prepare_state` restored, if any.
        """
        pending = {k: b for k, b in self.balancers.items() if not b.built}
        if not pending:
            return
        names: dict[str, tuple[str, ...]] = {}

        def trace(batch):
            for phase in self.phases.values():
                if phase.name in pending:
                    names[phase.name] = tuple(self._named_terms(phase, batch, training=True))
            return tf.constant(0)

        with self.strategy.scope():
            tf.function(trace).get_concrete_function(dataset.element_spec)
        self._phase_metrics.clear()  # tensors of that scratch trace
        with self.strategy.scope():
            for phase_name, balancer in pending.items():
                balancer.build(names[phase_name])
        for phase_name, balancer in self.balancers.items():
            if phase_name not in self._balancer_targets:
                self._balancer_targets[phase_name] = self._target_indices(phase_name, balancer)
        if self._restored_from:
            self._checkpoints.restore_extra(**{f"balancer_{k}": b for k, b in pending.items()})

    def _target_indices(self, phase_name: str, balancer) -> list[int] | None:
        """Positions in the phase's variables of the balancer's target layer (None: all)."""
        if balancer.layer is None:
            return None
        layers = {}
        for model in self._models.values():
            for layer in model._flatten_layers(include_self=True, recursive=True):
                layers.setdefault(layer.name, layer)
        if balancer.layer not in layers:
            raise ValueError(
                f"`balancer` target layer {balancer.layer!r} is not a layer of the model; "
                f"layers: {sorted(layers)}."
            )
        wanted = {id(v) for v in layers[balancer.layer].trainable_variables}
        phase = self.phases[phase_name]
        indices = [i for i, v in enumerate(phase.variables) if id(v) in wanted]
        if not indices:
            raise ValueError(
                f"`balancer` target layer {balancer.layer!r} has no trainable variables in "
                f"phase {phase_name!r}."
            )
        return indices

    def _host_logs(self, outputs) -> dict[str, float]:
        logs = {k: float(v) for k, v in outputs.items()}
        for phase in self.phases.values():
            lr = phase.optimizer.learning_rate
            logs[f"optimizer/{phase.name}/learning_rate"] = float(np.asarray(lr))
        return logs

    def _raise_nonfinite(self):
        index = int(self._nonfinite_index.numpy())
        at = int(self._nonfinite_step.numpy())
        phase, term = self._checked_names[index].split("/", 1)
        what = (
            f"The gradient of phase {phase!r}"
            if term == "<gradient>"
            else (f"Loss term {term!r} (phase {phase!r})")
        )
        raise NonFiniteLossError(
            f"{what} became NaN or Inf at step {at}; that step's update was not applied and "
            f"training stopped at global step {self.step}. Pass on_nonfinite='skip' to drop "
            "such steps instead."
        )

    def evaluate(self, data, *, steps: int | None = None, batch_size: int = 32) -> dict[str, float]:
        """Evaluates every term and the total on `data` (training=False).

        Per-example terms are averaged over all examples (sample-weighted), scalar terms over
        batches weighted by their size; the total uses the current step's schedule weights
        (a balancer's weights depend on training steps and are not applied here).

        Args:
            data: a `tf.data.Dataset` of batches or arrays, as for `fit`.
            steps: at most this many batches (default: all).
            batch_size: the batch size for arrays.

        Returns:
            Term name to float, plus `total` (`total/<phase>` with several phases). The names
            are `fit`'s (see `termwise.trainer.terms`), and the values are also logged as
            `eval/<name>` at the current step.

        Raises:
            ValueError: for a term of rank >= 1 that does not lead with the batch axis, or a
                layer whose unnamed `add_loss` values differ from those it added in training.
        """
        validation.positive_int("batch_size", batch_size)
        dataset = data_lib.as_dataset(data, batch_size=batch_size, shuffle=False)
        if steps is not None:
            dataset = dataset.take(validation.positive_int("steps", steps))
        self._prepare_state(dataset)
        if self._eval_function is None:
            self._eval_function = self._make_eval_function()
        iterator = self._distribute(dataset)
        per_pass = data_lib.batches_per_pass(dataset)
        sums: dict[str, float] = {}

        def add(outputs):
            for k, v in outputs.items():
                sums[k] = sums.get(k, 0.0) + float(v)

        try:
            if per_pass is not None:
                remaining = per_pass
                while remaining > 0:
                    count = min(self.steps_per_execution, remaining)
                    add(self._eval_function(iterator, tf.constant(count, tf.int32)))
                    remaining -= count
            else:
                while True:
                    try:
                        add(self._eval_function(iterator, tf.constant(1, tf.int32)))
                    except (tf.errors.OutOfRangeError, StopIteration):
                        break
        except tf.errors.InvalidArgumentError as error:
            lead = terms_lib.lead_error(error)  # a term not led by the batch axis
            if lead is None:
                raise
            raise lead from None
        examples = sums.pop("examples", 0.0)
        if not examples:
            raise ValueError("`data` for evaluate holds no examples.")
        results = {k: v / examples for k, v in sums.items()}
        self._write(self.step, {f"eval/{k}": v for k, v in results.items()})
        if self._writer is not None:
            self._writer.flush()
        return results

    # ----------------------------------------------------------------------------------------
    # Files.

    @property
    def writer(self) -> SummaryWriter | None:
        """The TensorBoard writer; subclasses add images through it.

        None without `log_dir`, and on every worker of a multi-worker cluster but the chief:
        the workers run the same steps, and one of them writes.
        """
        if self._writer is None and self.log_dir and self.strategy.extended.should_save_summary:
            self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def _write(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            self.writer.scalars(step, {k: v for k, v in values.items() if k != "examples"})

    def _write_hparams(self) -> None:
        if self._hparams_written or self.writer is None:
            return
        values = {
            "steps_per_execution": self.steps_per_execution,
            "jit_compile": self.jit_compile,
            "on_nonfinite": self.on_nonfinite,
            "replicas": self.strategy.num_replicas_in_sync,
        }
        for phase in self.phases.values():
            values[f"optimizer/{phase.name}"] = type(phase.optimizer).__name__
            values[f"optimizer/{phase.name}/learning_rate"] = float(
                np.asarray(phase.optimizer.learning_rate)
            )
        for name, fn in self.weights.items():
            values[f"weight/{name}"] = getattr(fn, "spec", repr(fn))
        values["grad_log_every"] = self.grad_log_every
        for name, balancer in self.balancers.items():
            values[f"balancer/{name}"] = balancer.spec
        values.update(self._extra_hparams)
        self.writer.hparams(values)
        self._hparams_written = True

    def save(self) -> str | None:
        """Saves a checkpoint at the current step (None without `checkpoint_dir`)."""
        if self._checkpoints is None:
            return None
        extra = {}
        if self.checkpoint_data and self._train_iterator is not None:
            extra["data"] = self._train_iterator
        try:
            return self._checkpoints.save(self.step, **extra)
        except (tf.errors.OpError, ValueError, TypeError) as error:
            if not extra:
                raise
            logging.warning("Saving the data position failed (%s); saving without it.", error)
            self.checkpoint_data = False
            return self._checkpoints.save(self.step)
