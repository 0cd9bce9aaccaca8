"""Adversarial losses and penalties against references computed independently in numpy."""

import numpy as np
import pytest
import tensorflow as tf

from termwise import losses


def softplus(x):
    return np.logaddexp(0.0, x)


def test_nonsaturating_losses_match_softplus_formulas():
    real = np.array([2.0, -1.0, 0.0, 30.0], "float32")
    fake = np.array([-3.0, 0.5, 0.0, -30.0], "float32")
    # -log sigmoid(r) - log(1 - sigmoid(f)), computed from probabilities where that is stable.
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v.astype("float64")))  # noqa: E731
    expected_d = -np.log(sigmoid(real[:3])) - np.log(1.0 - sigmoid(fake[:3]))
    got_d = losses.nonsaturating_discriminator_loss(real, fake).numpy()
    np.testing.assert_allclose(got_d[:3], expected_d, rtol=1e-5)
    np.testing.assert_allclose(got_d, softplus(-real) + softplus(fake), rtol=1e-5, atol=1e-7)
    got_g = losses.nonsaturating_generator_loss(fake[:, None]).numpy()  # [batch, 1] is accepted
    np.testing.assert_allclose(got_g, softplus(-fake.astype("float64")), rtol=1e-5)
    assert got_g.shape == (4,)
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, 1\]"):
        losses.nonsaturating_generator_loss(np.zeros((4, 2), "float32"))


def test_wasserstein_losses_by_hand():
    real = np.array([[1.5], [-2.0]], "float32")
    fake = np.array([[0.5], [1.0]], "float32")
    np.testing.assert_allclose(losses.wasserstein_critic_loss(real, fake), [-1.0, 3.0])
    np.testing.assert_allclose(losses.wasserstein_generator_loss(fake), [-0.5, -1.0])


# A small discriminator D(x) = v . tanh(W x + b) + c, written once in numpy (for finite
# differences) and once with TensorFlow ops (what the penalty differentiates).
RNG = np.random.default_rng(0)
W = RNG.normal(size=(5, 3))
B = RNG.normal(size=5)
V = RNG.normal(size=5)
X = RNG.normal(size=(4, 3))


def d_numpy(x, w=W):
    return np.tanh(x @ w.T + B) @ V + 0.3


def d_tf(w):
    return lambda x: tf.linalg.matvec(tf.tanh(tf.matmul(x, w, transpose_b=True) + B), V) + 0.3


def r1_numpy(x, gamma, w=W, h=1e-5):
    """gamma / 2 ||grad_x D(x)||^2 per example, the gradient by central differences."""
    grads = np.zeros_like(x)
    for d in range(x.shape[1]):
        step = np.zeros_like(x)
        step[:, d] = h
        grads[:, d] = (d_numpy(x + step, w) - d_numpy(x - step, w)) / (2 * h)
    return 0.5 * gamma * (grads**2).sum(axis=1)


def test_r1_matches_finite_differences():
    w = tf.Variable(W)
    penalty, logits = losses.r1_penalty(d_tf(w), tf.constant(X), gamma=10.0, return_outputs=True)
    np.testing.assert_allclose(penalty.numpy(), r1_numpy(X, 10.0), rtol=1e-6)
    np.testing.assert_allclose(logits.numpy(), d_numpy(X), rtol=1e-12)
    np.testing.assert_allclose(losses.r1_penalty(d_tf(w), X, gamma=0.0).numpy(), np.zeros(4))


def test_r1_is_differentiable_with_respect_to_the_weights():
    """The nested tape lets an outer tape differentiate the penalty (double backprop)."""
    w = tf.Variable(W)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(losses.r1_penalty(d_tf(w), tf.constant(X), gamma=2.0))
    got = tape.gradient(total, w).numpy()
    expected = np.zeros_like(W)
    h = 1e-5
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            step = np.zeros_like(W)
            step[i, j] = h
            plus = r1_numpy(X, 2.0, W + step, h=1e-4).sum()
            minus = r1_numpy(X, 2.0, W - step, h=1e-4).sum()
            expected[i, j] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = w . x + b has grad_x D = w everywhere: GP = lambda (||w|| - 1)^2 per example."""
    w = np.array([3.0, 4.0], "float32")  # ||w|| = 5
    critic = lambda x: tf.linalg.matvec(x, w) + 1.0  # noqa: E731
    real = RNG.normal(size=(6, 2)).astype("float32")
    fake = RNG.normal(size=(6, 2)).astype("float32")
    penalty = losses.gradient_penalty(critic, real, fake, weight=10.0, seed=3).numpy()
    np.testing.assert_allclose(penalty, np.full(6, 10.0 * (5.0 - 1.0) ** 2), rtol=1e-5)


def test_gradient_penalty_interpolates_per_example():
    """D(x) = ||x||^2 / 2 has grad = x_hat: the penalty reveals each example's epsilon."""
    critic = lambda x: 0.5 * tf.reduce_sum(tf.square(x), axis=[1, 2])  # noqa: E731
    real = np.zeros((3, 2, 2), "float32")
    real[:, 0, 0] = 1.0  # ||x|| = 1
    fake = np.zeros_like(real)
    eps = np.array([0.0, 0.25, 1.0], "float32")
    given = losses.gradient_penalty(critic, real, fake, weight=2.0, epsilon=eps).numpy()
    np.testing.assert_allclose(given, 2.0 * (eps - 1.0) ** 2, atol=1e-5)  # ||x_hat|| = eps

    real = np.zeros((64, 2, 2), "float32")
    real[:, 0, 0] = 1.0
    drawn = losses.gradient_penalty(critic, real, np.zeros_like(real), weight=1.0, seed=7).numpy()
    implied = 1.0 - np.sqrt(drawn)  # eps, since eps <= 1
    assert implied.min() >= -1e-5 and implied.max() <= 1.0 + 1e-5
    assert np.unique(implied.round(4)).size > 32  # one epsilon per example, not per batch
    again = losses.gradient_penalty(critic, real, np.zeros_like(real), weight=1.0, seed=7)
    np.testing.assert_array_equal(drawn, again.numpy())


def test_feature_matching_zero_on_identical_batches_and_by_hand():
    real = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")  # batch mean [2, 3]
    fake = np.array([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]], "float32")  # batch mean [1, 1]
    assert float(losses.feature_matching(real, real[::-1])) == 0.0
    assert float(losses.feature_matching(real, fake)) == pytest.approx(1.0**2 + 2.0**2)
    assert float(losses.feature_matching(real, fake, norm="l1")) == pytest.approx(1.0 + 2.0)
    images = RNG.normal(size=(5, 2, 2, 3)).astype("float32")  # features of any rank
    assert float(losses.feature_matching(images, images)) == 0.0
    assert losses.feature_matching(real, fake).shape == ()
    with pytest.raises(ValueError, match=r"`norm` \('l3'\) must be one of l2, l1"):
        losses.feature_matching(real, fake, norm="l3")


def test_drift_penalty_and_its_layer():
    logits = np.array([[2.0], [-1.0]], "float32")
    np.testing.assert_allclose(losses.drift_penalty(logits, 0.01), [0.04, 0.01], rtol=1e-6)
    layer = losses.DriftPenalty(0.5, name="drift")
    out = layer(logits)
    np.testing.assert_array_equal(out, logits)
    np.testing.assert_allclose(layer.losses[0], [2.0, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match=r"`epsilon` \(0\) must be positive"):
        losses.DriftPenalty(0)
