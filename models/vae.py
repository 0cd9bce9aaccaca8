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

import keras
import tensorflow as tf

import losses
from trainer import Trainer


class GaussianKL(keras.layers.Layer):
    """Adds the KL of q(z|x) = N(mean, exp(log_variance)) to N(0, I) with `add_loss`.

    Call it on `[mean, log_variance]`; it returns them unchanged. The value added is the
    per-example KL ([batch]), or, in training with `free_bits > 0`, the scalar
    `sum_j max(free_bits, mean_i KL_ij)` (Kingma et al. 2016).

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
        if self.free_bits > 0 and training:
            per_dimension = losses.gaussian_kl_per_dimension(mean, log_variance)
            self.add_loss(losses.free_bits_kl(per_dimension, self.free_bits))
        else:
            self.add_loss(losses.gaussian_kl(mean, log_variance))
        return mean, log_variance

    def get_config(self):
        return {**super().get_config(), "free_bits": self.free_bits}


class Sample(keras.layers.Layer):
    """Reparameterised sample z = mean + exp(log_variance / 2) * eps, eps ~ N(0, I)."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        mean, log_variance = inputs
        eps = keras.random.normal(tf.shape(mean), seed=self.seed_generator)
        return mean + tf.exp(0.5 * log_variance) * eps


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
        logits = keras.layers.Conv2DTranspose(channels, 3, strides=2, padding="same")(h)
    else:
        h = keras.layers.Dense(128, activation="relu")(latents)
        h = keras.layers.Dense(256, activation="relu")(h)
        h = keras.layers.Dense(height * width * channels)(h)
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
        logits = self.model(images, training=training)
        return {"reconstruction": losses.bernoulli_nll(images, logits)}
