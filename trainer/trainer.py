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

import contextlib
import functools
import inspect
import time
import weakref
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise.trainer import actions, summaries, validation
from termwise.trainer import checkpoints as checkpoints_lib
from termwise.trainer import data as data_lib
from termwise.trainer import gradients as gradients_lib
from termwise.trainer import lock as lock_lib
from termwise.trainer import options as options_lib
from termwise.trainer import outputs as outputs_lib
from termwise.trainer import preemption as preemption_lib
from termwise.trainer import terms as terms_lib
from termwise.trainer.callbacks import History, KerasCallbacks
from termwise.trainer.checkpoints import Checkpoints
from termwise.trainer.errors import NonFiniteLossError, clean_errors
from termwise.trainer.loop import CallSizer, Controller
from termwise.trainer.options import ON_NONFINITE, BalancerArg, Weight
from termwise.trainer.step import StepMixin, Window
from termwise.trainer.summaries import SummaryWriter


def _weight_spec(weight) -> str:
    """A weight as the user wrote it: its schedule string, else its repr."""
    return str(getattr(weight, "spec", None) or repr(weight))


def _layer_of_variables(models) -> dict[int, str]:
    """`id(variable)` to the name of the innermost layer (not a model) that holds it."""
    owner: dict[int, str] = {}
    for model in models:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, keras.Model) and layer is not model:
                continue
            for variable in layer.trainable_variables:
                owner[id(variable)] = layer.name  # deeper layers come later and win
    return owner


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


# Stateful TensorFlow random ops: their state lives in the op, not in any variable, so no
# checkpoint holds it (Keras's own random functions are stateless ops fed by a SeedGenerator).
_STATEFUL_RANDOM_OPS = frozenset(
    {
        "RandomStandardNormal",
        "RandomUniform",
        "RandomUniformInt",
        "TruncatedNormal",
        "ParameterizedTruncatedNormal",
        "RandomShuffle",
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
    }
)

__all__ = ["NonFiniteLossError", "Trainer"]


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
            checkpoint is restored from automatically: the newest intact one (a damaged newer
            one is skipped with a warning; when none restores, a ValueError, and nothing is
            deleted), whose objects must match this Trainer's both ways (models, optimizers,
            balancers, counters, random state; a mismatch is a ValueError that says what
            differs). A learning rate given that differs from the one the checkpoint's run was
            given wins, and is logged at the resume step, as are other changed options
            (`run.json` beside the checkpoints records them); training batches of another
            structure (another batch size) start the data from its beginning.
        checkpoint_every: save every this many steps (0: only at the end of each `fit`).
        max_checkpoints: how many recent checkpoints to keep.
        checkpoint_data: save the training data iterator's position with each checkpoint
            (a pipeline whose position cannot be saved, such as one reading through Python,
            is saved without it, with a warning, and a resumed run starts its data afresh).
        init_from: a checkpoint (a prefix `.../ckpt-N`, or a directory of them) to start a new
            run from: the model variables that match this Trainer's by place in the model and
            shape are loaded, at step 0 with fresh optimizer and random state; what was loaded
            and what not is logged. Ignored when `checkpoint_dir` holds a checkpoint (the run
            resumes). One process at a time writes a `log_dir` or `checkpoint_dir`: the first
            write takes `<dir>/.termwise.lock`, and another live process's lock is a
            ValueError naming it (a dead one's is taken over with a warning).
        strategy: a `tf.distribute.Strategy`; models and optimizers must be created in its
            scope. None: the current (default) strategy.
        steps_per_execution: at most this many steps per compiled call, or "auto" (the
            default): calls grow (1, 2, 4, ... steps) while each takes under 0.2 s, so on a
            small model they run to the next boundary. A call always stops at the next
            logging, diagnostic, validation, epoch or checkpoint step, so this changes speed,
            not what is logged or saved; on a small model the Python round trip per call costs
            as much as a step (scripts/benchmark.py).
        jit_compile: compile the step with XLA.
        on_nonfinite: "raise" stops with `NonFiniteLossError` naming the term and the step, and
            that step's update is not applied; "skip" drops such steps and counts them
            (`nonfinite/skipped`).
        progress: show a progress bar (True), write absl log lines (False), or decide from
            whether standard output is a terminal (None).
        hparams: extra hyperparameters to record for TensorBoard's HParams dashboard (beside
            the Trainer's own: `optimizer`, `learning_rate`, `weights`, `balancer`, ...; a key
            given here replaces the Trainer's).
        hparams_metrics: scalar tags the HParams table shows, beside the Trainer's own: each
            `eval/<term>`, `eval/<metric>`, `eval/total` and `total/<phase>` (e.g.
            `("eval/fid",)` for a tag the job writes itself).
        histogram_every: every this many steps (a multiple of `grad_log_every`; 0: never), write
            histograms of the weights (`histograms/weights/<variable>`) and of each term's
            weighted gradient (`histograms/grad/<term>`), as Keras's TensorBoard callback's
            `histogram_freq`; it makes those diagnostic steps return every gradient.
        phase_steps: runs per step of a phase, e.g. `{"critic": 5}` for WGAN-GP's critic
            (Gulrajani et al. 2017): each run of a phase is a full update on its own batch.
            A step reads as many batches as its most repeated phase runs; run r of a phase uses
            batch r, so a phase that runs once uses the step's first batch. Its optimizer
            advances once per run; its logged values are the mean over its runs.
        seed: the seed of `seed_generator`, the Trainer's checkpointed source of randomness for
            `compute_terms` (None: drawn from Keras's global seed, `keras.utils.set_random_seed`).

    Random numbers in `compute_terms`: draw them with Keras's random functions from
    `self.seed_generator` (`keras.random.normal(shape, seed=self.seed_generator)`), or from a
    layer's own `keras.random.SeedGenerator`: their states are checkpointed, so a resumed run
    draws what an uninterrupted one would. TensorFlow's stateful ops (`tf.random.normal`, ...)
    keep their state in the op, where no checkpoint reaches it; the Trainer warns once when the
    step uses them. Nothing outside the training steps (`build`, `evaluate`, validation)
    advances the run's random state.

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
        init_from: str | None = None,
        strategy: tf.distribute.Strategy | None = None,
        steps_per_execution: int | str = "auto",
        jit_compile: bool = False,
        on_nonfinite: str = "raise",
        progress: bool | None = None,
        hparams: Mapping[str, object] | None = None,
        phase_steps: Mapping[str, int] | None = None,
        seed: int | None = None,
        hparams_metrics: Sequence[str] = (),
        histogram_every: int = 0,
    ):
        self.model = model
        self._models = options_lib.check_models(model)
        self.phases = options_lib.make_phases(optimizer)
        self.loss = options_lib.check_loss(loss, model)
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
        if steps_per_execution != "auto":
            validation.positive_int("steps_per_execution", steps_per_execution)
        self.steps_per_execution = steps_per_execution
        self.phase_steps = options_lib.check_phase_steps(phase_steps, self.phases)
        if seed is not None:
            validation.non_negative_int("seed", seed)
        self.jit_compile = validation.boolean("jit_compile", jit_compile)
        self.on_nonfinite = validation.one_of("on_nonfinite", on_nonfinite, ON_NONFINITE)
        if progress is not None:
            validation.boolean("progress", progress)
        self.progress = progress
        self._extra_hparams = dict(hparams or {})
        if isinstance(hparams_metrics, str) or not all(
            isinstance(t, str) and t for t in hparams_metrics
        ):
            raise ValueError(
                f"`hparams_metrics` ({hparams_metrics!r}) must be a sequence of scalar tags."
            )
        self._hparams_metrics = tuple(hparams_metrics)
        self.histogram_every = validation.non_negative_int(
            "histogram_every", histogram_every, zero_means="writes no histograms"
        )
        if self.histogram_every and (
            not self.grad_log_every or self.histogram_every % self.grad_log_every
        ):
            raise ValueError(
                f"`histogram_every` ({histogram_every}) must be a multiple of `grad_log_every` "
                f"({self.grad_log_every}): gradient histograms come from the diagnostic steps."
            )
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
            self._stop = self._counter("stop_requested", tf.bool)  # set by a signal; not saved
            self.seed_generator = keras.random.SeedGenerator(seed, name="trainer_seed")
        self._window = Window()
        self._naming = terms_lib.Naming(self.phases)  # term names across phases and modes
        self.term_names: dict[str, tuple[str, ...]] = {}
        self._metrics: dict[str, tf.Tensor] = {}  # add_metric values of the current trace
        self._phase_metrics: dict[str, dict[str, tf.Tensor]] = {}
        self._checked_names: list[tuple] = []
        self._layer_segments: dict[str, tf.Tensor] = {}
        self._layer_names: dict[str, list[str]] = {}
        self._checkpoints = None
        # Run directories: checked now (writing nothing), locked now if they exist (a rerun),
        # else at the first write (`_claim_run_directories`); multi-worker: the chief only.
        for option, directory in (("log_dir", log_dir), ("checkpoint_dir", checkpoint_dir)):
            if directory:
                lock_lib.check_directory(directory, option)
        self._init_from = checkpoints_lib.resolve(init_from) if init_from else None
        self._locks = []
        if self.strategy.extended.should_checkpoint:
            self._locks = [
                lock_lib.RunLock(directory, option)
                for option, directory in lock_lib.lock_directories(log_dir, checkpoint_dir)
            ]
        for run_lock in self._locks:
            run_lock.acquire(create=False)
        self._directories_claimed = False
        if checkpoint_dir:
            trackables = {"step": self._step, "nonfinite_skipped": self._skipped}
            trackables.update({f"model_{k}": m for k, m in self._models.items()})
            trackables.update({f"optimizer_{p.name}": p.optimizer for p in self.phases.values()})
            trackables.update({f"balancer_{k}": b for k, b in self.balancers.items()})
            trackables["trainer_seed"] = self.seed_generator.state
            trackables["window"] = self._window
            seed_states = _seed_states(self._models.values())
            if seed_states:
                trackables["seed_states"] = seed_states
            recorded = {
                f"weight/{n}": fn.spec for n, fn in self.weights.items() if hasattr(fn, "spec")
            }
            recorded.update({f"balancer/{k}": b.spec for k, b in self.balancers.items()})
            recorded.update({f"phase_steps/{k}": v for k, v in self.phase_steps.items()})
            recorded.update(self._extra_hparams)
            self._checkpoints = Checkpoints(
                checkpoint_dir,
                max_checkpoints,
                writer=self.strategy.extended.should_checkpoint,
                worker=options_lib.task_id(self.strategy),
                # created after the restore, matched then: the logging window (first trace),
                # the balancers' state (`_build_balancers`), the data iterator (first fit)
                deferred=("window", "data", *(f"balancer_{k}" for k in self.balancers)),
                options=recorded,
                **trackables,
            )
            if self._locks and all(run_lock.held for run_lock in self._locks):
                self._checkpoints.remove_stale_temps()
        self._writer = None
        self._hparams_written = False
        self._state_ready = False
        self._restored_from = None
        self._train_dataset = None
        self._train_iterator = None
        self._train_functions: dict[bool, object] = {}  # diagnostic -> tf.function
        self._calls: dict[bool, tuple] = {}  # diagnostic -> (iterator, concrete function)
        self._apply_functions: dict[str, object] = {}  # phase -> its update (`_gated_apply`)
        self._compiling = None  # its future: see `_compile_diagnostic_ahead`
        self._ahead = None  # the first call's `_compile_diagnostic_ahead`, set by `fit`
        self._ran = weakref.WeakSet()  # the concrete functions `_run_call` has called
        self._eval_function = None
        self._call_thread = preemption_lib.CallThread()
        self._sizer: CallSizer | None = None  # the steps per compiled call (see `fit`)
        self._random_warning_given = False
        self._raw_weights: dict[str, list] = {}  # use_ema: the raw values while averages show
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

        Default: with one phase, every model's trainable variables; with several phases and a
        dict of models, the trainable variables of `model[phase]`. Override it for any other
        split.

        Raises:
            ValueError: with several phases and a dict of models, for a phase that names none of
                them (which would otherwise train every model).
        """
        if len(self._models) > 1 and len(self.phases) > 1:
            if phase not in self._models:
                raise ValueError(
                    f"Phase {phase!r} names no model: the phases are {list(self.phases)} and the "
                    f"models {sorted(self._models)}. Name each phase (a key of `optimizer`) after "
                    "the model it trains, or override phase_variables."
                )
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

    @tf.autograph.experimental.do_not_convert  # called from converted user code; no tensor flow
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
            with self.strategy.scope(), terms_lib.LossRecorder(), self._random_state_kept():
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
        if self._init_from and self._restored_from:
            logging.info(
                "Resuming from %s: init_from=%s starts new runs only.",
                self._restored_from,
                self._init_from,
            )
        elif self._init_from:
            loaded, skipped = checkpoints_lib.load_model_weights(self._init_from, self._models)
            logging.info(
                "init_from=%s: loaded %d model variables (%s); not loaded: %s. Training starts "
                "at step 0.",
                self._init_from,
                len(loaded),
                ", ".join(loaded),
                "; ".join(skipped) or "none",
            )
        self._layer_segments.clear()
        layer_of = _layer_of_variables(self._models.values())
        for phase in self.phases.values():
            names, segments = gradients_lib.layer_segments(phase.variables, layer_of)
            self._layer_names[phase.name], self._layer_segments[phase.name] = names, segments
        self._state_ready = True

    def _random_states(self) -> list:
        """The variables of every random stream the run draws from (the seed generators)."""
        return [self.seed_generator.state, *_seed_states(self._models.values())]

    @contextlib.contextmanager
    def _random_state_kept(self):
        """Leaves the run's random state as it was (an eager pass outside the steps draws)."""
        states = self._random_states()
        saved = [tf.identity(v) for v in states]
        try:
            yield
        finally:
            for variable, value in zip(states, saved, strict=True):
                variable.assign(value)

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
        with clean_errors(), self._random_state_kept():
            self._prepare_state(dataset)
            batch = data_lib.first_batch(dataset, "data")
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
        if data_lib.is_python_fed(dataset) and self.checkpoint_data and self._checkpoints:
            self._drop_data_position(
                "it is read through Python, a PyDataset or a generator, so a checkpoint "
                "cannot hold its position"
            )
        repeated = dataset if data_lib.is_read_once(dataset) else dataset.repeat()
        iterator, symbolic = self._positioned_iterator(repeated)
        if self._checkpoints is not None and self._train_iterator is None:
            spec = repr(dataset.element_spec)  # another batch size cannot continue the position
            spec += data_lib.SYMBOLIC if symbolic else ""  # nor another kind of position
            if self._restored_from and self.checkpoint_data:
                self._checkpoints.restore_data(iterator, spec)
            else:
                self._checkpoints.data_spec = spec
        self._train_dataset, self._train_iterator = dataset, iterator
        return iterator

    def _positioned_iterator(self, repeated: tf.data.Dataset):
        """The training iterator, and whether checkpoints keep its position symbolically.

        See `data.py`: symbolic (exact) where checkpoints hold a position; a pipeline whose
        functions hold state is saved without one, said before the first step, as a
        PyDataset's is.
        """
        if self._checkpoints is not None and self.checkpoint_data:
            problem = data_lib.position_problem(repeated)
            if problem is None:
                with self.strategy.scope():
                    return self._distribute(data_lib.with_symbolic_position(repeated)), True
            self._drop_data_position(problem)
        with self.strategy.scope():
            return self._distribute(repeated), False

    def _drop_data_position(self, why: str, *, from_now_on: bool = False) -> None:
        """Saves checkpoints without the training data's position from now on, and says so."""
        logging.warning(
            "The training data's position cannot be saved in checkpoints (%s): they are saved "
            "without it%s, and a resumed run starts the data from its beginning.",
            why,
            " from now on" if from_now_on else "",
        )
        self.checkpoint_data = False

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
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
    ) -> History:
        """Trains for `steps` more steps (or `epochs` passes, or until a global step).

        Args:
            data: a `tf.data.Dataset` of batches, arrays (`(x, y[, sample_weight])`) to batch
                and reshuffle every pass, a `keras.utils.PyDataset`, or a Python generator of
                batches (read once; its first batch gives the structure). It is repeated as
                needed; the same object passed again continues where the last `fit` stopped.
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
            callbacks: Keras callbacks (`EarlyStopping`, `ReduceLROnPlateau`,
                `ModelCheckpoint`, ...), driven as `keras.Model.fit` drives them; see
                `termwise.trainer.callbacks` for the epochs and the keys they can monitor.

        Returns:
            A `keras.callbacks.History` (`termwise.trainer.callbacks.History`) whose `history`
            holds every logged value at every logged step, `steps` those steps, and `last` the
            latest value of each: `loss/<term>`, `weight/<term>`, `weighted/<term>`,
            `share/<term>`, `total/<phase>`, the metrics, `optimizer/<phase>/learning_rate`,
            `perf/...`, `eval/...`, and on diagnostic steps (multiples of `grad_log_every`)
            `grad_norm/<term>`, `grad_cosine/<term>`, `grad_share/<term>` and
            `grad_conflict/<phase>`. Term values are means over the steps since the previous
            logged step, as Keras reports running means; weights too.

        Raises:
            ValueError: on bad arguments or term names, before any update.
            NonFiniteLossError: with `on_nonfinite="raise"`, when a term becomes NaN or Inf.
        """
        validation.positive_int("batch_size", batch_size)
        if sum(x is not None for x in (steps, epochs, until_step)) > 1:
            raise ValueError(
                f"Give one of `steps` ({steps!r}), `epochs` ({epochs!r}) and `until_step` "
                f"({until_step!r}), not several."
            )
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if not isinstance(callback, keras.callbacks.Callback):
                raise ValueError(
                    f"`callbacks` holds {callback!r}, which is not a keras.callbacks.Callback."
                )
        dataset = data_lib.as_dataset(data, batch_size=batch_size, shuffle=True)
        per_pass = data_lib.batches_per_pass(dataset)
        if per_pass is not None:
            if per_pass == 0:
                raise ValueError(
                    "`data` holds no batch (an empty dataset, or fewer examples than one batch "
                    "with drop_remainder): nothing to train on."
                )
            per_pass = max(per_pass // self._batches_per_step, 1)
        with clean_errors():
            self._prepare_state(dataset)
        self._claim_run_directories()  # before any step: the lock, the directories, restart
        self._restore_raw_weights()
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
        history = History()
        if steps == 0:
            history.record(self.step, self._last_logs)
            return history
        if bool(self._halted.numpy()):  # a NonFiniteLossError stopped the last fit: go on
            self._halted.assign(False)

        with clean_errors():
            self._build_balancers(dataset)
            iterator = self._train_iterator_for(dataset)
            self._concrete(iterator, diagnostic=False)  # traces: term and weights checks here
        # Traced while the first call runs (see `_run_call`), instantiated beside it.
        self._ahead = functools.partial(self._compile_diagnostic_ahead, iterator)
        self._warn_stateful_random()
        self._write_hparams()
        start = self.step
        steps_per_epoch = per_pass or (validation_every if validation_data is not None else None)
        guard = preemption_lib.SignalGuard(self._request_stop, self._signals())
        actions_list = [
            actions.Diagnose(self, self.grad_log_every, history),
            actions.LogScalars(self, self.log_every, history),
        ]
        if validation_data is not None:
            actions_list.append(actions.Validate(self, validation_every, validation_data, history))
        actions_list.append(KerasCallbacks(self, callbacks, steps_per_epoch, history))
        if self._checkpoints is not None:
            actions_list.append(actions.SaveCheckpoints(self, self.checkpoint_every))
        actions_list.append(actions.ShowProgress(self.log_every, self.progress))
        actions_list.append(preemption_lib.Interrupt(guard, self._report_interrupt))
        calls = None if self.steps_per_execution == "auto" else self.steps_per_execution
        if self._multi_worker:
            calls = calls or 100  # every worker must run the same calls (see ClusterPreemption)
            if self._checkpoints is not None:
                actions_list.append(self._cluster_preemption())
        if self._sizer is None or self._sizer.fixed != calls:
            # One per Trainer: a later fit starts at the call size the last one reached, not at
            # one step (a fit of 1,000 VAE steps spent 7 of its 17 calls growing back to 100).
            self._sizer = CallSizer(calls)
        controller = Controller(
            lambda count, diagnostic: self._run_call(iterator, count, diagnostic, guard),
            actions_list,
            start=start,
            end=start + steps,
            sizer=self._sizer,
            diagnostic_every=self.grad_log_every,
        )
        self._stop.assign(False)
        try:
            with guard, clean_errors():
                state = controller.run()
        finally:
            self._stop.assign(False)
            if self._writer is not None:
                self._writer.flush()
        self._last_logs = dict(state.logs)
        return history

    @property
    def _batches_per_step(self) -> int:
        return max(self.phase_steps.values(), default=1)

    def _run_call(self, iterator, count: int, diagnostic: bool, guard) -> dict:
        """One compiled call of up to `count` steps; raises if a term became non-finite."""
        function = self._concrete(iterator, diagnostic)
        steps = tf.constant(count, tf.int32)
        ahead, self._ahead = self._ahead, None  # the fit's first call: the diagnostic trace
        concrete = self._calls[diagnostic][1]
        first_run = concrete not in self._ran  # its time is mostly the graph's instantiation
        self._ran.add(concrete)

        writer = self._writer

        def timed():  # the call's own time, for the call sizer: not the trace run beside it
            began = time.perf_counter()
            if writer is not None:  # the writes held since the last call run beside this one
                writer.release()
            out = function(iterator, steps)
            if writer is not None:
                writer.hold()
            # A function's first call says nothing of its steps' time: it does not stop growth.
            return {**out, "seconds": 0.0 if first_run else time.perf_counter() - began}

        try:
            if guard.active:  # in a worker thread, so that a signal is handled at once
                outputs = self._call_thread(timed, meanwhile=ahead)
            else:
                if ahead is not None:
                    ahead()
                outputs = timed()
        except tf.errors.OutOfRangeError:  # a generator's data ran out
            logging.warning("The training data ran out at step %d: fit stops there.", self.step)
            return {"step": self.step, "halted": False, "stop": "the data ran out"}
        if self.on_nonfinite == "raise" and bool(outputs["halted"]):
            self._raise_nonfinite()
        return outputs

    @property
    def _multi_worker(self) -> bool:
        return isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def _signals(self) -> tuple:
        """The signals `fit` handles itself: SIGTERM and SIGINT (not SIGTERM under MWMS)."""
        import signal

        if self._multi_worker:
            return (signal.SIGINT,)
        return (signal.SIGTERM, signal.SIGINT)

    def _cluster_preemption(self):
        """The MWMS preemption action (one per Trainer: it installs TensorFlow's handler)."""
        if getattr(self, "_cluster_handler", None) is None:
            self._cluster_handler = preemption_lib.ClusterPreemption(
                self.strategy, self.save, self._report_interrupt
            )
        return self._cluster_handler

    def _request_stop(self, signum: int) -> None:
        """A signal arrived: the call in flight ends after the step it is in."""
        del signum
        self._stop.assign(True)

    def _report_interrupt(self, signum: int, step: int) -> None:
        """Before exiting on a signal: flush, and say where the run stopped and how to resume."""
        import signal
        import sys

        if self._writer is not None:
            self._writer.flush()
        where = (
            f"checkpoint saved in {self.checkpoint_dir}; rerun the same command to resume"
            if self._checkpoints is not None
            else "no checkpoint_dir, so nothing was saved"
        )
        print(
            f"{signal.Signals(signum).name} at step {step}: {where}.", file=sys.stderr, flush=True
        )

    def _warn_stateful_random(self) -> None:
        """Warns once when the step draws from TensorFlow's stateful random ops."""
        if self._random_warning_given:
            return
        self._random_warning_given = True
        found = set()
        for concrete in (c for _, c in self._calls.values()):
            graph_def = concrete.graph.as_graph_def()
            nodes = list(graph_def.node)
            for function in graph_def.library.function:
                nodes.extend(function.node_def)
            found.update(n.op for n in nodes if n.op in _STATEFUL_RANDOM_OPS)
        if found:
            logging.warning(
                "compute_terms draws random numbers with TensorFlow's stateful ops (%s: "
                "tf.random.normal and the like), whose state no checkpoint holds: a resumed run "
                "draws other numbers than an uninterrupted one. Draw from the Trainer's "
                "checkpointed generator instead: keras.random.normal(shape, "
                "seed=self.seed_generator).",
                ", ".join(sorted(found)),
            )

    def _write_diagnostics(
        self, step: int, scalars, matrices, layer_norms, gradients=None, messages=()
    ) -> None:
        """Writes a diagnostic step's gradient tags, heatmaps, layer shares and warnings.

        Args:
            step: the global step.
            scalars: the `grad_*` tags.
            matrices: phase to its [T, T] pairwise cosines.
            layer_norms: phase to its [T, L] per-layer norms of the weighted terms' gradients.
            gradients: term to its flat weighted gradient (with `histogram_every`), or None.
            messages: the dominance warnings given at this step (also on stderr).
        """
        if self.writer is None:
            return
        self._write(step, scalars)
        for phase, matrix in matrices.items():
            self.writer.cosine_matrix(phase, self.term_names[phase], matrix, step)
        for phase, norms in layer_norms.items():
            layers = self._layer_names.get(phase, [])
            self.writer.layer_norms(phase, self.term_names[phase], layers, norms, step)
        if messages:
            self.writer.text("warnings/dominance", "\n\n".join(messages), step)
        if self.histogram_every and step % self.histogram_every == 0:
            values = {
                f"histograms/weights/{getattr(v, 'path', v.name)}": np.asarray(v)
                for phase in self.phases.values()
                for v in phase.variables
            }
            values.update({f"histograms/grad/{t}": g for t, g in (gradients or {}).items()})
            self.writer.histograms(step, values)

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
                shapes = [v.shape for v in self.phases[phase_name].variables]
                balancer.build(names[phase_name], shapes=shapes)
        for phase_name, balancer in self.balancers.items():
            if phase_name not in self._balancer_targets:
                self._balancer_targets[phase_name] = self._target_indices(phase_name, balancer)
        if self._restored_from:
            self._checkpoints.restore_extra(**{f"balancer_{k}": b for k, b in pending.items()})

    def _layer_named(self, name: str, option: str = "representation") -> keras.layers.Layer:
        """The models' layer of that name, for a balancer's `layer` or `representation`."""
        layers = {}
        for model in self._models.values():
            for layer in model._flatten_layers(include_self=True, recursive=True):
                layers.setdefault(layer.name, layer)
        if name not in layers:
            raise ValueError(
                f"`balancer` {option} {name!r} is not a layer of the model; "
                f"layers: {sorted(layers)}."
            )
        return layers[name]

    def _target_indices(self, phase_name: str, balancer) -> list[int] | None:
        """Positions in the phase's variables of the balancer's target layer (None: all)."""
        if balancer.representation is not None:
            self._layer_named(balancer.representation)  # checked before training
        if balancer.layer is None:
            return None
        wanted = {
            id(v) for v in self._layer_named(balancer.layer, "target layer").trainable_variables
        }
        phase = self.phases[phase_name]
        indices = [i for i, v in enumerate(phase.variables) if id(v) in wanted]
        if not indices:
            raise ValueError(
                f"`balancer` target layer {balancer.layer!r} has no trainable variables in "
                f"phase {phase_name!r}."
            )
        return indices

    def _optimizer_logs(self) -> dict[str, float]:
        """Each phase's current learning rate, `optimizer/<phase>/learning_rate`."""
        return {
            f"optimizer/{phase.name}/learning_rate": float(
                np.asarray(phase.optimizer.learning_rate)
            )
            for phase in self.phases.values()
        }

    def _raise_nonfinite(self):
        index = int(self._nonfinite_index.numpy())
        at = int(self._nonfinite_step.numpy())
        phase, run, kind, term = self._checked_names[index]
        where = f"phase {phase!r}" + (
            f", run {run + 1} of {self.phase_steps[phase]}"
            if self.phase_steps.get(phase, 1) > 1
            else ""
        )
        if kind == "gradient":
            what = f"The gradient of {where} became NaN or Inf"
        elif kind == "weight":
            fn = self.weights.get(term)
            spec = getattr(fn, "spec", None)
            what = (
                f"The weight of term {term!r} ({where}"
                + (f", schedule {spec!r}" if spec else "")
                + ") became NaN or Inf"
            )
        elif kind == "balancer":
            balancer = self.balancers[phase]
            what = (
                f"Balancer {balancer.spec!r} ({where}) needs {balancer.precondition}, and "
                f"term {term!r} broke it"
            )
        else:
            what = f"Loss term {term!r} ({where}) became NaN or Inf"
        raise NonFiniteLossError(
            f"{what} at step {at}; that step's update was not applied and training stopped at "
            f"global step {self.step}. Pass on_nonfinite='skip' to drop such steps instead."
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
        with clean_errors(), self._random_state_kept():
            sums = self._evaluate_sums(dataset)
        examples = sums.pop("examples", 0.0)
        if not examples:
            raise ValueError("`data` for evaluate holds no examples.")
        results = {k: v / examples for k, v in sums.items()}
        self._write(self.step, {f"eval/{k}": v for k, v in results.items()})
        if self._writer is not None:
            self._writer.flush()
        return results

    def _evaluate_sums(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Example-weighted sums of every evaluated value over `dataset`."""
        self._prepare_state(dataset)
        if self._eval_function is None:
            self._eval_function = self._make_eval_function()
        iterator = self._distribute(dataset)
        per_pass = data_lib.batches_per_pass(dataset)
        most = 100 if self.steps_per_execution == "auto" else self.steps_per_execution
        sums: dict[str, float] = {}

        def add(outputs):
            for k, v in outputs.items():
                sums[k] = sums.get(k, 0.0) + float(v)

        if per_pass is not None:
            remaining = per_pass
            while remaining > 0:
                count = min(most, remaining)
                add(self._eval_function(iterator, tf.constant(count, tf.int32)))
                remaining -= count
        else:
            while True:
                try:
                    add(self._eval_function(iterator, tf.constant(1, tf.int32)))
                except (tf.errors.OutOfRangeError, StopIteration):
                    break
        return sums

    # ----------------------------------------------------------------------------------------
    # Averaged weights (an optimizer's `use_ema`).

    def _ema_phases(self) -> list:
        return [p for p in self.phases.values() if getattr(p.optimizer, "use_ema", False)]

    def _finalize_averages(self) -> None:
        """Puts the averaged weights into the model(s), as `keras.Model.fit` does at its end.

        The raw weights are kept: the next `fit` (and `save`) puts them back first, so training
        continues exactly as if the averages had never been shown.
        """
        for phase in self._ema_phases():
            if phase.name in self._raw_weights:
                continue
            self._raw_weights[phase.name] = [tf.identity(v) for v in phase.variables]
            phase.optimizer.finalize_variable_values(phase.variables)

    def _restore_raw_weights(self) -> None:
        for phase in self.phases.values():
            raw = self._raw_weights.pop(phase.name, None)
            if raw is not None:
                for variable, value in zip(phase.variables, raw, strict=True):
                    variable.assign(value)

    @contextlib.contextmanager
    def _raw_weights_in(self):
        """The raw weights in the models for the duration (a save after `fit`)."""
        averaged = {
            name: [tf.identity(v) for v in self.phases[name].variables]
            for name in self._raw_weights
        }
        raw = dict(self._raw_weights)
        self._restore_raw_weights()
        try:
            yield
        finally:
            for name, values in averaged.items():
                for variable, value in zip(self.phases[name].variables, values, strict=True):
                    variable.assign(value)
            self._raw_weights.update(raw)

    # ----------------------------------------------------------------------------------------
    # Files.

    @property
    def writer(self) -> SummaryWriter | None:
        """The TensorBoard writer; subclasses add images through it.

        None without `log_dir`, and on every worker of a multi-worker cluster but the chief:
        the workers run the same steps, and one of them writes.
        """
        if self._writer is None and self.log_dir and self.strategy.extended.should_save_summary:
            self._writer = SummaryWriter(self.log_dir, self.term_names)
        return self._writer

    def _write(self, step: int, values: Mapping[str, float]) -> None:
        """Writes scalars: `add_metric` values as `metric/<name>`, each term's also to its run."""
        if self.writer is not None:
            if self.writer.term_names != self.term_names:
                self.writer.set_terms(self.term_names)
            self.writer.scalars(
                step, {summaries.metric_tag(k): v for k, v in values.items() if k != "examples"}
            )

    def _hparam_values(self) -> dict[str, object]:
        """The run's hyperparameters: every key always written, none twice, no tag-like names.

        One phase: `optimizer`, `learning_rate`; several: `optimizer_<phase>`,
        `learning_rate_<phase>`. Then `weights` (`term=schedule, ...`, or "none"), `balancer`
        (its spec, `phase=spec; ...` with several phases, or "none"), `replicas`,
        `on_nonfinite`, and the `hparams` given to the Trainer (which win).
        """
        values: dict[str, object] = {}
        phases = list(self.phases.values())
        for phase in phases:
            suffix = "" if len(phases) == 1 else f"_{phase.name}"
            optimizer = getattr(phase.optimizer, "inner_optimizer", phase.optimizer)
            values[f"optimizer{suffix}"] = type(optimizer).__name__
            values[f"learning_rate{suffix}"] = float(np.asarray(phase.optimizer.learning_rate))
        weights = [f"{n}={_weight_spec(fn)}" for n, fn in self.weights.items()]
        values["weights"] = ", ".join(weights) or "none"
        if len(phases) == 1:
            balancer = self.balancers.get(phases[0].name)
            values["balancer"] = balancer.spec if balancer is not None else "none"
        else:
            specs = [f"{k}={b.spec}" for k, b in self.balancers.items()]
            values["balancer"] = "; ".join(specs) or "none"
        values["replicas"] = self.strategy.num_replicas_in_sync
        values["on_nonfinite"] = self.on_nonfinite
        values.update(self._extra_hparams)
        return values

    def _hparam_metrics(self) -> list[str]:
        """The HParams table's columns: final evaluations and totals (see `hparams_metrics`)."""
        tags = [f"eval/{n}" for names in self.term_names.values() for n in names]
        window = self._window.keys or ()
        tags += [
            f"eval/{k}"
            for k in window
            if k != "examples" and summaries.metric_tag(k).startswith("metric/")
        ]
        phases = list(self.phases)
        tags += ["eval/total"] if len(phases) == 1 else [f"eval/total/{p}" for p in phases]
        tags += [f"total/{p}" for p in phases]
        return list(dict.fromkeys([*tags, *self._hparams_metrics]))

    def _write_hparams(self) -> None:
        """At the first fit of this process: the hparams session and the `run/summary` text."""
        if self._hparams_written or self.writer is None:
            return
        import sys

        import termwise

        self.writer.set_terms(self.term_names)
        values = self._hparam_values()
        self.writer.hparams(values, self._hparam_metrics(), step=self.step)
        weights = {
            phase: [(n, _weight_spec(self.weights[n]) if n in self.weights else "1") for n in names]
            for phase, names in self.term_names.items()
        }
        summary = summaries.run_summary(
            command=list(sys.argv),
            versions={
                "Termwise": termwise.__version__,
                "TensorFlow": tf.__version__,
                "Keras": keras.__version__,
            },
            phases=weights,
            balancers={k: b.spec for k, b in self.balancers.items()},
            options=values,
        )
        self.writer.text("run/summary", summary, self.step)
        self._hparams_written = True

    def save(self) -> str | None:
        """Saves a checkpoint at the current step (None without `checkpoint_dir`).

        With an optimizer's `use_ema`, after `fit` the models show the averaged weights; the
        checkpoint still holds the raw ones (and the optimizer the averages).
        """
        if self._checkpoints is None:
            return None
        self._claim_run_directories()
        if self._raw_weights:
            with self._raw_weights_in():
                return self._save()
        return self._save()

    def _save(self) -> str:
        data = self._train_iterator if self.checkpoint_data else None
        path = self._checkpoints.save(self.step, data=data)
        if data is not None and self._checkpoints.data_error:
            self._drop_data_position(self._checkpoints.data_error, from_now_on=True)
        return path

    def _claim_run_directories(self) -> None:
        """Before the first write: the run directories' locks (creating the directories), the
        removal of unfinished saves, and on a resume the restart event and its changes."""
        if self._directories_claimed:
            return
        for run_lock in self._locks:
            run_lock.acquire()
        if self._checkpoints is not None:
            self._checkpoints.prepare(remove_temps=bool(self._locks))
        self._directories_claimed = True
        if self._restored_from and self.writer is not None:
            notes = self._checkpoints.notes
            if notes:
                notes = [f"Resumed at step {self.step} from {self._restored_from}:", *notes]
            self.writer.restart(self.step + 1, notes)
