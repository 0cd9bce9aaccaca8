"""A variational autoencoder whose KL is added with `add_loss` by a layer named `kl`.

Terms (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"):

    reconstruction(x) = -log p(x | z) = sum_d softplus(l_d) - x_d l_d     (Bernoulli decoder)
    kl(x)             = KL(q(z | x) || N(0, I))
                      = 0.5 sum_j (exp(lv_j) + mu_j^2 - 1 - lv_j)
    negative ELBO     = reconstruction + kl

Options that act on the KL term:
* its weight follows a schedule (`--weights kl=...`): a linear warm-up by default, or cyclical
  annealing (Fu et al. 2019); `beta` multiplies it (beta-VAE, Higgins et al. 2017);
* free bits (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
  Flow"): in training the KL becomes sum_j max(lambda, E_batch[KL_j]), so no latent dimension
  is pushed below lambda nats; evaluation always reports the true KL.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise import losses
from termwise.models import data as data_lib
from termwise.models import fid as fid_lib
from termwise.models import images as images_lib
from termwise.models.config import RunConfig, config_errors, make_optimizer, set_up, trainer_options
from termwise.trainer import Trainer, schedules


@keras.saving.register_keras_serializable(package="termwise")
class GaussianKL(keras.layers.Layer):
    """Adds the KL of q(z|x) = N(mean, exp(log_variance)) to N(0, I) with `add_loss`.

    Call it on `[mean, log_variance]`; it returns them unchanged. The value added is the
    per-example KL ([batch]), or, in training with `free_bits > 0`, the scalar
    `sum_j max(free_bits, mean_i KL_ij)` (Kingma et al. 2016).

    `termwise.Trainer` averages the per-example KL over the batch, as it does the
    reconstruction; `keras.Model.fit` sums `add_loss` values, so under plain `fit` the KL
    weighs batch_size times more (`losses.SummedPenaltyWarning` says so once).

    Args:
        free_bits: lambda, in nats per latent dimension (0 turns it off).
    """

    def __init__(self, free_bits: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if free_bits < 0:
            raise ValueError(f"`free_bits` ({free_bits!r}) must be >= 0.")
        self.free_bits = float(free_bits)

    def call(self, inputs, training=None):
        mean, log_variance = inputs
        # The KL in float32 whatever the compute precision.
        mean, log_variance = tf.cast(mean, tf.float32), tf.cast(log_variance, tf.float32)
        if self.free_bits > 0 and training:
            per_dimension = losses.gaussian_kl_per_dimension(mean, log_variance)
            losses.add_penalty(self, losses.free_bits_kl(per_dimension, self.free_bits), training)
        else:
            losses.add_penalty(self, losses.gaussian_kl(mean, log_variance), training)
        return mean, log_variance

    def get_config(self):
        return {**super().get_config(), "free_bits": self.free_bits}


@keras.saving.register_keras_serializable(package="termwise")
class Sample(keras.layers.Layer):
    """Reparameterised sample z = mean + exp(log_variance / 2) * eps, eps ~ N(0, I).

    A saved model keeps `seed` in its config and the seed generator's state in its weights, so
    a reloaded model draws the same noise as the original would next.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        mean, log_variance = inputs
        eps = keras.random.normal(tf.shape(mean), dtype=mean.dtype, seed=self.seed_generator)
        return mean + tf.exp(0.5 * log_variance) * eps

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}

    def save_own_variables(self, store):
        # Keras saves no SeedGenerator state in a .keras file; this layer's is its only state.
        super().save_own_variables(store)
        store["seed_generator_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        keys = [key for key in store.keys() if key != "seed_generator_state"]
        super().load_own_variables({key: store[key] for key in keys})
        if "seed_generator_state" in store.keys():
            self.seed_generator.state.assign(store["seed_generator_state"])


def build_vae(
    image_shape: tuple[int, int, int],
    latent_dim: int = 8,
    free_bits: float = 0.0,
    seed: int | None = None,
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """Builds (vae, encoder, decoder): dense for small images, convolutional for 28x28.

    The vae maps images [batch, h, w, 1] in [0, 1] to Bernoulli logits of the same shape; its
    `kl` layer adds the KL term. The encoder maps images to (mean, log_variance), the decoder
    latents to logits.
    """
    height, width, channels = image_shape
    convolutional = height >= 28 and height % 4 == 0 and width % 4 == 0
    images = keras.Input(image_shape, name="images")
    if convolutional:
        h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(images)
        h = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(128, activation="relu")(h)
    else:
        h = keras.layers.Flatten()(images)
        h = keras.layers.Dense(256, activation="relu")(h)
        h = keras.layers.Dense(128, activation="relu")(h)
    mean = keras.layers.Dense(latent_dim, name="mean")(h)
    log_variance = keras.layers.Dense(latent_dim, name="log_variance")(h)
    encoder = keras.Model(images, [mean, log_variance], name="encoder")

    latents = keras.Input((latent_dim,), name="z")
    if convolutional:
        h = keras.layers.Dense(128, activation="relu")(latents)
        h = keras.layers.Dense((height // 4) * (width // 4) * 64, activation="relu")(h)
        h = keras.layers.Reshape((height // 4, width // 4, 64))(h)
        h = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(h)
        logits = keras.layers.Conv2DTranspose(
            channels, 3, strides=2, padding="same", dtype="float32"
        )(h)
    else:
        h = keras.layers.Dense(128, activation="relu")(latents)
        h = keras.layers.Dense(256, activation="relu")(h)
        h = keras.layers.Dense(height * width * channels, dtype="float32")(h)
        logits = keras.layers.Reshape(image_shape)(h)
    decoder = keras.Model(latents, logits, name="decoder")

    mean, log_variance = encoder(images)
    mean, log_variance = GaussianKL(free_bits, name="kl")([mean, log_variance])
    z = Sample(seed, name="sample")([mean, log_variance])
    vae = keras.Model(images, decoder(z), name="vae")
    return vae, encoder, decoder


class VAETrainer(Trainer):
    """Trains a VAE: the `reconstruction` term here, the `kl` term from the model's `kl` layer."""

    def compute_terms(self, batch, training):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = tf.cast(self.model(images, training=training), tf.float32)
        return {"reconstruction": losses.bernoulli_nll(images, logits)}


# The trained models a job writes to its run directory (on the chief), as `.keras` files that
# `keras.models.load_model` reads after `import termwise`.
MODEL_FILES = {"vae": "vae.keras", "encoder": "encoder.keras", "decoder": "decoder.keras"}


def _save_models(trainer: Trainer, log_dir: str, models: dict[str, keras.Model]) -> None:
    """Writes each model to `log_dir`/MODEL_FILES[name]; only where the trainer writes files."""
    if trainer.writer is None:  # no log directory, or a multi-worker worker other than the chief
        return
    for name, model in models.items():
        model.save(os.path.join(log_dir, MODEL_FILES[name]))


def _scaled(schedule: schedules.Schedule, factor: float) -> schedules.Schedule:
    """factor x schedule: beta times the KL weight (Higgins et al. 2017)."""
    return schedules.Schedule(lambda step: factor * schedule(step), f"{factor:g}*{schedule.spec}")


def train_and_evaluate(
    config: RunConfig,
    *,
    latent_dim: int = 16,
    free_bits: float = 0.0,
    beta: float = 1.0,
    kl_warmup: str = "linear:0:1:2000",
) -> dict[str, float]:
    """Trains a VAE on `config.dataset` up to `config.steps`, then evaluates it held out.

    Writes to `config.log_dir`: TensorBoard scalars, images of test inputs beside their
    reconstructions and of samples from the prior, `samples.png`, checkpoints (a rerun of
    the same command resumes, and finishes the same job), and at the end the trained models
    `vae.keras`, `encoder.keras` and `decoder.keras` (`MODEL_FILES`).

    Args:
        config: the common run options.
        latent_dim: size of z.
        free_bits: lambda of free bits (Kingma et al. 2016), nats per latent dimension; 0: off.
        beta: multiplies the KL weight (beta-VAE); 1 is the ELBO.
        kl_warmup: the KL's weight schedule when `config.weights` gives none for `kl`.

    Returns:
        The held-out `reconstruction`, `kl` and `negative_elbo` (nats per image), and `total`;
        for labelled data also `fid`, `fid_floor`, `fid_classifier_accuracy` and `fid_samples`:
        the FID (`termwise.models.fid`) of that many samples from the prior (the decoder's
        means, sigmoid(logits), as in samples.png) against the held-out split, also logged as
        `eval/fid` and `eval/fid_floor`.

    Raises:
        ConfigError: for bad options or data, before any training.
    """
    strategy = set_up(config)
    with config_errors():
        if latent_dim <= 0:
            raise ValueError(f"--latent_dim ({latent_dim}) must be a positive integer.")
        if not beta > 0:
            raise ValueError(f"--beta ({beta}) must be positive.")
        if not free_bits >= 0:  # NaN too
            raise ValueError(f"--free_bits ({free_bits!r}) must be >= 0 (0 turns free bits off).")
        split = data_lib.load_images(config.dataset, seed=config.seed)
        weights = dict(config.weights)
        kl_schedule = schedules.parse(weights.get("kl", kl_warmup))
        weights["kl"] = _scaled(kl_schedule, beta) if beta != 1 else kl_schedule
        with strategy.scope():
            vae, encoder, decoder = build_vae(split.image_shape, latent_dim, free_bits, config.seed)
            optimizer = make_optimizer(config)
        hparams = {
            "latent_dim": latent_dim,
            "free_bits": free_bits,
            "beta": beta,
        }
        options = trainer_options(
            config,
            strategy,
            weights=weights,
            hparams=hparams,
            hparams_metrics=("eval/negative_elbo", "eval/fid", "eval/fid_floor"),
        )
        trainer = VAETrainer(vae, optimizer, **options)
        test = data_lib.batches(split.x_test, config.batch_size, shuffle=False, seed=config.seed)
        trainer.build(test)
    train = data_lib.batches(split.x_train, config.batch_size, shuffle=True, seed=config.seed)
    trainer.fit(train, until_step=config.steps, **config.validation(test))
    results = trainer.evaluate(test)
    results["negative_elbo"] = results["reconstruction"] + results["kl"]
    step = trainer.step
    scalars = {"eval/negative_elbo": results["negative_elbo"]}
    if split.y_train is not None:  # the FID classifier needs labels
        chief = trainer.writer is not None  # only the chief writes files
        scorer = fid_lib.fid_scorer(split, config.log_dir, write=chief, seed=config.seed)
        z = tf.random.stateless_normal([scorer.num_samples, latent_dim], seed=[config.seed, 2])
        samples = tf.sigmoid(tf.cast(decoder(z, training=False), tf.float32)).numpy()
        results["fid"], results["fid_floor"] = scorer.score(samples), scorer.floor
        results["fid_classifier_accuracy"] = scorer.held_out_accuracy
        results["fid_samples"] = float(scorer.num_samples)
        scalars.update({"eval/fid": results["fid"], "eval/fid_floor": scorer.floor})
    if trainer.writer is not None:
        trainer.writer.scalars(step, scalars)
        _write_images(trainer, encoder, decoder, split.x_test, latent_dim, config, step)
        trainer.writer.flush()
    _save_models(trainer, config.log_dir, {"vae": vae, "encoder": encoder, "decoder": decoder})
    logging.info(
        "Held-out negative ELBO %.2f nats (reconstruction %.2f + KL %.2f) at step %d",
        results["negative_elbo"],
        results["reconstruction"],
        results["kl"],
        step,
    )
    return results


def _write_images(trainer, encoder, decoder, x_test, latent_dim, config, step) -> None:
    """Inputs beside reconstructions, and samples from the prior: TensorBoard and samples.png."""
    scale = max(1, 64 // x_test.shape[1])
    inputs = x_test[:16]
    mean, _ = encoder(inputs, training=False)
    reconstructions = tf.sigmoid(tf.cast(decoder(mean, training=False), tf.float32)).numpy()
    pairs = np.stack([inputs, reconstructions], axis=1).reshape(-1, *inputs.shape[1:])
    trainer.writer.image("reconstructions", images_lib.grid(pairs, columns=8, scale=scale), step)
    z = tf.random.stateless_normal([64, latent_dim], seed=[config.seed, 1])
    samples = tf.sigmoid(tf.cast(decoder(z, training=False), tf.float32)).numpy()
    sample_grid = images_lib.grid(samples, columns=8, scale=scale)
    trainer.writer.image("samples", sample_grid, step)
    images_lib.save_png(os.path.join(config.log_dir, "samples.png"), sample_grid)
