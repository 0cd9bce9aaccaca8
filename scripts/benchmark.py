"""Speed of the Trainer as ratios measured in one run: never as timed assertions in tests.

    python scripts/benchmark.py                  # the VAE on digits, about a minute on 2 CPUs
    python scripts/benchmark.py --steps=2000 --repeats=5 --json=bench.json

Every contender trains the same VAE (the reference model, dense, on the 8x8 digits) on the same
`tf.data` pipeline for `--steps` steps, after a warm-up that traces it. The contenders run in
turn, `--repeats` times, and each one's median steps per second is reported beside its ratio to
the hand-written loop:

* handwritten: a `tf.function` step (tape, `model.losses`, `optimizer.apply`), called once per
  step from Python: what a researcher writes by hand.
* keras_fit: `keras.Model.fit` with the same loss, and with `steps_per_execution`.
* termwise: `Trainer.fit` with its defaults, with `steps_per_execution`, and with per-term
  gradient diagnostics every 100 steps when the Trainer has them (`grad_log_every`).

Targets: termwise >= keras_fit, and termwise (defaults) >= 1.0x handwritten.
"""

import json
import statistics
import time

import common  # noqa: F401  (quiet TensorFlow start-up, as in every script)
import keras
import tensorflow as tf
from absl import app, flags

from termwise import losses
from termwise.models import data as data_lib
from termwise.models import vae
from termwise.trainer import Trainer

flags.DEFINE_integer("steps", 1000, "Timed steps per contender per repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of each contender (the median is reported).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("steps_per_execution", 10, "steps_per_execution for the variants that use it.")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
FLAGS = flags.FLAGS


def _dataset(x, batch_size):
    return (
        tf.data.Dataset.from_tensor_slices(x)
        .shuffle(len(x), seed=0)
        .batch(batch_size, drop_remainder=True)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )


def _model(shape):
    keras.utils.set_random_seed(0)
    model, _, _ = vae.build_vae(shape, latent_dim=8, seed=0)
    return model


class Handwritten:
    """The loop a researcher writes: one compiled step per Python call."""

    def __init__(self, x, batch_size):
        self.model = _model(x.shape[1:])
        self.optimizer = keras.optimizers.Adam(1e-3)
        self.optimizer.build(self.model.trainable_variables)
        self.iterator = iter(_dataset(x, batch_size))
        model, optimizer = self.model, self.optimizer

        @tf.function
        def step(images):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                reconstruction = tf.reduce_mean(losses.bernoulli_nll(images, logits))
                loss = reconstruction + tf.add_n([tf.reduce_mean(v) for v in model.losses])
            variables = model.trainable_variables
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        self.step = step

    def run(self, steps):
        for _ in range(steps):
            loss = self.step(next(self.iterator))
        float(loss)


class KerasFit:
    """`keras.Model.fit` on the same model: the KL through add_loss, the NLL as the loss."""

    def __init__(self, x, batch_size, steps_per_execution=1):
        self.model = _model(x.shape[1:])
        self.model.compile(
            keras.optimizers.Adam(1e-3),
            loss=lambda y, logits: losses.bernoulli_nll(y, logits),
            steps_per_execution=steps_per_execution,
        )
        self.data = _dataset(x, batch_size).map(lambda images: (images, images))

    def run(self, steps):
        self.model.fit(self.data, steps_per_epoch=steps, epochs=1, verbose=0)


class Termwise:
    """`Trainer.fit` on the same model and data."""

    def __init__(self, x, batch_size, **options):
        self.trainer = vae.VAETrainer(
            _model(x.shape[1:]), keras.optimizers.Adam(1e-3), progress=False, **options
        )
        self.data = _dataset(x, batch_size)

    def run(self, steps):
        self.trainer.fit(self.data, steps=steps)


def contenders(x, batch_size, spe):
    found = {
        "handwritten": lambda: Handwritten(x, batch_size),
        "keras_fit": lambda: KerasFit(x, batch_size),
        f"keras_fit(steps_per_execution={spe})": lambda: KerasFit(x, batch_size, spe),
        "termwise": lambda: Termwise(x, batch_size),
        f"termwise(steps_per_execution={spe})": lambda: Termwise(
            x, batch_size, steps_per_execution=spe
        ),
    }
    if "grad_log_every" in Trainer.__init__.__code__.co_varnames:
        found[f"termwise(steps_per_execution={spe}, grad_log_every=0)"] = lambda: Termwise(
            x, batch_size, steps_per_execution=spe, grad_log_every=0
        )
        found[f"termwise(steps_per_execution={spe}, grad_log_every=100)"] = lambda: Termwise(
            x, batch_size, steps_per_execution=spe, grad_log_every=100, log_every=100
        )
    return found


def main(argv):
    del argv
    x = data_lib.load_images("digits").x_train
    built = {
        name: make()
        for name, make in contenders(x, FLAGS.batch_size, FLAGS.steps_per_execution).items()
    }
    # Warm-up: trace and build everything before timing. 200 steps cross the first logging and
    # gradient-diagnostic steps (every 100), whose functions are traced when first due.
    for runner in built.values():
        runner.run(200)
    rates = {name: [] for name in built}
    for _ in range(FLAGS.repeats):
        for name, runner in built.items():
            start = time.perf_counter()
            runner.run(FLAGS.steps)
            rates[name].append(FLAGS.steps / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median["handwritten"]
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(
        f"VAE on digits, batch {FLAGS.batch_size}, {FLAGS.steps} steps x {FLAGS.repeats}, {device}"
    )
    print(f"{'contender':<58} {'steps/s':>9} {'vs handwritten':>15}")
    for name, rate in median.items():
        print(f"{name:<58} {rate:>9.1f} {rate / base:>14.2f}x")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(
                {
                    "device": device,
                    "steps_per_sec": median,
                    "ratio_to_handwritten": {k: v / base for k, v in median.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
