"""Per-example data terms: each takes [batch, ...] tensors and returns [batch] values.

Returning one value per example (not a batch mean) is what lets the Trainer sample-weight a term
and divide by the *global* batch size, so a term means the same on 1 or N replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf


def _sum_features(values: tf.Tensor) -> tf.Tensor:
    """Sums every axis but the first (the batch)."""
    if values.shape.rank is not None and values.shape.rank <= 1:
        return values
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _mean_features(values: tf.Tensor) -> tf.Tensor:
    """Averages every axis but the first (the batch)."""
    if values.shape.rank is not None and values.shape.rank <= 1:
        return values
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def bernoulli_nll(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Negative log-likelihood of targets in [0, 1] under Bernoulli(sigmoid(logits)).

    -log p(x | l) = sum_d softplus(l_d) - x_d * l_d

    summed over every feature axis: the reconstruction term of a VAE with a Bernoulli decoder
    (Kingma & Welling 2014). Stable for any logits: it never forms sigmoid(l).

    Args:
        targets: [batch, ...] values in [0, 1] (binary or grey levels).
        logits: [batch, ...] decoder logits of the same shape.

    Returns:
        [batch] negative log-likelihoods, in nats.
    """
    logits = tf.convert_to_tensor(logits)
    targets = tf.cast(targets, logits.dtype)
    return _sum_features(tf.nn.softplus(logits) - targets * logits)


def weighted_binary_crossentropy(
    labels: tf.Tensor, logits: tf.Tensor, positive_weight: float = 1.0
) -> tf.Tensor:
    """Binary cross-entropy with the positive class weighted, for imbalanced labels.

    l(y, z) = -[w y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]
            = (1 - y) z + (1 + (w - 1) y) softplus(-z)

    averaged over the label axes. With `w` = (#negatives / #positives) both classes weigh the
    same in total; `w` = 1 is the ordinary binary cross-entropy. Weighting the rare class so is
    the correction of King & Zeng (2001), "Logistic Regression in Rare Events Data".

    Args:
        labels: [batch, ...] targets in [0, 1].
        logits: [batch, ...] logits of the same shape.
        positive_weight: w > 0, the weight of the positive class.

    Returns:
        [batch] losses.

    Raises:
        ValueError: if `positive_weight` is not positive.
    """
    if not positive_weight > 0:
        raise ValueError(f"`positive_weight` ({positive_weight!r}) must be positive.")
    logits = tf.convert_to_tensor(logits)
    labels = tf.cast(labels, logits.dtype)
    per_label = (1.0 - labels) * logits + (1.0 + (positive_weight - 1.0) * labels) * tf.nn.softplus(
        -logits
    )
    return _mean_features(per_label)


def mean_squared_error(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Squared error averaged over the feature axes: mean_d (y_d - y_hat_d)^2.

    Returns:
        [batch] values (a [batch] input gives the squared error per example).
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    return _mean_features(tf.square(y_pred - y_true))


def mean_over_outputs(
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
) -> Callable[[Sequence[tf.Tensor], Sequence[tf.Tensor]], tf.Tensor]:
    """A loss for a model with K outputs: the mean of `loss_fn` over them.

    l(y, y_hat) = (1 / K) sum_k loss_fn(y_k, y_hat_k)

    Example: `Trainer(model, opt, loss=losses.mean_over_outputs(losses.mean_squared_error))` for
    a model that returns a list of forecasts.

    Returns:
        A function of (targets, predictions), two sequences of K [batch, ...] tensors (or dicts
        with the same keys), that returns [batch] values.
    """

    def loss(y_true, y_pred):
        trues, preds = tf.nest.flatten(y_true), tf.nest.flatten(y_pred)
        if len(trues) != len(preds) or not preds:
            raise ValueError(
                f"mean_over_outputs: {len(trues)} targets for {len(preds)} outputs; give one "
                "target per output."
            )
        return tf.add_n([loss_fn(t, p) for t, p in zip(trues, preds, strict=True)]) / float(
            len(preds)
        )

    return loss
