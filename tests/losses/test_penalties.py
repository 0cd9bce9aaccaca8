"""Activation penalties against numpy references, their layers, and `penalize` on real models."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise import losses
from termwise.trainer.terms import LossRecorder


def test_l1_activity_and_fraction_below_by_hand():
    a = np.array([[[1.0, -2.0], [0.0, 0.5]], [[0.0, 0.0], [0.0004, -3.0]]], "float32")
    np.testing.assert_allclose(losses.l1_activity(a).numpy(), [3.5, 3.0004], rtol=1e-6)
    np.testing.assert_allclose(losses.l1_activity(a, mean=True).numpy(), [0.875, 0.7501], rtol=1e-6)
    # |a| < 1e-3: one of four in the first example, three of four in the second.
    np.testing.assert_allclose(losses.fraction_below(a).numpy(), [0.25, 0.75])


def _mean_pairwise_cosine(rows):
    similarities = []
    for i, j in itertools.permutations(range(len(rows)), 2):
        ni, nj = np.linalg.norm(rows[i]), np.linalg.norm(rows[j])
        similarities.append(0.0 if ni == 0 or nj == 0 else rows[i] @ rows[j] / (ni * nj))
    return float(np.mean(similarities))


def test_feature_diversity_extremes_and_reference():
    identical = np.tile([[1.0, 2.0, -3.0]], (5, 1)).astype("float32")
    assert float(losses.feature_diversity(identical)) == pytest.approx(1.0, abs=1e-6)
    orthogonal = np.eye(4, dtype="float32") * np.array([[1.0], [3.0], [0.5], [2.0]], "float32")
    assert float(losses.feature_diversity(orthogonal)) == pytest.approx(0.0, abs=1e-7)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 5)).astype("float32")
    f[2] = 0.0  # a dead row counts as similarity 0
    assert float(losses.feature_diversity(f)) == pytest.approx(_mean_pairwise_cosine(f), abs=1e-5)
    assert float(losses.feature_diversity(f, between="units")) == pytest.approx(
        _mean_pairwise_cosine(f.T), abs=1e-5
    )
    assert float(losses.feature_diversity(f[:1])) == 0.0
    with pytest.raises(ValueError, match="`between`"):
        losses.feature_diversity(f, between="rows")


def test_bernoulli_sparsity_kl_matches_formula():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 3, 4)).astype("float64")  # [batch, time, units]
    rho = 0.1
    rho_hat = (1 / (1 + np.exp(-a))).reshape(-1, 4).mean(0)
    expected = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    got = losses.bernoulli_sparsity_kl(a.astype("float32"), rho)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-5)
    h = np.tanh(a)  # an LSTM's hidden state, in (-1, 1)
    rho_hat = ((h + 1) / 2).reshape(-1, 4).mean(0)
    expected = np.sum(0.5 * np.log(0.5 / rho_hat) + 0.5 * np.log(0.5 / (1 - rho_hat)))
    got = losses.bernoulli_sparsity_kl(h.astype("float32"), 0.5, squash="symmetric")
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Zero when every unit's mean is the target.
    at_target = np.full((4, 2), 0.3, "float32")
    assert float(losses.bernoulli_sparsity_kl(at_target, 0.3, squash="none")) == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(ValueError, match="`target`"):
        losses.bernoulli_sparsity_kl(a, 1.0)


def test_gaussian_moments_kl_matches_monte_carlo_kl():
    rng = np.random.default_rng(3)
    a = rng.normal(loc=[0.3, -0.2], scale=[0.4, 1.5], size=(20_000, 2)).astype("float32")
    sigma = 0.7
    got = float(losses.gaussian_moments_kl(a, sigma))
    # The KL between the moment-matched Gaussians and N(0, sigma^2), by Monte Carlo.
    m, s = a.astype("float64").mean(0), a.astype("float64").std(0)
    z = m + s * rng.normal(size=(400_000, 2))
    log_q = -0.5 * (((z - m) / s) ** 2 + np.log(2 * np.pi * s**2))
    log_p = -0.5 * ((z / sigma) ** 2 + np.log(2 * np.pi * sigma**2))
    assert got == pytest.approx((log_q - log_p).sum(-1).mean(), rel=0.02)
    standard = rng.normal(scale=sigma, size=(50_000, 3)).astype("float32")
    assert float(losses.gaussian_moments_kl(standard, sigma)) == pytest.approx(0.0, abs=2e-3)


def test_penalty_layers_add_loss_return_input_and_round_trip():
    x = np.array([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]], "float32")
    cases = [
        (losses.L1ActivitySparsity(scale=0.5, name="sparsity_x"), 0.5 * np.array([2.0, 2.0])),
        (losses.L1ActivitySparsity(mean=True, name="sparsity_mean"), np.array([2 / 3, 2 / 3])),
        (losses.FeatureDiversity(name="diversity"), np.float32(1 / np.sqrt(2))),
        (losses.GaussianActivityKL(sigma=2.0, name="kl_gauss"), None),
        (losses.BernoulliSparsityKL(0.2, squash="sigmoid", name="kl_bern"), None),
        (losses.ActivityPenalty(losses.l1_activity, 2.0, name="generic"), np.array([4.0, 4.0])),
    ]
    for layer, expected in cases:
        with LossRecorder() as recorder:
            out = layer(x)
        np.testing.assert_array_equal(out, x)
        (value,) = recorder.terms().values()
        assert list(recorder.terms()) == [layer.name]
        if expected is not None:
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6)
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
        with LossRecorder() as recorder:
            clone(x)
        np.testing.assert_allclose(recorder.terms()[layer.name].numpy(), value.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="`scale`"):
        losses.L1ActivitySparsity(scale=-1.0)


def _sequential():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="seq",
    )


def _functional():
    x = keras.Input((5,))
    a = keras.layers.Dense(4, activation="relu", name="hidden")(x)
    b = keras.layers.Dense(3, activation="tanh", name="side")(x)
    h = keras.layers.Concatenate(name="concat")([a, b])
    return keras.Model(x, keras.layers.Dense(2, name="out")(h), name="fun")


@pytest.mark.parametrize("make", [_sequential, _functional], ids=["sequential", "functional"])
def test_penalize_shares_weights_and_adds_the_named_term(make):
    model = make()
    x = np.random.default_rng(4).normal(size=(3, 5)).astype("float32")
    penalized = losses.penalize(model, "hidden", losses.L1ActivitySparsity(name="sparsity_hidden"))
    assert penalized.name == model.name
    assert len(penalized.weights) == len(model.weights)
    assert all(a is b for a, b in zip(penalized.weights, model.weights, strict=True))
    np.testing.assert_allclose(penalized(x), model(x), rtol=1e-6)
    hidden = model.get_layer("hidden")
    expected = np.abs(np.maximum(x @ hidden.kernel.numpy() + hidden.bias.numpy(), 0)).sum(1)
    with LossRecorder() as recorder:
        penalized(x)
    assert list(recorder.terms()) == ["sparsity_hidden"]
    np.testing.assert_allclose(recorder.terms()["sparsity_hidden"].numpy(), expected, rtol=1e-5)
    # Training the penalised model trains the original: one variable, seen by both.
    hidden.kernel.assign(hidden.kernel + 1.0)
    np.testing.assert_allclose(penalized(x), model(x), rtol=1e-6)
    # A function is wrapped in an ActivityPenalty; penalties chain.
    twice = losses.penalize(penalized, "out", losses.l1_activity, name="sparsity_out", scale=2.0)
    with LossRecorder() as recorder:
        twice(x)
    assert sorted(recorder.terms()) == ["sparsity_hidden", "sparsity_out"]
    np.testing.assert_allclose(
        recorder.terms()["sparsity_out"].numpy(), 2 * np.abs(model(x).numpy()).sum(1), rtol=1e-5
    )
    with LossRecorder() as recorder:  # the original model is unchanged
        model(x)
    assert recorder.terms() == {}


@pytest.mark.parametrize("make", [_sequential, _functional], ids=["sequential", "functional"])
def test_penalize_several_layers_at_once(make):
    model = make()
    x = np.random.default_rng(5).normal(size=(3, 5)).astype("float32")
    penalized = losses.penalize(
        model, {"hidden": losses.L1ActivitySparsity(name="sparsity_hidden"), "out": np.square}
    )
    assert [
        layer.name
        for layer in penalized.layers
        if "penalty" in layer.name or "sparsity" in layer.name
    ] == ["sparsity_hidden", "out_penalty"]
    # Each penalty layer is called once in the new graph: its output is the penalised tensor.
    probe = keras.Model(penalized.input, penalized.get_layer("sparsity_hidden").output)
    hidden = keras.Model(model.inputs[0], model.get_layer("hidden").output)
    np.testing.assert_allclose(probe(x), hidden(x), rtol=1e-6)
    with LossRecorder() as recorder:
        penalized(x)
    np.testing.assert_allclose(
        recorder.terms()["out_penalty"].numpy(), np.square(model(x).numpy()), rtol=1e-5
    )
    with pytest.raises(ValueError, match="no `penalty`"):
        losses.penalize(model, {"hidden": np.abs}, np.abs)


def test_penalize_errors_name_the_layer_and_list_valid_names():
    model = _functional()
    with pytest.raises(ValueError, match=r"'nosuch'.*hidden, side, concat, out"):
        losses.penalize(model, "nosuch", losses.l1_activity)
    with pytest.raises(ValueError, match="already a layer"):
        losses.penalize(model, "hidden", losses.l1_activity, name="side")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2, name="dense")

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(tf.zeros((1, 3)))
    with pytest.raises(ValueError, match="subclassed"):
        losses.penalize(sub, "dense", losses.l1_activity)
