"""Speed of the Trainer against `keras.Model.fit` and hand-written loops, as ratios from one run.

    python scripts/benchmark.py --json=bench.json --markdown=bench.md    # ~15 min, 2 idle cores
    python scripts/benchmark.py --models=vae,cnn --repeats=7              # a subset, more repeats
    python scripts/benchmark.py --quick                                   # a tiny run (tests)

Never a timed assertion in a test: the machines are shared and noisy, so every number that
matters here is a ratio between contenders measured in the same run.

Each reference model (`termwise.models.vae`, `cnn`, `lstm`, `gan`, built by its own builder with
fixed seeds, on its default offline data from `termwise.models.data`: the 8x8 digits, or the
generated Mackey-Glass series) is trained by seven contenders, each on its own copy of the same
model (the same initial weights) and its own copy of the same `tf.data` pipeline:

* trainer_defaults: the model's Trainer subclass with its defaults, `progress=False` and nothing
  else (`steps_per_execution`, `log_every=100`, `grad_log_every=100`, no `log_dir`);
* trainer_logging: `log_every=100, grad_log_every=100` and a `log_dir` (a temporary directory):
  TensorBoard scalars, gradient diagnostics and cosine images written every 100 steps;
* trainer_quiet: `log_every=0, grad_log_every=0` (logs only the last step of each `fit`); the
  ratio of the two is the cost of logging plus diagnostics;
* fit_defaults: `keras.Model.fit` on the same model with `compile`'s defaults (one step per
  call; `verbose=0`, as the Trainer's `progress=False`); for the GAN, a `keras.Model` whose
  `train_step` runs both updates, as in the keras.io DCGAN and WGAN-GP examples;
* fit_spe: the same at the Trainer's default `steps_per_execution` (with "auto", whose calls
  run to the next logging and diagnostic step: 100);
* handwritten: a `tf.function` step (tape, the same terms, `optimizer.apply` per phase) called
  once per step from Python, as a researcher writes it;
* folded: that same step, 100 steps per graph call (a `tf.range` loop inside one
  `tf.function`): the practical limit of the per-call overhead.

Every contender computes the same terms with the same weights (1). Two differences remain, and
they are the frameworks': `fit` sums `add_loss` values over the batch where the Trainer averages
them (the same operations, so the same cost), and the Trainer subclasses log their metrics
(accuracy, sparsity, persistence error) beside the terms, which the other contenders do not
compute.

Throughput: all contenders of a model are built in this process, warmed up (`--warmup` steps,
which cross the first logging and diagnostic step), then timed in turn, `--repeats` times, the
order rotating every repeat; the median steps per second of each is reported with its ratio
to the hand-written loop and to the folded limit: the median over the repeats of the two
contenders' ratio in the same repeat (`paired_ratio`), which the machine's drift between
repeats moves less than the ratio of medians. While they are timed, the objects built so
far are frozen out of garbage collection (`gc.freeze`), so that no contender's collections
scan the other six.

Start-up: each contender first runs alone in a fresh subprocess (the first call pays for
tracing and for whatever TensorFlow loads on first use; peak memory is only the contender's
there): the time from calling `fit` (or the first call) to the first step done (a `fit` with
`steps_per_execution=k` returns after k steps), the wall time of the first 1,000 steps
(logging and diagnostic steps, and the tracing of the diagnostic step, included) against as
many steps at the steady state (one timed window run right after, in the same process), the
same without the first call, and the peak resident set (VmHWM, beside the resident set before
the first call).

Cost as the number of terms grows: a shared-encoder model with T heads (one term each, T = 2,
4, 8, 16) under the Trainer, every contender at `steps_per_execution=5`: a plain step, a
diagnostic step (estimated from `grad_log_every=5`, one per call: 1 + 5 (p / d - 1) plain
steps, for p and d steps per second) and a step of the gradient balancers `pcgrad` and `mgda`,
in plain steps.

Targets (BUILD.md): trainer_defaults >= 0.9x folded on the VAE and the CNN; >= 1.0x fit_spe;
time to first step <= fit_defaults'; the steps after the first call within 10% of the steady
state; logging and diagnostics every 100 steps cost <= 5% (trainer_logging vs trainer_quiet).

Only `termwise.Trainer`'s public constructor options and `fit(data, steps=...)` /
`fit(data, until_step=...)` are used, so the script runs against older trees too:
`PYTHONPATH=/path/to/other/tree python scripts/benchmark.py` measures that tree's `termwise`
(the header names the tree and its commit).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import termwise  # noqa: E402
from termwise import losses  # noqa: E402
from termwise.models import cnn, gan, lstm, vae  # noqa: E402
from termwise.models import data as data_lib  # noqa: E402
from termwise.trainer import Trainer  # noqa: E402

MODELS = ("vae", "cnn", "lstm", "gan")
CONTENDERS = (
    "trainer_defaults",
    "trainer_logging",
    "trainer_quiet",
    "fit_defaults",
    "fit_spe",
    "handwritten",
    "folded",
)
FOLD = 100  # steps per graph call of the folded limit
TERM_COUNTS = (2, 4, 8, 16)
# The T table: every contender at steps_per_execution=DIAGNOSTIC_EVERY, the diagnostic one with
# grad_log_every=DIAGNOSTIC_EVERY (one diagnostic step per call, the same calls as the others).
DIAGNOSTIC_EVERY = 5
SPE = inspect.signature(Trainer).parameters["steps_per_execution"].default
# fit_spe's steps per call: the Trainer's default, or with "auto" (calls that run to the next
# logging and diagnostic step, every 100 steps by default) 100, what its calls then run.
FIT_SPE = 100 if SPE == "auto" else SPE
STARTUP_PREFIX = "STARTUP_JSON "

# Timed steps per window by default: windows of a second or more on 2 CPU cores.
STEPS = {"vae": 1000, "cnn": 200, "lstm": 200, "gan": 100, "terms": 500}

# What --quick changes (flags given explicitly keep their values).
QUICK = {"steps": 5, "repeats": 1, "warmup": 0, "first_steps": 5, "terms": "2", "isolate": False}


def _quick(name: str) -> str:
    value = QUICK[name]
    return f" --quick: {str(value).lower() if isinstance(value, bool) else value}."


flags.DEFINE_list("models", list(MODELS), f"Models to benchmark, a subset of {','.join(MODELS)}.")
flags.DEFINE_integer(
    "steps",
    None,
    "Timed steps per contender per repeat, for every model (a multiple of 100 holds every 100th "
    "step's diagnostics exactly). Default: "
    + ", ".join(f"{n} for the {k if k != 'terms' else 'T table'}" for k, n in STEPS.items())
    + " (a second or more per window on 2 cores)."
    + _quick("steps"),
)
flags.DEFINE_integer(
    "repeats", 5, "Timed repeats of each contender; medians are reported." + _quick("repeats")
)
flags.DEFINE_integer(
    "warmup",
    110,
    "Steps each contender runs before it is timed (tracing everything: 110 crosses the first "
    "logging and diagnostic step, at 100)." + _quick("warmup"),
)
flags.DEFINE_integer(
    "first_steps",
    1000,
    "The early window of the start-up runs (from the first call), set against the steady "
    "state (the median throughput)." + _quick("first_steps"),
)
flags.DEFINE_list(
    "terms",
    [str(t) for t in TERM_COUNTS],
    "Term counts T of the cost-per-term table (empty: no table)." + _quick("terms"),
)
flags.DEFINE_integer("batch_size", 64, "Batch size of every model (the scripts' default).")
flags.DEFINE_string("json", None, "Write the results to this JSON file.")
flags.DEFINE_string("markdown", None, "Write the results as Markdown tables to this file.")
flags.DEFINE_boolean(
    "quick",
    False,
    "A tiny run that checks that the script works, not how fast anything is (about a minute "
    "for all four models): the --quick values of the other flags.",
)
flags.DEFINE_boolean(
    "isolate",
    True,
    "Measure each contender's start-up (first step, first steps, peak memory) in a fresh "
    "subprocess; false: in this process, right after building it (the first step then "
    "profits from what earlier contenders loaded, and peak memory is not separable)."
    + _quick("isolate"),
)
flags.DEFINE_string(
    "startup",
    None,
    "Internal: MODEL/CONTENDER: run that contender's start-up measurement alone in this "
    f"process and print it as one line starting with {STARTUP_PREFIX.strip()}.",
)
FLAGS = flags.FLAGS


@flags.validator("models", message=f"--models must name some of {', '.join(MODELS)}.")
def _known_models(value):
    return bool(value) and all(m in MODELS for m in value)


@flags.validator("terms", message="--terms must be positive integers, e.g. 2,4,8,16 (empty: none).")
def _term_counts(value):
    return all(v.isdigit() and int(v) > 0 for v in value)


for _name in ("repeats", "first_steps", "batch_size"):
    flags.register_validator(_name, lambda v: v > 0, message=f"--{_name} must be positive.")
flags.register_validator("steps", lambda v: v is None or v > 0, message="--steps must be positive.")
flags.register_validator("warmup", lambda v: v >= 0, message="--warmup must be >= 0.")


# ------------------------------------------------------------------------------------------------
# The models: data, builders, Trainer subclasses, and the same terms written by hand.


def _pipeline(arrays, batch_size: int) -> tf.data.Dataset:
    """The one pipeline of every contender: reshuffled every pass, full batches, repeated."""
    return (
        tf.data.Dataset.from_tensor_slices(arrays)
        .shuffle(len(arrays[0]), seed=0, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )


def _mean_added_losses(model) -> tf.Tensor:
    """The model's `add_loss` values reduced as the Trainer reduces terms (mean over examples)."""
    values = [tf.reduce_mean(tf.cast(v, tf.float32)) for v in model.losses]
    return tf.add_n(values) if values else tf.constant(0.0)


class Problem:
    """One reference model: its data, builder, Trainer subclass and hand-written terms.

    `phases(model, optimizer)` returns `(optimizer, variables, loss_fn)` per phase, in the
    Trainer's order; `loss_fn(batch)` is the phase's total, computed as its Trainer computes it.
    """

    name = ""
    title = ""
    learning_rate = 1e-3

    def __init__(self):
        self.arrays = self.load()

    def load(self):
        raise NotImplementedError

    def dataset(self, batch_size: int) -> tf.data.Dataset:
        return _pipeline(self.arrays, batch_size)

    def build(self):
        raise NotImplementedError

    def optimizer(self):
        return keras.optimizers.Adam(self.learning_rate)

    def trainer(self, model, optimizer, **options) -> Trainer:
        raise NotImplementedError

    def phases(self, model, optimizer):
        raise NotImplementedError

    def fit_model(self, model, optimizer, compile_options) -> tuple[keras.Model, object]:
        """(a compiled model for `fit`, the optimizer whose `iterations` count its steps)."""
        raise NotImplementedError


class VAEProblem(Problem):
    name = "vae"
    title = "VAE (dense, latent 16) on the 8x8 digits"
    learning_rate = 2e-3

    def load(self):
        x = data_lib.load_images("digits", seed=0).x_train
        return (x, x)

    def build(self):
        keras.utils.set_random_seed(0)
        model, _, _ = vae.build_vae(self.arrays[0].shape[1:], latent_dim=16, seed=0)
        return model

    def trainer(self, model, optimizer, **options):
        return vae.VAETrainer(model, optimizer, **options)

    def phases(self, model, optimizer):
        def loss(batch):
            images, _ = batch
            logits = tf.cast(model(images, training=True), tf.float32)
            reconstruction = tf.reduce_mean(losses.bernoulli_nll(images, logits))
            return reconstruction + _mean_added_losses(model)

        return [(optimizer, model.trainable_variables, loss)]

    def fit_model(self, model, optimizer, compile_options):
        model.compile(optimizer, loss=losses.bernoulli_nll, **compile_options)
        return model, optimizer


class CNNProblem(Problem):
    name = "cnn"
    title = "CNN with L1 activation sparsity on conv1, conv2, on the 8x8 digits"
    sparsity_layers = ("conv1", "conv2")

    def load(self):
        split = data_lib.load_images("digits", seed=0)
        return (split.x_train, split.y_train)

    def build(self):
        keras.utils.set_random_seed(0)
        classifier = cnn.build_cnn(self.arrays[0].shape[1:], 10)
        model, _ = cnn.add_penalties(classifier, self.sparsity_layers)
        return model

    def trainer(self, model, optimizer, **options):
        return cnn.CNNTrainer(
            model, optimizer, sparsity_layers=list(self.sparsity_layers), **options
        )

    def phases(self, model, optimizer):
        def loss(batch):
            images, labels = batch
            logits, *_ = model(images, training=True)
            cross_entropy = keras.losses.sparse_categorical_crossentropy(
                labels, tf.cast(logits, tf.float32), from_logits=True
            )
            return tf.reduce_mean(cross_entropy) + _mean_added_losses(model)

        return [(optimizer, model.trainable_variables, loss)]

    def fit_model(self, model, optimizer, compile_options):
        cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        none = [None] * len(self.sparsity_layers)  # the activations outputs carry no loss
        model.compile(optimizer, loss=[cross_entropy, *none], **compile_options)
        return model, optimizer


class LSTMProblem(Problem):
    name = "lstm"
    title = "LSTM forecaster (64 units, window 24) with a KL on its activations, Mackey-Glass"
    learning_rate = 3e-3

    def load(self):
        split = data_lib.load_forecast("mackey_glass", window=24, horizon=8)
        return (split.x_train, split.y_train)

    def build(self):
        keras.utils.set_random_seed(0)
        return lstm.build_lstm(24, units=64)

    def trainer(self, model, optimizer, **options):
        return lstm.LSTMTrainer(model, optimizer, **options)

    def phases(self, model, optimizer):
        def loss(batch):
            history, target = batch
            forecast = tf.cast(model(history, training=True), tf.float32)
            mse = tf.reduce_mean(losses.mean_squared_error(tf.cast(target, tf.float32), forecast))
            return mse + _mean_added_losses(model)

        return [(optimizer, model.trainable_variables, loss)]

    def fit_model(self, model, optimizer, compile_options):
        model.compile(optimizer, loss=losses.mean_squared_error, **compile_options)
        return model, optimizer


class GANProblem(Problem):
    """The GAN job's defaults: non-saturating loss, R1 (gamma 0.1), L2 feature matching."""

    name = "gan"
    title = "DCGAN-style GAN (R1 0.1, feature matching) on the 8x8 digits, two phases"
    learning_rate = 5e-4
    r1_gamma = 0.1

    def load(self):
        x = data_lib.load_images("digits", seed=0).x_train
        return (x, x)

    def build(self):
        keras.utils.set_random_seed(0)
        generator, discriminator = gan.build_gan(
            self.arrays[0].shape[1:], latent_dim=32, width=32, seed=0
        )
        return {"generator": generator, "discriminator": discriminator}

    def optimizer(self):
        return {phase: gan.gan_optimizer(self.learning_rate) for phase in gan.PHASES}

    def trainer(self, model, optimizer, **options):
        return gan.GANTrainer(model, optimizer, **options)

    def phases(self, model, optimizer):
        generator, discriminator = model["generator"], model["discriminator"]
        network = discriminator.get_layer("discriminator_network")

        def fake_of(real):
            latents = generator.sample_latents(tf.shape(real)[0])
            return tf.cast(generator(latents, training=True), tf.float32)

        def discriminator_loss(batch):
            real = tf.cast(batch[0], tf.float32)
            fake = tf.stop_gradient(fake_of(real))
            r1, (real_logits, _) = losses.r1_penalty(
                lambda x: discriminator(x, training=True), real, self.r1_gamma, return_outputs=True
            )
            fake_logits, _ = discriminator(fake, training=True)
            adversarial = losses.nonsaturating_discriminator_loss(real_logits, fake_logits)
            return tf.reduce_mean(adversarial) + tf.reduce_mean(r1)

        def generator_loss(batch):
            real = tf.cast(batch[0], tf.float32)
            fake_logits, fake_features = network(fake_of(real), training=True)
            _, real_features = network(real, training=True)
            adversarial = tf.reduce_mean(losses.nonsaturating_generator_loss(fake_logits))
            matching = losses.feature_matching(tf.stop_gradient(real_features), fake_features)
            return adversarial + matching

        return [
            (optimizer["discriminator"], discriminator.trainable_variables, discriminator_loss),
            (optimizer["generator"], generator.trainable_variables, generator_loss),
        ]

    def fit_model(self, model, optimizer, compile_options):
        wrapper = KerasGAN(model, self.phases(model, optimizer))
        wrapper.compile(**compile_options)
        return wrapper, optimizer["discriminator"]


class KerasGAN(keras.Model):
    """The GAN as the keras.io DCGAN and WGAN-GP examples train it with `fit`: a Model holding
    both networks whose `train_step` updates the discriminator, then the generator, and tracks
    their losses with `keras.metrics.Mean`."""

    def __init__(self, models, phases):
        super().__init__(name="keras_gan")
        self.generator = models["generator"]
        self.discriminator = models["discriminator"]
        self.train_phases = phases
        self.loss_trackers = [keras.metrics.Mean(name=f"{n}_loss") for n in ("d", "g")]
        self.built = True

    @property
    def metrics(self):
        return self.loss_trackers

    def train_step(self, data):
        for (optimizer, variables, loss_fn), tracker in zip(
            self.train_phases, self.loss_trackers, strict=True
        ):
            with tf.GradientTape() as tape:
                loss = loss_fn(data)
            optimizer.apply(tape.gradient(loss, variables), variables)
            tracker.update_state(loss)
        return {m.name: m.result() for m in self.loss_trackers}


PROBLEMS = {p.name: p for p in (VAEProblem, CNNProblem, LSTMProblem, GANProblem)}


# ------------------------------------------------------------------------------------------------
# Contenders: each runs its own model copy on its own pipeline, and counts the steps it ran.


class TrainerRunner:
    """A Trainer: `fit(data, steps=n)` and `fit(data, until_step=n)`, nothing else.

    What the Trainer prints with `progress=False` (trees differ: absl log lines, or lines on
    standard output) goes to /dev/null, written as to any file, so that this script's own
    progress lines stay readable.
    """

    def __init__(self, trainer: Trainer, data: tf.data.Dataset, log_dir: str | None = None):
        self.trainer = trainer
        self.data = data
        self.log_dir = log_dir  # removed by close()
        self.done = 0
        self._sink = open(os.devnull, "w")  # noqa: SIM115 - closed by close()

    def run(self, steps: int) -> None:
        with contextlib.redirect_stdout(self._sink):
            self.trainer.fit(self.data, steps=steps)
        self.done += steps

    def run_until(self, step: int) -> None:
        with contextlib.redirect_stdout(self._sink):
            self.trainer.fit(self.data, until_step=step)
        self.done = max(self.done, step)

    def close(self) -> None:
        self._sink.close()
        if self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


class FitRunner:
    """`keras.Model.fit(data, steps_per_epoch=n, epochs=1, verbose=0)`; a call with
    `steps_per_execution=k` runs whole executions, so its step count is the optimizer's."""

    def __init__(self, problem: Problem, batch_size: int, steps_per_execution: int | None):
        options = (
            {} if steps_per_execution is None else {"steps_per_execution": steps_per_execution}
        )
        self.model, self.counter = problem.fit_model(problem.build(), problem.optimizer(), options)
        self.data = problem.dataset(batch_size)

    @property
    def done(self) -> int:
        return int(self.counter.iterations.numpy())

    def run(self, steps: int) -> None:
        self.model.fit(self.data, steps_per_epoch=steps, epochs=1, verbose=0)

    def run_until(self, step: int) -> None:
        if step > self.done:
            self.run(step - self.done)

    def close(self) -> None:
        pass


class LoopRunner:
    """The hand-written step: one `tf.function` call per step (`fold=None`), or `fold` steps per
    call of a `tf.range` loop inside one `tf.function` (the folded limit)."""

    def __init__(self, problem: Problem, batch_size: int, fold: int | None):
        model = problem.build()
        phases = problem.phases(model, problem.optimizer())
        for optimizer, variables, _ in phases:
            optimizer.build(variables)
        self.iterator = iter(problem.dataset(batch_size))
        self.fold = fold
        self.done = 0

        def train_step(batch):
            total = tf.constant(0.0)
            for optimizer, variables, loss_fn in phases:
                with tf.GradientTape() as tape:
                    loss = loss_fn(batch)
                optimizer.apply(tape.gradient(loss, variables), variables)
                total += loss
            return total

        self.call = None  # the folded limit's concrete function, traced on its first call
        if fold is None:
            self.step = tf.function(train_step)
        else:

            def steps(iterator, count):
                total = train_step(next(iterator))
                for _ in tf.range(count - 1):
                    total = train_step(next(iterator))
                return total

            self.folded = tf.function(steps)

    def run(self, steps: int) -> None:
        if self.fold is None:
            for _ in range(steps):
                loss = self.step(next(self.iterator))
        else:
            if self.call is None:
                self.call = self.folded.get_concrete_function(
                    self.iterator, tf.TensorSpec([], tf.int32)
                )
            remaining = steps
            while remaining > 0:
                count = min(self.fold, remaining)
                loss = self.call(self.iterator, tf.constant(count, tf.int32))
                remaining -= count
        float(loss)  # wait for the last step
        self.done += steps

    def run_until(self, step: int) -> None:
        if step > self.done:
            self.run(step - self.done)

    def close(self) -> None:
        pass


TRAINER_OPTIONS = {  # beside progress=False; log_dir=True: a temporary directory
    "trainer_defaults": {},
    "trainer_logging": {"log_every": 100, "grad_log_every": 100, "log_dir": True},
    "trainer_quiet": {"log_every": 0, "grad_log_every": 0},
}
LABELS = {
    "trainer_defaults": "Trainer (defaults)",
    "trainer_logging": "Trainer (log_every=100, grad_log_every=100, log_dir)",
    "trainer_quiet": "Trainer (log_every=0, grad_log_every=0)",
    "fit_defaults": "keras fit (defaults)",
    "fit_spe": f"keras fit (steps_per_execution={FIT_SPE})",
    "handwritten": "hand-written tf.function step",
    "folded": f"folded limit ({FOLD} steps per call)",
}


def make_runner(problem: Problem, contender: str, batch_size: int):
    """A fresh contender: its own model (the builder's, seed 0), optimizer and pipeline."""
    if contender in TRAINER_OPTIONS:
        options, log_dir = dict(TRAINER_OPTIONS[contender]), None
        if options.pop("log_dir", False):
            log_dir = options["log_dir"] = tempfile.mkdtemp(prefix=f"benchmark_{problem.name}_")
        trainer = problem.trainer(problem.build(), problem.optimizer(), progress=False, **options)
        return TrainerRunner(trainer, problem.dataset(batch_size), log_dir)
    if contender.startswith("fit_"):
        return FitRunner(problem, batch_size, None if contender == "fit_defaults" else FIT_SPE)
    return LoopRunner(problem, batch_size, None if contender == "handwritten" else FOLD)


# ------------------------------------------------------------------------------------------------
# Measurements.


def _memory_mb() -> dict[str, float]:
    """The resident set now (VmRSS) and its peak so far (VmHWM), in MB."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return values


def _timed(fn, *args) -> float:
    gc.collect()  # what the last window left
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def startup(runner, first_steps: int, steady_steps: int, *, isolated: bool) -> dict:
    """Times a fresh runner's first call, its first `first_steps` steps (from that call), and
    then `steady_steps` more: the steady state in the same process, right after."""
    before = _memory_mb()
    start = time.perf_counter()
    runner.run(1)
    first = time.perf_counter() - start
    first_call_steps = runner.done
    runner.run_until(first_steps)
    early = time.perf_counter() - start
    early_steps = runner.done
    steady = _timed(runner.run, steady_steps)
    per_step = steady / (runner.done - early_steps)
    rest = early_steps - first_call_steps
    result = {
        "time_to_first_step_s": first,
        "first_call_steps": first_call_steps,
        "first_steps": early_steps,
        "first_steps_s": early,
        "steady_steps_per_sec": 1.0 / per_step,
        "first_steps_vs_steady": early / (early_steps * per_step),
        "after_first_call_vs_steady": (early - first) / (rest * per_step) if rest > 0 else None,
        "isolated": isolated,
    }
    if isolated:
        result["rss_before_first_call_mb"] = before.get("VmRSS")
        result["peak_rss_mb"] = _memory_mb().get("VmHWM")
    return result


def startup_in_subprocess(model: str, contender: str) -> dict:
    """Runs `--startup=model/contender` in a fresh Python and returns what it printed."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--startup={model}/{contender}",
        f"--batch_size={FLAGS.batch_size}",
        f"--first_steps={FLAGS.first_steps}",
        f"--steps={FLAGS.steps or STEPS[model]}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith(STARTUP_PREFIX)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(
            f"The start-up run of {model}/{contender} failed (exit {out.returncode}):\n"
            + out.stderr[-3000:]
        )
    return json.loads(lines[-1][len(STARTUP_PREFIX) :])


def run_startup_worker(spec: str) -> None:
    model, _, contender = spec.partition("/")
    if model not in PROBLEMS or contender not in CONTENDERS:
        raise app.UsageError(
            f"--startup ({spec!r}) must be MODEL/CONTENDER with MODEL in {', '.join(MODELS)} "
            f"and CONTENDER in {', '.join(CONTENDERS)}."
        )
    runner = make_runner(PROBLEMS[model](), contender, FLAGS.batch_size)
    try:
        result = startup(runner, FLAGS.first_steps, FLAGS.steps or STEPS[model], isolated=True)
    finally:
        runner.close()
    print(STARTUP_PREFIX + json.dumps(result), flush=True)


def interleaved(runners: dict, steps: int, repeats: int, tag: str) -> dict[str, list[float]]:
    """Steps per second of each runner, `repeats` times, in an order rotating every repeat."""
    names = list(runners)
    rates: dict[str, list[float]] = {name: [] for name in names}
    # The objects of every contender built so far go to the permanent generation, so that a
    # window's garbage collections scan what a one-model process would, not all the others.
    gc.collect()
    gc.freeze()
    try:
        _rotate(runners, steps, repeats, tag, rates)
    finally:
        gc.unfreeze()
    return rates


def _rotate(runners: dict, steps: int, repeats: int, tag: str, rates: dict) -> None:
    names = list(runners)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runner = runners[name]
            begin = runner.done
            elapsed = _timed(runner.run, steps)
            rates[name].append((runner.done - begin) / elapsed)
        line = ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names)
        print(f"[{tag}] repeat {repeat + 1}/{repeats} (steps/s): {line}", flush=True)


def benchmark_model(name: str) -> dict:
    problem = PROBLEMS[name]()
    print(f"[{name}] {problem.title}", flush=True)
    starts = {}
    if FLAGS.isolate:
        for contender in CONTENDERS:
            starts[contender] = startup_in_subprocess(name, contender)
            _print_startup(name, contender, starts[contender])
    steps = FLAGS.steps or STEPS[name]
    runners = {c: make_runner(problem, c, FLAGS.batch_size) for c in CONTENDERS}
    try:
        for contender, runner in runners.items():
            if not FLAGS.isolate:
                starts[contender] = startup(runner, FLAGS.first_steps, steps, isolated=False)
                _print_startup(name, contender, starts[contender])
            else:
                runner.run(1)
            runner.run_until(max(FLAGS.warmup, runner.done))
        rates = interleaved(runners, steps, FLAGS.repeats, name)
        jit = {
            c: bool(getattr(r.model, "jit_compile", False))
            for c, r in runners.items()
            if isinstance(r, FitRunner)
        }
    finally:
        for runner in runners.values():
            runner.close()
    del runners
    gc.collect()
    medians = {c: statistics.median(r) for c, r in rates.items()}
    contenders = {}
    for contender in CONTENDERS:
        contenders[contender] = {
            "label": LABELS[contender],
            "steps_per_sec": medians[contender],
            "rates": rates[contender],
            "ratio_to_handwritten": paired_ratio(rates, contender, "handwritten"),
            "ratio_to_folded": paired_ratio(rates, contender, "folded"),
            "ratio_to_fit_spe": paired_ratio(rates, contender, "fit_spe"),
            **starts[contender],
        }
    return {
        "title": problem.title,
        "contenders": contenders,
        "logging_cost": paired_ratio(rates, "trainer_quiet", "trainer_logging") - 1.0,
        "fit_jit_compile": jit,
    }


def paired_ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    """The median over the repeats of a's rate over b's in the same repeat.

    The machine's speed drifts between repeats (the folded limit ran at 1,106 to 1,472 VAE
    steps/s in one run), and both contenders of a repeat ran within seconds of each other, so
    the ratio of each repeat's pair varies less than the ratio of the two medians.
    """
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


def _print_startup(model: str, contender: str, s: dict) -> None:
    peak = s.get("peak_rss_mb")
    memory = f", peak RSS {peak:.0f} MB" if peak else ""
    print(
        f"[{model}] start-up {contender}: first step {s['time_to_first_step_s']:.2f} s, first "
        f"{s['first_steps']} steps {s['first_steps_s']:.2f} s{memory}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------
# Cost as the number of terms grows.


class MultiTaskTrainer(Trainer):
    """T regression heads on one shared encoder: one `task_<i>` term per head."""

    def compute_terms(self, batch, training):
        x, y = batch
        outputs = self.model(x, training=training)
        return {
            f"task_{i:02d}": losses.mean_squared_error(y[:, i : i + 1], out)
            for i, out in enumerate(outputs)
        }


def multitask_problem(num_terms: int, examples: int = 2048, features: int = 32):
    """A shared encoder (two dense layers of 64) with `num_terms` heads, and its data: targets
    tanh(x w_i / sqrt(features)) for random w_i, x standard normal (generated, seed 0)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((examples, features)).astype("float32")
    w = rng.standard_normal((features, num_terms)).astype("float32")
    y = np.tanh(x @ w / np.sqrt(features)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((features,), name="x")
        h = keras.layers.Dense(64, activation="relu", name="shared_1")(inputs)
        h = keras.layers.Dense(64, activation="relu", name="shared_2")(h)
        heads = [keras.layers.Dense(1, name=f"head_{i:02d}")(h) for i in range(num_terms)]
        return keras.Model(inputs, heads, name=f"multitask_{num_terms}")

    return (x, y), build


TERM_CONTENDERS = {  # beside progress=False, log_every=0, steps_per_execution=DIAGNOSTIC_EVERY
    "plain": {"grad_log_every": 0},
    "diagnostic": {"grad_log_every": DIAGNOSTIC_EVERY},
    "pcgrad": {"grad_log_every": 0, "balancer": "pcgrad"},
    "mgda": {"grad_log_every": 0, "balancer": "mgda"},
}


def benchmark_terms(counts) -> dict:
    results = {}
    for count in counts:
        arrays, build = multitask_problem(count)
        runners = {
            name: TrainerRunner(
                MultiTaskTrainer(
                    build(),
                    keras.optimizers.Adam(1e-3),
                    progress=False,
                    log_every=0,
                    steps_per_execution=DIAGNOSTIC_EVERY,
                    **options,
                ),
                _pipeline(arrays, FLAGS.batch_size),
            )
            for name, options in TERM_CONTENDERS.items()
        }
        try:
            for runner in runners.values():
                runner.run_until(max(FLAGS.warmup, DIAGNOSTIC_EVERY))
            steps = FLAGS.steps or STEPS["terms"]
            rates = interleaved(runners, steps, FLAGS.repeats, f"T={count}")
        finally:
            for runner in runners.values():
                runner.close()
        medians = {n: statistics.median(r) for n, r in rates.items()}
        plain = medians["plain"]
        # One diagnostic step in every DIAGNOSTIC_EVERY, in calls like the plain contender's:
        # k (d - p) is its extra time over a plain step (per-step times d, p).
        slowdown = plain / medians["diagnostic"] - 1.0
        results[str(count)] = {
            "steps_per_sec": medians,
            "rates": rates,
            "cost_in_plain_steps": {
                "plain": 1.0,
                "diagnostic": 1.0 + DIAGNOSTIC_EVERY * slowdown,
                "pcgrad": plain / medians["pcgrad"],
                "mgda": plain / medians["mgda"],
            },
        }
        del runners
        gc.collect()
    return results


# ------------------------------------------------------------------------------------------------
# The report.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tree() -> dict:
    """Where `termwise` was imported from, and that tree's git commit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(termwise.__file__)))
    commit = subprocess.run(
        ["git", "-C", root, "log", "-1", "--format=%h"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"termwise": root, "commit": commit or None, "uncommitted_changes": bool(dirty)}


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "gpu": bool(tf.config.list_physical_devices("GPU")),
        **_tree(),
    }


def _targets(models: dict) -> list[dict]:
    found = []

    def add(model, target, value, goal, met):
        found.append(
            {"model": model, "target": target, "measured": value, "goal": goal, "met": met}
        )

    for name, result in models.items():
        c = result["contenders"]
        d = c["trainer_defaults"]
        if name in ("vae", "cnn"):
            value = d["ratio_to_folded"]
            add(name, "Trainer defaults vs folded limit", value, ">= 0.9x", value >= 0.9)
        value = d["ratio_to_fit_spe"]
        add(
            name,
            f"Trainer defaults vs fit (steps_per_execution={FIT_SPE})",
            value,
            ">= 1.0x",
            value >= 1.0,
        )
        value = d["time_to_first_step_s"] / c["fit_defaults"]["time_to_first_step_s"]
        add(name, "time to first step vs fit (defaults)", value, "<= 1.0x", value <= 1.0)
        value = d["after_first_call_vs_steady"]
        if value is not None:
            add(
                name, "first steps (after the first call) vs steady", value, "<= 1.1x", value <= 1.1
            )
        value = result["logging_cost"]
        add(name, "logging + diagnostics every 100 steps", value, "<= +5%", value <= 0.05)
    return found


def _number(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    tree = f"`{m['termwise']}`" + (f" at `{m['commit']}`" if m["commit"] else "")
    if m["uncommitted_changes"]:
        tree += " (with uncommitted changes)"
    n = s["first_steps"]
    windows = ", ".join(f"{steps} steps ({key})" for key, steps in s["steps"].items())
    where = "in a fresh subprocess per contender" if s["isolate"] else "in this process"
    lines = [
        "# Termwise benchmark",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, Python {m['python']}{', GPU' if m['gpu'] else ''}; "
        f"termwise from {tree}.",
        f"Load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in s['load_start'])} at the "
        f"start, {', '.join(f'{x:.2f}' for x in s['load_end'])} at the end; "
        f"{s['wall_time_s'] / 60:.1f} min in all.",
        f"Settings: batch {s['batch_size']}; timed windows of {windows}, x {s['repeats']} "
        f"repeats (medians); warm-up {s['warmup']} steps; start-up window {n} steps, measured "
        f"{where}{', --quick (the numbers mean nothing)' if s['quick'] else ''}.",
        "",
    ]
    for name, r in result["models"].items():
        lines += [
            f"## {name}: {r['title']}",
            "",
            f"| contender | steps/s | vs hand-written | vs folded | first step (s) | first {n} "
            f"steps (s) | {n} steady steps (s) | after first call vs steady | peak RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in r["contenders"].values():
            first = f"{c['time_to_first_step_s']:.2f}"
            if c["first_call_steps"] != 1:
                first += f" ({c['first_call_steps']} steps)"
            peak = _number(c.get("peak_rss_mb"), ".0f")
            if c.get("peak_rss_mb") and c.get("rss_before_first_call_mb"):
                peak += f" (+{c['peak_rss_mb'] - c['rss_before_first_call_mb']:.0f})"
            cells = [
                c["label"],
                f"{c['steps_per_sec']:.0f}",
                f"{c['ratio_to_handwritten']:.2f}x",
                f"{c['ratio_to_folded']:.2f}x",
                first,
                f"{c['first_steps_s']:.2f}",
                f"{c['first_steps'] / c['steady_steps_per_sec']:.2f}",
                _number(c["after_first_call_vs_steady"], ".2f", "x"),
                peak,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Logging + diagnostics every 100 steps cost {100 * r['logging_cost']:+.1f}% "
            "(Trainer quiet over Trainer logging).",
            "",
        ]
    if result["terms"]:
        lines += [
            "## Cost as the number of terms grows",
            "",
            "A shared encoder (2 x dense 64) with T heads, one term each, under the Trainer at "
            f"steps_per_execution={DIAGNOSTIC_EVERY}: each step's cost in plain steps (the "
            f"diagnostic step estimated from grad_log_every={DIAGNOSTIC_EVERY}, one per call).",
            "",
            "| T | plain steps/s | diagnostic step | pcgrad step | mgda step |",
            "|---:|---:|---:|---:|---:|",
        ]
        for count, t in result["terms"].items():
            cost = t["cost_in_plain_steps"]
            lines.append(
                f"| {count} | {t['steps_per_sec']['plain']:.0f} | {cost['diagnostic']:.2f}x | "
                f"{cost['pcgrad']:.2f}x | {cost['mgda']:.2f}x |"
            )
        lines.append("")
    lines += [
        "## Targets",
        "",
        "| model | target | measured | goal | met |",
        "|---|---|---:|---|---|",
    ]
    for t in result["targets"]:
        value = (
            f"{100 * t['measured']:+.1f}%" if t["goal"].endswith("%") else f"{t['measured']:.2f}x"
        )
        met = "yes" if t["met"] else "no"
        lines.append(f"| {t['model']} | {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; flags are written --name=value.")
    if FLAGS.quick:
        for name, value in QUICK.items():
            if not FLAGS[name].present:
                FLAGS[name].parse(value)
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*no termwise.Trainer is recording it")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")
    if FLAGS.startup:
        run_startup_worker(FLAGS.startup)
        return
    begin = time.perf_counter()
    load_start = list(os.getloadavg())
    info = machine()
    print(
        f"Termwise benchmark: {info['cpus']} CPUs ({info['cpu_model']}), TensorFlow "
        f"{info['tensorflow']}, Keras {info['keras']}; termwise from {info['termwise']} "
        f"({info['commit']}); load {load_start[0]:.2f}",
        flush=True,
    )
    models = {name: benchmark_model(name) for name in MODELS if name in FLAGS.models}
    terms = benchmark_terms([int(t) for t in FLAGS.terms])
    result = {
        "machine": info,
        "settings": {
            "batch_size": FLAGS.batch_size,
            "steps": {k: FLAGS.steps or n for k, n in STEPS.items()},
            "repeats": FLAGS.repeats,
            "warmup": FLAGS.warmup,
            "first_steps": FLAGS.first_steps,
            "steps_per_execution": SPE,
            "fit_steps_per_execution": FIT_SPE,
            "fold": FOLD,
            "isolate": FLAGS.isolate,
            "quick": FLAGS.quick,
            "load_start": load_start,
            "load_end": list(os.getloadavg()),
            "wall_time_s": time.perf_counter() - begin,
        },
        "models": models,
        "terms": terms,
    }
    result["targets"] = _targets(models)
    text = markdown(result)
    print(text, flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    if FLAGS.markdown:
        with open(FLAGS.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
