"""Per-example data terms against numpy references computed from their definitions."""

import numpy as np
import pytest
import tensorflow as tf

from termwise import losses


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_bernoulli_nll_is_the_summed_log_likelihood():
    rng = np.random.default_rng(0)
    x = (rng.random((4, 3, 3, 1)) > 0.5).astype("float32")
    x[0, 0, 0, 0] = 0.3  # grey levels are allowed
    logits = rng.normal(size=(4, 3, 3, 1)).astype("float32") * 3
    p = sigmoid(logits.astype("float64"))
    expected = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(4, -1).sum(1)
    got = losses.bernoulli_nll(x, logits).numpy()
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bernoulli_nll_is_stable_for_large_logits():
    got = losses.bernoulli_nll(tf.constant([[1.0, 0.0]]), tf.constant([[200.0, -200.0]]))
    assert float(got[0]) == pytest.approx(0.0, abs=1e-6)


def test_weighted_binary_crossentropy():
    y = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], "float32")
    z = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], "float32")
    p = sigmoid(z.astype("float64"))
    for w in (1.0, 4.0):
        expected = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)
        got = losses.weighted_binary_crossentropy(y, z, positive_weight=w).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    reference = tf.nn.weighted_cross_entropy_with_logits(y, z, pos_weight=4.0)
    np.testing.assert_allclose(
        losses.weighted_binary_crossentropy(y, z, 4.0), tf.reduce_mean(reference, 1), rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"`positive_weight` \(0\) must be positive"):
        losses.weighted_binary_crossentropy(y, z, 0)


def test_mean_squared_error_per_example():
    y = np.array([[1.0, 2.0], [0.0, 0.0]], "float32")
    y_hat = np.array([[1.0, 4.0], [3.0, -1.0]], "float32")
    np.testing.assert_allclose(losses.mean_squared_error(y, y_hat), [2.0, 5.0])
    np.testing.assert_allclose(losses.mean_squared_error(y[:, 0], y_hat[:, 0]), [0.0, 9.0])


def test_mean_over_outputs():
    fn = losses.mean_over_outputs(losses.mean_squared_error)
    y = [np.zeros((2, 1), "float32"), np.zeros((2, 2), "float32")]
    y_hat = [np.array([[1.0], [2.0]], "float32"), np.array([[3.0, 1.0], [0.0, 0.0]], "float32")]
    # outputs' per-example losses: [1, 4] and [5, 0]; their mean: [3, 2].
    np.testing.assert_allclose(fn(y, y_hat), [3.0, 2.0])
    with pytest.raises(ValueError, match="2 targets for 1 outputs"):
        fn(y, y_hat[:1])
