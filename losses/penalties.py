"""Penalties on activations: L1 sparsity, feature diversity, and KLs to a target distribution.

`l1_activity` is per example ([batch]); the others compare a statistic of the whole batch with
a target, so they return a scalar, which the Trainer reduces as a scalar term (the mean over
replicas). `fraction_below` is a measurement to log, not a penalty.

Each function takes activations of any rank: for the per-example ones every axis but the
first is a feature axis; for the batch statistics the last axis indexes units and every other
axis (batch, time, height, width) holds samples of them.
"""

from __future__ import annotations

import keras
import tensorflow as tf

SQUASHES = ("sigmoid", "symmetric", "none")

# Registered, so that an `ActivityPenalty(fn)` layer holding one can be saved and loaded.
_serializable = keras.saving.register_keras_serializable(package="termwise")


def _flat_features(values: tf.Tensor) -> tf.Tensor:
    """[batch, ...] -> [batch, features]."""
    values = tf.convert_to_tensor(values)
    if values.shape.rank is not None and values.shape.rank <= 1:
        return tf.reshape(values, [-1, 1])
    return tf.reshape(values, [tf.shape(values)[0], -1])


def _samples_by_unit(values: tf.Tensor) -> tf.Tensor:
    """[..., units] -> [samples, units]: every axis but the last holds samples."""
    values = tf.cast(values, tf.float32)
    if values.shape.rank is not None and values.shape.rank < 2:
        raise ValueError(
            f"Expected activations of shape [batch, ..., units], got rank {values.shape.rank}."
        )
    return tf.reshape(values, [-1, tf.shape(values)[-1]])


@_serializable
def l1_activity(activations: tf.Tensor, *, mean: bool = False) -> tf.Tensor:
    """The L1 activity penalty, per example: sum_d |a_d| (or mean_d |a_d| with `mean`).

    An L1 penalty on activations drives many of them to exactly zero behind a ReLU: a sparse
    code (Olshausen & Field 1996; Glorot, Bordes & Bengio 2011, "Deep Sparse Rectifier Neural
    Networks"). Keras's `ActivityRegularizer(l1=...)` is the summed form, averaged over the batch.

    Args:
        activations: [batch, ...] activations.
        mean: average over the feature axes instead of summing, so that the penalty's scale does
            not depend on the layer's size.

    Returns:
        [batch] penalties.
    """
    values = tf.abs(tf.cast(_flat_features(activations), tf.float32))
    return tf.reduce_mean(values, axis=1) if mean else tf.reduce_sum(values, axis=1)


@_serializable
def fraction_below(activations: tf.Tensor, threshold: float = 1e-3) -> tf.Tensor:
    """The fraction of each example's activations with |a| < threshold: a sparsity measure.

    Returns:
        [batch] fractions in [0, 1] (log them with `Trainer.add_metric`; they have no gradient).
    """
    values = tf.abs(tf.cast(_flat_features(activations), tf.float32))
    return tf.reduce_mean(tf.cast(values < threshold, tf.float32), axis=1)


@_serializable
def feature_diversity(features: tf.Tensor, *, between: str = "examples") -> tf.Tensor:
    """The mean pairwise cosine similarity of feature vectors: a batch statistic to minimise.

    With `between="examples"` the vectors are the rows f_1..f_n of the [n, d] feature batch
    (each example's features); with `between="units"` they are its columns (each unit's
    responses over the batch). With u_i = f_i / ||f_i|| (a zero vector stays zero):

        S = 1 / (n (n - 1)) * sum_{i != j} cos(f_i, f_j)
          = (||sum_i u_i||^2 - sum_i ||u_i||^2) / (n (n - 1))

    S is 1 when all vectors point the same way and 0 when they are orthogonal; minimising it
    spreads the examples' representations apart ("examples"), or makes units respond to
    different inputs ("units"). Related work: Cogswell et al. (2016), "Reducing Overfitting in
    Deep Networks by Decorrelating Representations" (DeCov), which penalises the off-diagonal
    covariance of units over the batch; this is the scale-free cosine form, not DeCov itself.

    Args:
        features: [batch, ...] features (flattened to [batch, d]).
        between: "examples" (rows) or "units" (columns).

    Returns:
        A scalar in [-1, 1]; 0 for fewer than two vectors.
    """
    if between not in ("examples", "units"):
        raise ValueError(f"`between` ({between!r}) must be 'examples' or 'units'.")
    f = tf.cast(_flat_features(features), tf.float32)
    if between == "units":
        f = tf.transpose(f)
    u = tf.math.l2_normalize(f, axis=1, epsilon=1e-12)
    n = tf.cast(tf.shape(u)[0], tf.float32)
    total = tf.reduce_sum(tf.square(tf.reduce_sum(u, axis=0)))
    self_similarity = tf.reduce_sum(tf.square(u))
    return tf.math.divide_no_nan(total - self_similarity, n * (n - 1.0))


def _squash(values: tf.Tensor, squash: str) -> tf.Tensor:
    if squash == "sigmoid":
        return tf.sigmoid(values)
    if squash == "symmetric":
        return (values + 1.0) / 2.0
    if squash == "none":
        return values
    raise ValueError(f"`squash` ({squash!r}) must be one of {', '.join(SQUASHES)}.")


@_serializable
def bernoulli_sparsity_kl(
    activations: tf.Tensor,
    target: float = 0.05,
    *,
    squash: str = "sigmoid",
    epsilon: float = 1e-6,
) -> tf.Tensor:
    """The sparse-autoencoder penalty of Ng (2011), "Sparse autoencoder" (CS294A lecture notes).

    Each unit j's activations are mapped to (0, 1) by `squash` and averaged over the samples
    (batch, and time or space if present): rho_hat_j. The penalty is the KL between a Bernoulli
    of the target mean rho and a Bernoulli of the observed mean, summed over units:

        sum_j KL(rho || rho_hat_j)
            = sum_j rho log(rho / rho_hat_j) + (1 - rho) log((1 - rho) / (1 - rho_hat_j))

    It is zero exactly when every unit's mean activation is rho.

    Args:
        activations: [batch, ..., units].
        target: rho in (0, 1), the declared mean activation of each unit.
        squash: the map to (0, 1): "sigmoid" (sigma(a), for unbounded activations), "symmetric"
            ((a + 1) / 2, for activations already in (-1, 1) such as tanh or an LSTM's hidden
            state), or "none" (already in (0, 1), e.g. sigmoid units).
        epsilon: rho_hat is clipped to [epsilon, 1 - epsilon].

    Returns:
        A scalar, in nats (a batch statistic).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"`target` ({target!r}) must be in (0, 1).")
    rho_hat = tf.reduce_mean(_squash(_samples_by_unit(activations), squash), axis=0)
    rho_hat = tf.clip_by_value(rho_hat, epsilon, 1.0 - epsilon)
    rho = tf.constant(target, tf.float32)
    kl = rho * tf.math.log(rho / rho_hat) + (1.0 - rho) * tf.math.log((1.0 - rho) / (1.0 - rho_hat))
    return tf.reduce_sum(kl)


@_serializable
def gaussian_moments_kl(
    activations: tf.Tensor, sigma: float = 1.0, *, epsilon: float = 1e-6
) -> tf.Tensor:
    """KL from each unit's moment-matched Gaussian to a declared N(0, sigma^2), summed over units.

    Unit j's activations over the samples (batch, and time or space if present) have mean m_j
    and variance s_j^2; the penalty is, in closed form,

        sum_j KL(N(m_j, s_j^2) || N(0, sigma^2))
            = sum_j log(sigma / s_j) + (s_j^2 + m_j^2) / (2 sigma^2) - 1/2

    zero exactly when every unit has mean 0 and standard deviation sigma. It is a divergence
    between the Gaussian that matches the activations' first two moments and the target (the
    moment-matching view of a batch-level distribution penalty; compare the aggregate-posterior
    matching of Makhzani et al. 2016, "Adversarial Autoencoders"): higher moments are ignored.

    Args:
        activations: [batch, ..., units].
        sigma: the target's standard deviation, > 0.
        epsilon: added to s_j^2 before its log, so that a dead unit gives a large finite value.

    Returns:
        A scalar, in nats (a batch statistic).
    """
    if not sigma > 0:
        raise ValueError(f"`sigma` ({sigma!r}) must be positive.")
    mean, variance = tf.nn.moments(_samples_by_unit(activations), axes=[0])
    sigma2 = tf.constant(float(sigma) ** 2, tf.float32)
    log_ratio = tf.math.log(sigma2) - tf.math.log(variance + epsilon)
    kl = 0.5 * (log_ratio + (variance + tf.square(mean)) / sigma2 - 1.0)
    return tf.reduce_sum(kl)
