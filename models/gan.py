"""A DCGAN-style GAN trained in two phases, each with its own optimizer and named terms.

Phase `discriminator` (run first in each step), over D's weights:

    d_adversarial     softplus(-D(x)) + softplus(D(G(z)))            non-saturating, Goodfellow
                      or D(G(z)) - D(x) with --loss=wgan_gp           et al. 2014 / Arjovsky 2017
    r1                gamma / 2 ||grad_x D(x)||^2 on real data         Mescheder et al. 2018
    gradient_penalty  lambda (||grad D(x_hat)|| - 1)^2, wgan_gp only   Gulrajani et al. 2017
    drift             epsilon D(x)^2 on real and fake, if --drift > 0  Karras et al. 2018

Phase `generator`, over G's weights:

    g_adversarial     softplus(-D(G(z))), or -D(G(z)) with wgan_gp
    feature_matching  ||E f(x) - E f(G(z))||_2^2 (or _1) over D's      Salimans et al. 2016
                      intermediate features f

`drift` is added with `add_loss` by D's layer named `drift`; D is called on real and on fake
data in the same phase, and the Trainer sums both calls' values under that name. The generator
phase and the gradient penalty's interpolates use D's network without that layer
(`discriminator.get_layer("discriminator_network")`), so drift is a discriminator-phase term.

The GAN's random draws (latents, the gradient penalty's epsilons) come from
`generator.seed_generator`, whose state the Trainer saves in its checkpoints (as it does every
seed generator's): a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise import losses
from termwise.models import data as data_lib
from termwise.models import fid as fid_lib
from termwise.models import images as images_lib
from termwise.models.config import RunConfig, check_known, config_errors, set_up, trainer_options
from termwise.trainer import Trainer

ADVERSARIAL_LOSSES = ("nonsaturating", "wgan_gp")
FEATURE_MATCHING = ("l2", "l1", "none")
GENERATOR_NORMS = ("pixel", "batch")
PHASES = ("discriminator", "generator")  # the run order within a step
GENERATOR_FILE = "generator.keras"  # in the run directory, written at the end of a job
DISCRIMINATOR_FILE = "discriminator.keras"


def _conv_layout(image_shape) -> tuple[int, int] | None:
    """(height, width) / 4: the generator's first feature map, or None for a dense GAN."""
    height, width, _ = image_shape
    if height % 4 == 0 and width % 4 == 0:
        return height // 4, width // 4
    return None


def _normalization(norm: str) -> keras.layers.Layer:
    if norm == "pixel":
        return keras.layers.RMSNormalization(axis=-1, epsilon=1e-8)
    return keras.layers.BatchNormalization()


def _generator_network(image_shape, latent_dim: int, width: int, norm: str) -> keras.Model:
    """DCGAN generator (Radford et al. 2016): dense, then two stride-2 transposed convolutions
    with normalization and ReLU, to sigmoid pixels in [0, 1].

    `norm="pixel"`: each position's feature vector is divided by its root mean square (the
    pixelwise feature normalization of Karras et al. 2018, with a learned scale), per example;
    `"batch"`: batch norm (Ioffe & Szegedy 2015), as in DCGAN."""
    latents = keras.Input((latent_dim,), name="z")
    start = _conv_layout(image_shape)
    if start is None:
        h = keras.layers.Dense(4 * width, use_bias=False)(latents)
        h = keras.layers.ReLU()(_normalization(norm)(h))
        h = keras.layers.Dense(int(np.prod(image_shape)), activation="sigmoid", dtype="float32")(h)
        images = keras.layers.Reshape(image_shape)(h)
        return keras.Model(latents, images, name="generator_network")
    h = keras.layers.Dense(start[0] * start[1] * 4 * width, use_bias=False)(latents)
    if norm == "pixel":  # over each position's channels
        h = keras.layers.Reshape((*start, 4 * width))(h)
        h = keras.layers.ReLU()(_normalization(norm)(h))
    else:
        h = keras.layers.ReLU()(_normalization(norm)(h))
        h = keras.layers.Reshape((*start, 4 * width))(h)
    for filters in (2 * width, width):
        h = keras.layers.Conv2DTranspose(filters, 4, strides=2, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(_normalization(norm)(h))
    images = keras.layers.Conv2D(
        image_shape[-1], 3, padding="same", activation="sigmoid", dtype="float32"
    )(h)
    return keras.Model(latents, images, name="generator_network")


@keras.saving.register_keras_serializable(package="termwise")
class Generator(keras.Model):
    """Maps latents z ~ N(0, I) to images in [0, 1]; draws its own latents reproducibly.

    Saved as `.keras`, it keeps its arguments in its config (loading rebuilds the network, then
    reads its weights) and `seed_generator`'s state beside the weights.

    Args:
        image_shape: (height, width, channels) of the images.
        latent_dim: size of z.
        width: channels of the last hidden layer (the first has 4x as many).
        seed: seed of `seed_generator`, the GAN's source of noise inside the compiled step.
        norm: the hidden layers' normalization: "pixel" (per example, no batch statistics:
            a sample does not depend on its batch, and an average of the weights needs no
            recomputed statistics) or "batch" (batch norm, DCGAN's).

    Raises:
        ValueError: for an unknown `norm`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int = 32,
        width: int = 32,
        seed: int | None = None,
        norm: str = "pixel",
        **kwargs,
    ):
        if norm not in GENERATOR_NORMS:
            raise ValueError(f"`norm` ({norm!r}) must be one of {', '.join(GENERATOR_NORMS)}.")
        kwargs.setdefault("name", "generator")
        super().__init__(**kwargs)
        self.image_shape = tuple(int(n) for n in image_shape)
        self.latent_dim = int(latent_dim)
        self.width = int(width)
        self.seed = seed
        self.norm = norm
        self.network = _generator_network(self.image_shape, self.latent_dim, self.width, norm)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.build((None, self.latent_dim))

    def get_config(self):
        return {
            **super().get_config(),
            "image_shape": self.image_shape,
            "latent_dim": self.latent_dim,
            "width": self.width,
            "seed": self.seed,
            "norm": self.norm,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save_own_variables(self, store):
        # Keras saves no SeedGenerator state in a .keras file; the network's weights are its own.
        super().save_own_variables(store)
        store["seed_generator_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        keys = [key for key in store.keys() if key != "seed_generator_state"]
        super().load_own_variables({key: store[key] for key in keys})
        if "seed_generator_state" in store.keys():
            self.seed_generator.state.assign(store["seed_generator_state"])

    def build(self, input_shape=None):
        del input_shape  # the network is built at construction
        self.built = True

    def call(self, latents, training=None):
        return self.network(latents, training=training)

    def sample_latents(self, batch_size) -> tf.Tensor:
        """[batch_size, latent_dim] draws from N(0, I), advancing `seed_generator`."""
        return keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)


def build_discriminator(
    image_shape: tuple[int, int, int], width: int = 32, drift: float = 0.0
) -> keras.Model:
    """DCGAN discriminator without batch norm (the input-gradient penalties need examples to be
    independent): stride-2 convolutions with leaky ReLU, then one logit.

    Returns:
        A model from images to `(logits [batch, 1], features [batch, d])`, where `features` are
        the flattened activations of the last hidden layer (for feature matching). It wraps the
        penalty-free `discriminator_network`; with `drift > 0` its logits pass through a
        `losses.DriftPenalty` layer named `drift` that adds drift * D(x)^2 with `add_loss`.
    """
    images = keras.Input(image_shape, name="images")
    h = images
    if _conv_layout(image_shape) is None:
        h = keras.layers.Flatten()(h)
        for units in (4 * width, 2 * width):
            h = keras.layers.LeakyReLU(0.2)(keras.layers.Dense(units)(h))
    else:
        for filters in (width, 2 * width):
            h = keras.layers.Conv2D(filters, 4, strides=2, padding="same")(h)
            h = keras.layers.LeakyReLU(0.2)(h)
    features = keras.layers.Flatten(name="features")(h)
    logits = keras.layers.Dense(1, dtype="float32", name="logits")(features)
    network = keras.Model(images, [logits, features], name="discriminator_network")

    images = keras.Input(image_shape, name="images")
    logits, features = network(images)
    if drift > 0:
        logits = losses.DriftPenalty(drift, name="drift")(logits)
    return keras.Model(images, [logits, features], name="discriminator")


def build_gan(
    image_shape: tuple[int, int, int],
    latent_dim: int = 32,
    width: int = 32,
    drift: float = 0.0,
    seed: int | None = None,
    generator_norm: str = "pixel",
) -> tuple[Generator, keras.Model]:
    """Builds (generator, discriminator); see `Generator` and `build_discriminator`."""
    generator = Generator(image_shape, latent_dim, width, seed=seed, norm=generator_norm)
    return generator, build_discriminator(image_shape, width, drift)


def gan_optimizer(
    learning_rate: float, beta_1: float = 0.5, ema_momentum: float | None = None
) -> keras.optimizers.Optimizer:
    """Adam(learning_rate, beta_1=0.5) as in DCGAN, loss-scaled under float16.

    With `ema_momentum`, the optimizer also keeps an exponential moving average of the weights
    it updates, avg <- m avg + (1 - m) w after every update (Keras's `use_ema`; for a generator,
    Karras et al. 2018, Yazici et al. 2019): optimizer variables, so checkpoints hold them.
    """
    if ema_momentum is None:
        optimizer = keras.optimizers.Adam(learning_rate, beta_1=beta_1)
    else:
        optimizer = keras.optimizers.Adam(
            learning_rate, beta_1=beta_1, use_ema=True, ema_momentum=ema_momentum
        )
    if keras.mixed_precision.global_policy().compute_dtype == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class GANTrainer(Trainer):
    """Trains a GAN: phase `discriminator` then phase `generator` in every step.

    `model` is `{"generator": Generator, "discriminator": D}` and `optimizer` a dict with the
    keys `"discriminator"` and `"generator"`, in that order; each phase updates its own model.

    Args:
        adversarial_loss: "nonsaturating" (Goodfellow et al. 2014) or "wgan_gp" (Arjovsky et
            al. 2017 with the gradient penalty of Gulrajani et al. 2017).
        r1_gamma: gamma of the `r1` term; 0 leaves the term out.
        gp_weight: lambda of the `gradient_penalty` term (wgan_gp only).
        feature_matching: "l2", "l1", or "none" (no `feature_matching` term).
        **kwargs: the Trainer's options.
    """

    def __init__(
        self,
        model,
        optimizer,
        *,
        adversarial_loss: str = "nonsaturating",
        r1_gamma: float = 0.1,
        gp_weight: float = 10.0,
        feature_matching: str = "l2",
        **kwargs,
    ):
        if adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(
                f"`adversarial_loss` ({adversarial_loss!r}) must be one of "
                f"{', '.join(ADVERSARIAL_LOSSES)}."
            )
        if feature_matching not in FEATURE_MATCHING:
            raise ValueError(
                f"`feature_matching` ({feature_matching!r}) must be one of "
                f"{', '.join(FEATURE_MATCHING)}."
            )
        if not r1_gamma >= 0:
            raise ValueError(f"`r1_gamma` ({r1_gamma!r}) must be >= 0 (0 turns it off).")
        if not gp_weight >= 0:
            raise ValueError(f"`gp_weight` ({gp_weight!r}) must be >= 0.")
        if not isinstance(model, Mapping) or set(model) != {"generator", "discriminator"}:
            raise ValueError(
                f"`model` must be a dict with the keys 'generator' and 'discriminator', got "
                f"{model!r}."
            )
        if not isinstance(optimizer, Mapping) or tuple(optimizer) != PHASES:
            raise ValueError(
                "`optimizer` must be a dict with the keys 'discriminator' then 'generator' "
                f"(the phases in their run order), got {optimizer!r}."
            )
        self.adversarial_loss = adversarial_loss
        self.r1_gamma = float(r1_gamma)
        self.gp_weight = float(gp_weight)
        self.feature_matching = feature_matching
        self.generator = model["generator"]
        self.discriminator = model["discriminator"]
        try:  # D without its add_loss penalties, if it wraps a network (build_discriminator)
            self.discriminator_network = self.discriminator.get_layer("discriminator_network")
        except ValueError:
            self.discriminator_network = self.discriminator
        super().__init__(model, optimizer, **kwargs)

    def compute_terms(self, batch, training, phase):
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        real = tf.cast(real, tf.float32)
        latents = self.generator.sample_latents(tf.shape(real)[0])
        fake = tf.cast(self.generator(latents, training=training), tf.float32)
        if phase == "discriminator":
            return self._discriminator_terms(real, tf.stop_gradient(fake), training)
        return self._generator_terms(real, fake, training)

    def _discriminator_terms(self, real, fake, training):
        def discriminator(x):  # with its add_loss layers: each call adds drift
            return self.discriminator(x, training=training)

        terms = {}
        if self.r1_gamma > 0:  # one call on real data serves both R1 and the adversarial loss
            terms["r1"], (real_logits, _) = losses.r1_penalty(
                discriminator, real, self.r1_gamma, return_outputs=True
            )
        else:
            real_logits, _ = discriminator(real)
        fake_logits, _ = discriminator(fake)
        if self.adversarial_loss == "nonsaturating":
            adversarial = losses.nonsaturating_discriminator_loss(real_logits, fake_logits)
            self.add_metric("d_accuracy", self._accuracy(real_logits, fake_logits))
        else:
            adversarial = losses.wasserstein_critic_loss(real_logits, fake_logits)
            terms["gradient_penalty"] = losses.gradient_penalty(
                lambda x: self.discriminator_network(x, training=training)[0],
                real,
                fake,
                self.gp_weight,
                seed=self.generator.seed_generator,
            )
        return {"d_adversarial": adversarial, **terms}

    def _generator_terms(self, real, fake, training):
        fake_logits, fake_features = self.discriminator_network(fake, training=training)
        if self.adversarial_loss == "nonsaturating":
            terms = {"g_adversarial": losses.nonsaturating_generator_loss(fake_logits)}
        else:
            terms = {"g_adversarial": losses.wasserstein_generator_loss(fake_logits)}
        if self.feature_matching != "none":
            _, real_features = self.discriminator_network(real, training=training)
            terms["feature_matching"] = losses.feature_matching(
                tf.stop_gradient(real_features), fake_features, norm=self.feature_matching
            )
        return terms

    @staticmethod
    def _accuracy(real_logits, fake_logits):
        """Per example: the mean of [D(x) > 0] and [D(G(z)) < 0] (a metric, not a term)."""
        real_ok = tf.cast(tf.reshape(real_logits, [-1]) > 0, tf.float32)
        fake_ok = tf.cast(tf.reshape(fake_logits, [-1]) < 0, tf.float32)
        return 0.5 * (real_ok + fake_ok)


def fixed_latents(latent_dim: int, seed: int, count: int = 64) -> np.ndarray:
    """The latents of the sample images: the same at every step of a run, and across runs."""
    return np.random.default_rng([seed, 7]).standard_normal((count, latent_dim)).astype("float32")


def generate(generator: Generator, latents: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """G(latents) in inference mode, as float32 images [n, h, w, c], in batches."""
    parts = [
        tf.cast(generator(latents[i : i + batch_size], training=False), tf.float32).numpy()
        for i in range(0, len(latents), batch_size)
    ]
    return np.concatenate(parts)


def write_fid(
    trainer: GANTrainer, scorer: fid_lib.FIDScorer, latents: np.ndarray, step: int
) -> float:
    """The FID of G(latents) to the held-out split; logs `eval/fid` and `eval/fid_floor`."""
    score = scorer.score(generate(trainer.generator, latents))
    if trainer.writer is not None:
        trainer.writer.scalars(step, {"eval/fid": score, "eval/fid_floor": scorer.floor})
        trainer.writer.flush()
    return score


def write_samples(trainer: GANTrainer, latents: np.ndarray, log_dir: str, step: int) -> str | None:
    """Writes G(latents) as a grid: TensorBoard `images/samples` and `samples.png`.

    Returns:
        The path of samples.png, or None where the trainer writes nothing (no log directory,
        or a multi-worker worker other than the chief).
    """
    if trainer.writer is None:
        return None
    samples = tf.cast(trainer.generator(latents, training=False), tf.float32).numpy()
    scale = max(1, 32 // samples.shape[1])
    sample_grid = images_lib.grid(samples, columns=8, scale=scale)
    trainer.writer.image("samples", sample_grid, step)
    trainer.writer.flush()
    return images_lib.save_png(os.path.join(log_dir, "samples.png"), sample_grid)


def train_and_evaluate(
    config: RunConfig,
    *,
    loss: str = "nonsaturating",
    latent_dim: int = 32,
    width: int = 32,
    generator_norm: str = "pixel",
    r1_gamma: float = 0.1,
    gp_weight: float = 10.0,
    feature_matching: str = "l2",
    drift: float = 0.0,
    discriminator_learning_rate: float | None = None,
    ema_momentum: float | None = 0.995,
    n_critic: int = 1,
    sample_every: int = 1000,
) -> dict[str, float]:
    """Trains a GAN on `config.dataset` up to `config.steps`, then evaluates its terms held out.

    Writes to `config.log_dir`: TensorBoard scalars, `images/samples` (G on fixed latents)
    and `eval/fid`, `eval/fid_floor` (`termwise.models.fid`; `fid.FIDScorer.num_samples`
    images from other fixed latents against the held-out split, for labelled data) every
    `sample_every` steps and at the end, `samples.png`, checkpoints (a rerun of the same
    command resumes and finishes the same job), the FID classifier, and at the end
    `generator.keras` and `discriminator.keras`. With `ema_momentum` the samples, the FID
    and `generator.keras` come from the generator's averaged weights.

    Args:
        config: the common run options (`learning_rate` is the generator's).
        loss: "nonsaturating" or "wgan_gp".
        latent_dim: size of z.
        width: the networks' base number of channels.
        generator_norm: "pixel" or "batch" (see `Generator`).
        r1_gamma: gamma of the R1 penalty (0: off).
        gp_weight: lambda of the WGAN-GP gradient penalty.
        feature_matching: "l2", "l1" or "none".
        drift: epsilon of D's drift penalty (0: no `drift` layer).
        discriminator_learning_rate: D's Adam learning rate (default: `config.learning_rate`).
        ema_momentum: momentum of the moving average of G's weights (None: no average).
        n_critic: discriminator updates per generator update, each on its own batch (the
            Trainer's `phase_steps`; Gulrajani et al. 2017 use 5 with WGAN-GP).
        sample_every: steps between sample images and FID scores (0: only at the end).

    Returns:
        Each term's held-out value (real test images against fresh samples), `total/<phase>`,
        `d_accuracy` (the share of test and generated images D classifies right; non-saturating
        loss only), `step`, the global step reached, and for labelled data `fid`, `fid_floor`,
        `fid_classifier_accuracy` (its held-out accuracy) and `fid_samples`.

    Raises:
        ConfigError: for bad options or data, before any training.
    """
    strategy = set_up(config)
    with config_errors():
        check_known("loss", loss, ADVERSARIAL_LOSSES)
        check_known("feature_matching", feature_matching, FEATURE_MATCHING)
        check_known("generator_norm", generator_norm, GENERATOR_NORMS)
        for flag, value in (("latent_dim", latent_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{flag} ({value!r}) must be a positive integer.")
        for flag, value in (("r1_gamma", r1_gamma), ("gp_weight", gp_weight), ("drift", drift)):
            if not value >= 0:
                raise ValueError(f"--{flag} ({value!r}) must be >= 0 (0 turns it off).")
        if discriminator_learning_rate is not None and not discriminator_learning_rate > 0:
            raise ValueError(
                f"--discriminator_learning_rate ({discriminator_learning_rate!r}) must be positive."
            )
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 0:
            raise ValueError(f"--sample_every ({sample_every!r}) must be a non-negative integer.")
        if ema_momentum is not None and not 0 <= ema_momentum < 1:
            raise ValueError(f"--ema_momentum ({ema_momentum!r}) must be in [0, 1).")
        if isinstance(n_critic, bool) or not isinstance(n_critic, int) or n_critic <= 0:
            raise ValueError(f"--n_critic ({n_critic!r}) must be a positive integer.")
        split = data_lib.load_images(config.dataset, seed=config.seed)
        with strategy.scope():
            generator, discriminator = build_gan(
                split.image_shape, latent_dim, width, drift, config.seed, generator_norm
            )
            optimizer = {
                "discriminator": gan_optimizer(discriminator_learning_rate or config.learning_rate),
                "generator": gan_optimizer(config.learning_rate, ema_momentum=ema_momentum),
            }
        hparams = {
            "loss": loss,
            "latent_dim": latent_dim,
            "width": width,
            "generator_norm": generator_norm,
            "r1_gamma": r1_gamma,
            "gp_weight": gp_weight,
            "feature_matching": feature_matching,
            "drift": drift,
            "ema_momentum": ema_momentum if ema_momentum is not None else "none",
            "n_critic": n_critic,
        }
        trainer = GANTrainer(
            {"generator": generator, "discriminator": discriminator},
            optimizer,
            adversarial_loss=loss,
            r1_gamma=r1_gamma,
            gp_weight=gp_weight,
            feature_matching=feature_matching,
            phase_steps={"discriminator": n_critic},
            **trainer_options(
                config, strategy, hparams=hparams, hparams_metrics=("eval/fid", "eval/fid_floor")
            ),
        )
        test = data_lib.batches(split.x_test, config.batch_size, shuffle=False, seed=config.seed)
        trainer.build(test)
    scorer = None
    if split.y_train is not None:  # the FID classifier needs labels
        chief = trainer.writer is not None  # only the chief writes files
        scorer = fid_lib.fid_scorer(split, config.log_dir, write=chief, seed=config.seed)
        fid_latents = fixed_latents(latent_dim, config.seed + 1, count=scorer.num_samples)
    train = data_lib.batches(split.x_train, config.batch_size, shuffle=True, seed=config.seed)
    latents = fixed_latents(latent_dim, config.seed)
    while trainer.step < config.steps:
        stop = config.steps
        if sample_every:
            stop = min(stop, (trainer.step // sample_every + 1) * sample_every)
        trainer.fit(train, until_step=stop, **config.validation(test))
        if trainer.step < config.steps:
            write_samples(trainer, latents, config.log_dir, trainer.step)
            if scorer is not None:
                write_fid(trainer, scorer, fid_latents, trainer.step)
    path = write_samples(trainer, latents, config.log_dir, trainer.step)
    results = trainer.evaluate(test)
    results["step"] = float(trainer.step)
    if scorer is not None:
        results["fid"] = write_fid(trainer, scorer, fid_latents, trainer.step)
        results["fid_floor"] = scorer.floor
        results["fid_classifier_accuracy"] = scorer.held_out_accuracy
        results["fid_samples"] = float(scorer.num_samples)
    if trainer.writer is not None:
        generator.save(os.path.join(config.log_dir, GENERATOR_FILE))
        discriminator.save(os.path.join(config.log_dir, DISCRIMINATOR_FILE))
    logging.info(
        "Step %d: held-out d_adversarial %.3f, g_adversarial %.3f; samples in %s",
        trainer.step,
        results["d_adversarial"],
        results["g_adversarial"],
        path,
    )
    return results
