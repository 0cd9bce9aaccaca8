"""Balancers against hand-computed answers on toy problems, in the Trainer, and through a resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, penalised_model, regression_data

from termwise import losses
from termwise.trainer import Trainer, balancers


def built(balancer, count):
    balancer.build([f"term{i}" for i in range(count)])
    return balancer


def run(balancer, values, step=0, gram=None):
    """One step: returns the weights (and mixing) and applies the state updates."""
    gram = None if gram is None else tf.constant(gram, tf.float32)
    weighting = balancer.weights(tf.constant(values, tf.float32), tf.constant(step, tf.int64), gram)
    for variable, value in weighting.updates:
        variable.assign(tf.cast(value, variable.dtype))
    mixing = None if weighting.mixing is None else weighting.mixing.numpy()
    return weighting.weights.numpy(), mixing


def update_of(balancer, grads, step=0):
    """The update direction a gradient balancer makes of the rows of `grads`."""
    grads = np.asarray(grads, np.float64)
    weights, mixing = run(balancer, np.ones(len(grads)), step, grads @ grads.T)
    coefficients = weights if mixing is None else mixing.sum(axis=0) * weights
    return coefficients @ grads


def test_ema_normalize_hand_computed():
    b = built(balancers.EMANormalize(decay=0.5, epsilon=0.0), 2)
    # m = 0.5 * 0 + 0.5 * |[2, -4]| = [1, 2]; bias-corrected / (1 - 0.5) = [2, 4].
    np.testing.assert_allclose(run(b, [2.0, -4.0])[0], [1 / 2, 1 / 4], rtol=1e-6)
    # m = 0.5 * [1, 2] + 0.5 * [4, 8] = [2.5, 5]; / (1 - 0.25) = [10/3, 20/3].
    np.testing.assert_allclose(run(b, [4.0, 8.0])[0], [0.3, 0.15], rtol=1e-6)


def test_uncertainty_weighting_hand_computed_and_fixed_point():
    b = built(balancers.UncertaintyWeighting(learning_rate=0.1), 2)
    np.testing.assert_allclose(run(b, [2.0, 0.5])[0], [1.0, 1.0])
    # s <- s - 0.1 * (1 - exp(-s) L) = [0.1, -0.05]; the weights are exp(-s).
    np.testing.assert_allclose(b.log_variance.numpy(), [0.1, -0.05], rtol=1e-6)
    np.testing.assert_allclose(run(b, [2.0, 0.5])[0], np.exp([-0.1, 0.05]), rtol=1e-6)
    for _ in range(300):
        weights, _ = run(b, [2.0, 0.5])
    np.testing.assert_allclose(weights, [0.5, 2.0], rtol=1e-3)  # 1 / L at the fixed point


def test_dwa_over_windows_hand_computed():
    b = built(balancers.DWA(window=2, temperature=2.0), 2)
    seen = [run(b, v)[0] for v in ([4.0, 2.0], [2.0, 2.0], [1.0, 2.0], [2.0, 1.0])]
    for weights in seen:  # two windows are needed before the first rates
        np.testing.assert_allclose(weights, [1.0, 1.0])
    # Window means: [3, 2] then [1.5, 1.5]; rates [0.5, 0.75]; weights 2 softmax(rates / 2).
    rates = np.array([1.5 / 3, 1.5 / 2])
    expected = 2 * np.exp(rates / 2) / np.exp(rates / 2).sum()
    np.testing.assert_allclose(run(b, [9.0, 9.0])[0], expected, rtol=1e-6)


def test_gradnorm_hand_computed_moves_toward_equal_training_rates():
    b = built(balancers.GradNorm(alpha=1.0, learning_rate=0.1), 2)
    gram = np.diag([1.0, 9.0])  # gradient norms 1 and 3
    weights, _ = run(b, [1.0, 1.0], gram=gram)  # first step: the initial losses
    np.testing.assert_allclose(weights, [1.0, 1.0])
    # Weighted norms [1, 3], mean 2; equal rates: targets [2, 2]; sign [-1, +1].
    # w = [1 + 0.1 * 1 / 2, 1 - 0.1 * 3 / 2] = [1.05, 0.85], renormalised to sum 2.
    expected = np.array([1.05, 0.85]) * 2 / 1.9
    np.testing.assert_allclose(b.task_weights.numpy(), expected, rtol=1e-6)
    # Term 1 now trains slower (L/L0 = 0.9 vs 0.5): rates r = [0.5, 0.9] / 0.7.
    gram = np.diag([1.0, 1.0])
    weights, _ = run(b, [0.5, 0.9], gram=gram)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)  # this step uses the old weights
    norms = expected * 1.0
    targets = norms.mean() * np.array([0.5, 0.9]) / 0.7
    new = expected - 0.1 * np.sign(norms - targets) * 1.0 / norms.mean()
    new = new * 2 / new.sum()
    np.testing.assert_allclose(b.task_weights.numpy(), new, rtol=1e-6)
    assert new[1] > expected[1]  # the slower term gains weight
    np.testing.assert_allclose(b.initial.numpy(), [1.0, 1.0])


def test_gradnorm_equalises_training_rates_on_a_toy_problem():
    # Two quadratics in separate coordinates: L_i = a_i x_i^2 / 2, gradients a_i x_i. With
    # plain weights the steep one (a = 1) trains far faster than the flat one (a = 0.01);
    # GradNorm raises the flat one's weight and keeps lowering the steep one's.
    a = np.array([1.0, 0.01])
    b = built(balancers.GradNorm(alpha=1.0, learning_rate=0.05), 2)
    x = np.ones(2)
    for step in range(60):
        values = 0.5 * a * x**2
        grads = np.diag(a * x)
        weights, _ = run(b, values, step, grads @ grads.T)
        x = x - 0.5 * weights * a * x
    assert weights[1] > 1.5 > 0.5 > weights[0]


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("ema", balancers.EMANormalize, {"decay": 0.99}),
        ("ema:0.9", balancers.EMANormalize, {"decay": 0.9}),
        ("uncertainty:0.05", balancers.UncertaintyWeighting, {"learning_rate": 0.05}),
        ("dwa:50:3", balancers.DWA, {"window": 50, "temperature": 3.0}),
        ("gradnorm:1.5", balancers.GradNorm, {"alpha": 1.5, "layer": None}),
        (
            "gradnorm:0.5:0.01:hidden",
            balancers.GradNorm,
            {"learning_rate": 0.01, "layer": "hidden"},
        ),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind)
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    assert isinstance(balancers.parse(balancer.spec), kind)


def test_parse_errors_and_none():
    assert balancers.parse("none") is None and balancers.parse(None) is None
    with pytest.raises(ValueError, match=r"Balancer 'foo': unknown balancer.*accepted forms: ema"):
        balancers.parse("foo")
    with pytest.raises(ValueError, match=r"'ema:x'.*not a float"):
        balancers.parse("ema:x")
    with pytest.raises(ValueError, match=r"'pcgrad:1:2'.*at most 1"):
        balancers.parse("pcgrad:1:2")


@pytest.mark.parametrize(
    "balancer, message",
    [
        ("foo", r"`balancer`: Balancer 'foo': unknown balancer"),
        (3, r"`balancer` \(3\) must be a termwise.balancers.Balancer"),
        ({"gen": "pcgrad"}, r"`balancer` names phases that do not exist: \['gen'\]"),
    ],
)
def test_trainer_rejects_bad_balancers(balancer, message):
    with pytest.raises(ValueError, match=message):
        Trainer(linear_model(), keras.optimizers.SGD(0.1), balancer=balancer)


def test_trainer_logs_schedule_times_balancer_weight():
    x = np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
    y = np.array([[0.0], [1.0]], "float32")

    class TwoTerms(Trainer):
        def compute_terms(self, batch, training):
            x, y = batch
            pred = self.model(x, training=training)
            return {"mse": losses.mean_squared_error(y, pred), "size": tf.square(pred)[:, 0]}

    t = TwoTerms(
        linear_model(),
        keras.optimizers.SGD(0.0),
        weights={"size": 0.5},
        balancer="ema:0.5",
        progress=False,
    )
    logs = t.fit((x, y), steps=1, batch_size=2).last
    pred = x.sum(1)
    mse, size = np.mean((pred - y[:, 0]) ** 2), np.mean(pred**2)
    # First step: the EMA balancer's weight is 1 / |value|, times the schedule's 0.5.
    assert logs["weight/mse"] == pytest.approx(1 / mse, rel=1e-5)
    assert logs["weight/size"] == pytest.approx(0.5 / size, rel=1e-5)
    assert logs["total/train"] == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("spec", ["ema:0.9", "gradnorm:1.5:0.05:hidden"])
def test_balancer_state_survives_a_checkpoint_round_trip(tmp_path, spec):
    x, y = regression_data(64)

    def make():
        keras.utils.set_random_seed(3)
        return Trainer(
            penalised_model(),
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            balancer=spec,
            checkpoint_dir=str(tmp_path),
            progress=False,
        )

    first = make()
    first.fit((x, y), steps=3, batch_size=16)  # saves at the end
    state = [v.numpy() for v in first.balancers["train"].variables]
    fresh = [v.numpy() for v in make().balancers["train"].variables]
    assert not fresh  # built only once the term names are known
    second = make()  # a new process, the same command
    second.build((x, y))  # restores the models, optimizers and the balancer's state
    restored = [v.numpy() for v in second.balancers["train"].variables]
    assert len(state) == len(restored) > 0
    assert not all(np.allclose(v, 0.0) for v in state)
    for a, b in zip(state, restored, strict=True):
        np.testing.assert_array_equal(a, b)
    second.fit((x, y), steps=1, batch_size=16)  # and training continues from it
    assert second.step == 4


def test_unknown_target_layer_fails_in_build():
    x, y = regression_data(16)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.1),
        loss=losses.mean_squared_error,
        balancer=balancers.GradNorm(layer="shared"),
    )
    with pytest.raises(ValueError, match=r"target layer 'shared' is not a layer.*'hidden'"):
        t.build((x, y))


def test_a_balancer_string_gives_each_phase_its_own():
    optimizers = {"a": keras.optimizers.SGD(0.1), "b": keras.optimizers.SGD(0.1)}
    models = {"a": linear_model(name="a"), "b": linear_model(name="b")}

    class TwoPhase(Trainer):
        def compute_terms(self, batch, training, phase):
            return {}

    t = TwoPhase(models, optimizers, balancer="ema")
    assert set(t.balancers) == {"a", "b"} and t.balancers["a"] is not t.balancers["b"]
    with pytest.raises(ValueError, match="with several phases"):
        TwoPhase(models, optimizers, balancer=balancers.EMANormalize())
