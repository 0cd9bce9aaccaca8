"""Divergences between a model's distributions and their priors, per example."""

from __future__ import annotations

import tensorflow as tf


def gaussian_kl_per_dimension(mean: tf.Tensor, log_variance: tf.Tensor) -> tf.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) of each latent dimension (Kingma & Welling 2014, App. B).

    KL_j = 0.5 * (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)

    Args:
        mean: [batch, latent] means mu.
        log_variance: [batch, latent] log sigma^2.

    Returns:
        [batch, latent] non-negative KLs, in nats.
    """
    mean = tf.convert_to_tensor(mean)
    log_variance = tf.cast(log_variance, mean.dtype)
    return 0.5 * (tf.exp(log_variance) + tf.square(mean) - 1.0 - log_variance)


def gaussian_kl(mean: tf.Tensor, log_variance: tf.Tensor) -> tf.Tensor:
    """KL(q(z|x) || N(0, I)) of a diagonal Gaussian q, per example (Kingma & Welling 2014).

    KL = 0.5 * sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)

    Returns:
        [batch] KLs, in nats.
    """
    return tf.reduce_sum(gaussian_kl_per_dimension(mean, log_variance), axis=-1)


def free_bits_kl(kl_per_dimension: tf.Tensor, free_bits: float) -> tf.Tensor:
    """The free-bits KL of Kingma et al. (2016), "Improved Variational Inference with IAF".

    KL_lambda = sum_j max(lambda, E_batch[KL_j])

    No latent dimension is pushed below `lambda` nats: below it a dimension's KL has no gradient,
    which keeps the encoder from collapsing it to the prior early in training.

    Args:
        kl_per_dimension: [batch, latent] values from `gaussian_kl_per_dimension`.
        free_bits: lambda >= 0, in nats per dimension.

    Returns:
        A scalar (it is a batch statistic, so the Trainer reduces it as a scalar term).
    """
    if free_bits < 0:
        raise ValueError(f"`free_bits` ({free_bits!r}) must be >= 0.")
    return tf.reduce_sum(tf.maximum(tf.reduce_mean(kl_per_dimension, axis=0), float(free_bits)))
