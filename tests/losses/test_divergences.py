"""The Gaussian KL against a Monte-Carlo estimate, and the free-bits floor by hand."""

import numpy as np
import pytest

from termwise import losses


def test_gaussian_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mean = np.array([[0.5, -1.0], [0.0, 2.0]], "float32")
    log_var = np.array([[0.2, -0.7], [0.0, 1.0]], "float32")
    exact = losses.gaussian_kl(mean, log_var).numpy()
    std = np.exp(0.5 * log_var.astype("float64"))
    z = mean + std * rng.normal(size=(400_000, *mean.shape))
    log_q = -0.5 * (((z - mean) / std) ** 2 + np.log(2 * np.pi) + log_var)
    log_p = -0.5 * (z**2 + np.log(2 * np.pi))
    estimate = (log_q - log_p).sum(-1).mean(0)
    np.testing.assert_allclose(exact, estimate, rtol=0.02, atol=0.01)
    assert losses.gaussian_kl(np.zeros((1, 3)), np.zeros((1, 3))).numpy() == pytest.approx(0.0)


def test_free_bits_floor():
    per_dim = np.array([[0.1, 2.0, 0.0], [0.3, 4.0, 0.0]], "float32")  # batch means .2, 3, 0
    assert float(losses.free_bits_kl(per_dim, 0.5)) == pytest.approx(0.5 + 3.0 + 0.5)
    assert float(losses.free_bits_kl(per_dim, 0.0)) == pytest.approx(3.2)
    with pytest.raises(ValueError, match=r"`free_bits` \(-1\)"):
        losses.free_bits_kl(per_dim, -1)
