"""Balancers against hand-computed answers on toy problems, in the Trainer, and through a resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, penalised_model, regression_data

from termwise import losses
from termwise.trainer import Trainer, balancers


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
