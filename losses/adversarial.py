"""Adversarial losses and the discriminator's penalties, for GANs.

Each function takes the discriminator's logits (or a callable discriminator, for the penalties
on its input gradients) and returns one value per example ([batch]), except `feature_matching`,
which compares two batch means and so is a batch statistic (a scalar).

A discriminator may return its logits alone ([batch] or [batch, 1]) or a tuple whose first item
is the logits (for example `(logits, features)`): the penalties take the logits from either.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from termwise.losses.layers import add_penalty

FEATURE_MATCHING_NORMS = ("l2", "l1")

# Registered, so that a model holding `DriftPenalty` (or an `ActivityPenalty(drift_penalty)`)
# reloads with `keras.models.load_model` after `import termwise`.
_serializable = keras.saving.register_keras_serializable(package="termwise")


def _per_example(logits) -> tf.Tensor:
    """[batch] float32 logits from [batch] or [batch, 1] (one value per example)."""
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    if logits.shape.rank == 2 and logits.shape[-1] == 1:
        return logits[:, 0]
    if logits.shape.rank != 1:
        raise ValueError(
            f"Discriminator logits must be [batch] or [batch, 1], got shape {logits.shape}."
        )
    return logits


def _logits_of(outputs) -> tf.Tensor:
    """The logits of a discriminator's outputs: the outputs, or their first item."""
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return outputs


def _sum_features(values: tf.Tensor) -> tf.Tensor:
    """Sums every axis but the first (the batch)."""
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def nonsaturating_discriminator_loss(real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
    """The discriminator's cross-entropy, real labelled 1 and fake 0 (Goodfellow et al. 2014).

    L_D(x, z) = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
              = softplus(-D(x)) + softplus(D(G(z)))

    Args:
        real_logits: [batch] or [batch, 1] logits D(x) of real examples.
        fake_logits: the logits D(G(z)) of as many generated examples.

    Returns:
        [batch] losses: example i pairs real i with fake i.
    """
    return tf.nn.softplus(-_per_example(real_logits)) + tf.nn.softplus(_per_example(fake_logits))


def nonsaturating_generator_loss(fake_logits: tf.Tensor) -> tf.Tensor:
    """The generator's non-saturating loss (Goodfellow et al. 2014, "Generative Adversarial Nets").

    L_G(z) = -log sigmoid(D(G(z))) = softplus(-D(G(z)))

    It has the fixed point of the minimax loss log(1 - sigmoid(D(G(z)))) but strong gradients
    early in training, when the discriminator rejects the samples confidently.

    Args:
        fake_logits: [batch] or [batch, 1] logits D(G(z)).

    Returns:
        [batch] losses.
    """
    return tf.nn.softplus(-_per_example(fake_logits))


def wasserstein_critic_loss(real_scores: tf.Tensor, fake_scores: tf.Tensor) -> tf.Tensor:
    """The critic's loss of a Wasserstein GAN (Arjovsky et al. 2017, "Wasserstein GAN").

    L_D(x, z) = D(G(z)) - D(x)

    whose minimum over 1-Lipschitz critics D is minus the Wasserstein-1 distance between the
    data and the generator; keep D Lipschitz with `gradient_penalty` (Gulrajani et al. 2017).

    Args:
        real_scores: [batch] or [batch, 1] critic scores D(x) (unbounded; not probabilities).
        fake_scores: the scores D(G(z)) of as many generated examples.

    Returns:
        [batch] losses.
    """
    return _per_example(fake_scores) - _per_example(real_scores)


def wasserstein_generator_loss(fake_scores: tf.Tensor) -> tf.Tensor:
    """The generator's loss of a Wasserstein GAN (Arjovsky et al. 2017).

    L_G(z) = -D(G(z))

    Args:
        fake_scores: [batch] or [batch, 1] critic scores D(G(z)).

    Returns:
        [batch] losses.
    """
    return -_per_example(fake_scores)


def _input_gradients(discriminator: Callable, x: tf.Tensor):
    """(outputs, d sum_i D(x_i) / d x): the per-example input gradients of D's logits.

    A nested tape: when called under an outer `tf.GradientTape`, the outer tape records this
    gradient computation, so a penalty on it can be differentiated again (double backprop).
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = discriminator(x)
        logits = _per_example(_logits_of(outputs))
        summed = tf.reduce_sum(logits)
    return outputs, tf.cast(tape.gradient(summed, x), tf.float32)


def r1_penalty(
    discriminator: Callable,
    real: tf.Tensor,
    gamma: float = 10.0,
    *,
    return_outputs: bool = False,
):
    """The R1 penalty on the discriminator's input gradient at real data (Mescheder et al. 2018).

    R1(x) = gamma / 2 * ||grad_x D(x)||_2^2

    "Which Training Methods for GANs do actually Converge?": penalising the gradient on real
    data only makes simultaneous gradient descent converge locally near the equilibrium. The
    gradient is taken with a nested `tf.GradientTape`, so the Trainer's tape differentiates the
    penalty with respect to D's weights. Each example's gradient is that of the sum of the
    logits, which is its own as long as D treats examples independently (no batch norm).

    Args:
        discriminator: a callable x -> logits ([batch] or [batch, 1]) or (logits, ...), for
            example `lambda x: d_model(x, training=True)`.
        real: [batch, ...] real examples.
        gamma: the penalty's weight, >= 0.
        return_outputs: also return the discriminator's outputs on `real`, so that one call
            serves both the penalty and the adversarial loss (a layer's `add_loss` values then
            count once).

    Returns:
        [batch] penalties, or `(penalties, outputs)` with `return_outputs`.

    Raises:
        ValueError: for a negative `gamma`.
    """
    if gamma < 0:
        raise ValueError(f"`gamma` ({gamma!r}) must be >= 0.")
    real = tf.convert_to_tensor(real)
    outputs, gradients = _input_gradients(discriminator, real)
    penalty = 0.5 * float(gamma) * _sum_features(tf.square(gradients))
    return (penalty, outputs) if return_outputs else penalty


def gradient_penalty(
    discriminator: Callable,
    real: tf.Tensor,
    fake: tf.Tensor,
    weight: float = 10.0,
    *,
    epsilon: tf.Tensor | None = None,
    seed: int | keras.random.SeedGenerator | None = None,
) -> tf.Tensor:
    """The WGAN-GP penalty (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs").

    GP = lambda * (||grad_x D(x_hat)||_2 - 1)^2,   x_hat = eps x + (1 - eps) x_fake,
    eps ~ U[0, 1] per example

    keeps the critic's gradient norm near 1 on lines between real and generated examples (a
    soft 1-Lipschitz constraint). The gradient is taken with a nested `tf.GradientTape`, so the
    Trainer's tape differentiates the penalty with respect to the critic's weights.

    Args:
        discriminator: a callable x -> scores ([batch] or [batch, 1]) or (scores, ...).
        real: [batch, ...] real examples.
        fake: [batch, ...] generated examples (gradients do not flow into them).
        weight: lambda (10 in the paper).
        epsilon: [batch] mixing coefficients; None draws them from U[0, 1] with `seed`.
        seed: for `keras.random.uniform`: a `keras.random.SeedGenerator` (deterministic and
            checkpointable inside a compiled step), an int, or None.

    Returns:
        [batch] penalties.

    Raises:
        ValueError: for a negative `weight`.
    """
    if weight < 0:
        raise ValueError(f"`weight` ({weight!r}) must be >= 0.")
    real = tf.cast(tf.convert_to_tensor(real), tf.float32)
    fake = tf.stop_gradient(tf.cast(tf.convert_to_tensor(fake), tf.float32))
    batch = tf.shape(real)[0]
    if epsilon is None:
        epsilon = keras.random.uniform([batch], seed=seed)
    epsilon = tf.reshape(tf.cast(epsilon, tf.float32), [batch] + [1] * (real.shape.rank - 1))
    interpolates = epsilon * real + (1.0 - epsilon) * fake
    _, gradients = _input_gradients(discriminator, interpolates)
    norms = tf.sqrt(_sum_features(tf.square(gradients)) + 1e-12)
    return float(weight) * tf.square(norms - 1.0)


def feature_matching(
    real_features: tf.Tensor, fake_features: tf.Tensor, norm: str = "l2"
) -> tf.Tensor:
    """Feature matching (Salimans et al. 2016, "Improved Techniques for Training GANs").

    l2: || E_batch f(x) - E_batch f(G(z)) ||_2^2
    l1: || E_batch f(x) - E_batch f(G(z)) ||_1

    where f is an intermediate layer of the discriminator: the generator is asked to match the
    statistics of real data's features rather than to fool the current discriminator alone.

    Args:
        real_features: [batch, ...] features f(x) of real examples.
        fake_features: [batch', ...] features f(G(z)) of generated examples.
        norm: "l2" (squared Euclidean, the paper's) or "l1".

    Returns:
        A scalar: it compares batch means, so it is a batch statistic (the Trainer reduces it
        as a scalar term).

    Raises:
        ValueError: for an unknown norm, or features of different sizes.
    """
    if norm not in FEATURE_MATCHING_NORMS:
        raise ValueError(f"`norm` ({norm!r}) must be one of {', '.join(FEATURE_MATCHING_NORMS)}.")
    real_features = tf.cast(tf.convert_to_tensor(real_features), tf.float32)
    fake_features = tf.cast(tf.convert_to_tensor(fake_features), tf.float32)
    if not real_features.shape[1:].is_compatible_with(fake_features.shape[1:]):
        raise ValueError(
            f"Real features {real_features.shape} and fake features {fake_features.shape} "
            "must have the same shape but for the batch."
        )
    difference = tf.reduce_mean(real_features, axis=0) - tf.reduce_mean(fake_features, axis=0)
    if norm == "l1":
        return tf.reduce_sum(tf.abs(difference))
    return tf.reduce_sum(tf.square(difference))


@_serializable
def drift_penalty(logits: tf.Tensor, epsilon: float = 1e-3) -> tf.Tensor:
    """The drift penalty of Karras et al. (2018, "Progressive Growing of GANs").

    drift(x) = epsilon * D(x)^2

    keeps the discriminator's outputs from drifting far from zero (the Wasserstein critic's
    loss alone does not fix their offset).

    Args:
        logits: [batch] or [batch, 1] discriminator outputs.
        epsilon: the penalty's weight (0.001 in the paper).

    Returns:
        [batch] penalties.
    """
    return float(epsilon) * tf.square(_per_example(logits))


@_serializable
class DriftPenalty(keras.layers.Layer):
    """Adds `drift_penalty(logits, epsilon)` with `add_loss` and returns the logits unchanged.

    Place it on a discriminator's logits: every call adds epsilon * D(x)^2 per example, so in a
    phase that calls the discriminator on real then fake data, the Trainer's term (named by
    this layer) is epsilon * (D(x_real)^2 + D(x_fake)^2) per example.

    The value is per example ([batch]): `termwise.Trainer` averages it over the batch, while
    `keras.Model.fit` sums every `add_loss` value, so under plain `fit` the penalty weighs
    batch_size times more (see `termwise.losses.layers`).

    Args:
        epsilon: the penalty's weight (Karras et al. 2018 use 0.001); > 0.
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` ({epsilon!r}) must be positive.")
        self.epsilon = float(epsilon)

    def call(self, logits, training=None):
        add_penalty(self, drift_penalty(logits, self.epsilon), training)
        return logits

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
