"""The Trainer's options, step, weights, evaluation and non-finite handling."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, penalised_model, regression_data, weights_of

from termwise import losses
from termwise.trainer import NonFiniteLossError, Trainer, schedules


def sgd(lr=0.1):
    return keras.optimizers.SGD(lr)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"log_every": -1}, r"`log_every` \(-1\) must be a non-negative integer"),
        ({"steps_per_execution": 0}, r"`steps_per_execution` \(0\) must be a positive integer"),
        ({"on_nonfinite": "ignore"}, r"`on_nonfinite` \('ignore'\) must be one of 'raise', 'skip'"),
        ({"jit_compile": "yes"}, r"`jit_compile` \('yes'\) must be True or False"),
        ({"loss": 3}, r"`loss` \(3\) must be None, a callable"),
        ({"weights": {"kl": "linear:0:1"}}, r"`weights\['kl'\]`.*linear:0:1"),
        ({"weights": {"kl": [1]}}, r"`weights\['kl'\]` \(\[1\]\) must be a number"),
        ({"strategy": "mirrored"}, r"`strategy` \('mirrored'\) must be a tf.distribute.Strategy"),
    ],
)
def test_bad_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(linear_model(), sgd(), **kwargs)


def test_bad_model_and_optimizer():
    with pytest.raises(ValueError, match=r"`model` \('net'\) must be a Keras model"):
        Trainer("net", sgd())
    with pytest.raises(ValueError, match=r"`optimizer\['gen'\]` \(None\) must be a keras"):
        Trainer(linear_model(), {"gen": None})


def test_one_step_matches_hand_computed_update():
    # y_pred = x1 + x2 with w = [1, 1], b = 0; loss = mean over the batch of (y_pred - y)^2.
    x = np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
    y = np.array([[0.0], [1.0]], "float32")
    model = linear_model()
    t = Trainer(model, sgd(0.1), loss=losses.mean_squared_error, progress=False)
    logs = t.fit((x, y), steps=1, batch_size=2).last
    residual = x.sum(1) - y[:, 0]  # [3, 1]
    assert logs["loss/loss"] == pytest.approx(np.mean(residual**2))
    grad_w = 2 * (residual[:, None] * x).mean(0)
    grad_b = 2 * residual.mean()
    kernel, bias = weights_of(model)
    np.testing.assert_allclose(kernel[:, 0], 1.0 - 0.1 * grad_w, rtol=1e-6)
    np.testing.assert_allclose(bias, [-0.1 * grad_b], rtol=1e-6)
    assert t.step == 1


def test_sample_weights_scale_per_example_terms():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], "float32")
    y = np.zeros((3, 1), "float32")
    sw = np.array([1.0, 0.0, 3.0], "float32")
    t = Trainer(linear_model(), sgd(0.0), loss=losses.mean_squared_error, progress=False)
    result = t.evaluate((x, y, sw), batch_size=3)
    assert result["loss"] == pytest.approx((1.0 * 1 + 0.0 * 4 + 3.0 * 4) / 3)


def test_keras_loss_object_is_used_per_example():
    x, y = regression_data(64, features=2)
    fn = keras.losses.MeanSquaredError()
    t1 = Trainer(linear_model(), sgd(0.0), loss=fn, progress=False)
    t2 = Trainer(linear_model(), sgd(0.0), loss=losses.mean_squared_error, progress=False)
    assert t1.evaluate((x, y))["loss"] == pytest.approx(t2.evaluate((x, y))["loss"], rel=1e-6)


def test_loss_dict_makes_one_term_per_key():
    x, y = regression_data(32, features=2)
    t = Trainer(
        linear_model(),
        sgd(0.0),
        loss={"mse": losses.mean_squared_error, "mae": lambda a, b: tf.abs(a - b)[:, 0]},
        progress=False,
    )
    result = t.evaluate((x, y))
    pred = x.sum(1)
    assert result["mse"] == pytest.approx(np.mean((pred - y[:, 0]) ** 2), rel=1e-5)
    assert result["mae"] == pytest.approx(np.mean(np.abs(pred - y[:, 0])), rel=1e-5)
    assert result["total"] == pytest.approx(result["mse"] + result["mae"], rel=1e-6)


def test_add_loss_and_regularization_terms_are_collected_and_weighted():
    x, y = regression_data(64)
    t = Trainer(
        penalised_model(),
        sgd(0.0),
        loss=losses.mean_squared_error,
        weights={"sparsity": 0.5, "regularization": schedules.constant(2.0)},
        progress=False,
    )
    logs = t.fit((x, y), steps=1, batch_size=64).last
    assert t.term_names == {"train": ("loss", "sparsity", "regularization")}
    assert logs["weight/sparsity"] == 0.5 and logs["weight/regularization"] == 2.0
    assert logs["weighted/sparsity"] == pytest.approx(0.5 * logs["loss/sparsity"])
    expected_total = (
        logs["loss/loss"] + 0.5 * logs["loss/sparsity"] + 2 * logs["loss/regularization"]
    )
    assert logs["total/train"] == pytest.approx(expected_total, rel=1e-6)
    # The per-example penalty is the batch mean of 0.01 * sum(h^2), recomputed independently.
    hidden = keras.Model(t.model.input, t.model.get_layer("hidden").output)
    expected = 0.01 * np.mean(np.sum(np.square(hidden(x)), axis=-1))
    assert logs["loss/sparsity"] == pytest.approx(expected, rel=1e-5)


def test_scheduled_weight_follows_the_step():
    x, y = regression_data(32, features=2)
    t = Trainer(
        linear_model(),
        sgd(0.0),
        loss=losses.mean_squared_error,
        weights={"loss": "linear:0:1:10"},
        log_every=1,
        progress=False,
    )
    seen = [t.fit((x, y), steps=1).last["weight/loss"] for _ in range(4)]
    # The weight of the update that moves step s to s+1 is schedule(s).
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_unknown_weight_key_fails_before_any_update():
    x, y = regression_data(32, features=2)
    model = linear_model()
    before = weights_of(model)
    t = Trainer(model, sgd(), loss=losses.mean_squared_error, weights={"kl": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"\['kl'\]; known term names: \['loss'\]"):
        t.fit((x, y), steps=3)
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert t.step == 0


def test_non_float_term_is_an_error():
    class IntTrainer(Trainer):
        def compute_terms(self, batch, training):
            self.model(batch[0])
            return {"count": tf.shape(batch[0])[:1]}

    with pytest.raises(ValueError, match="'count' must be a floating-point tensor"):
        IntTrainer(linear_model(), sgd(), progress=False).fit(regression_data(8, 2), steps=1)


def test_loss_falls_end_to_end():
    x, y = regression_data(512)
    t = Trainer(
        penalised_model(),
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        progress=False,
    )
    before = t.evaluate((x, y))["loss"]
    t.fit((x, y), epochs=10)
    after = t.evaluate((x, y))["loss"]
    assert after < 0.1 * before


def test_steps_epochs_and_until_step():
    x, y = regression_data(64, features=2)
    t = Trainer(linear_model(), sgd(0.01), loss=losses.mean_squared_error, progress=False)
    t.fit((x, y), epochs=2, batch_size=16)
    assert t.step == 8
    t.fit((x, y), steps=3, batch_size=16)
    assert t.step == 11
    t.fit((x, y), until_step=15, batch_size=16)
    assert t.step == 15
    assert t.fit((x, y), until_step=10).last == t._last_logs  # nothing left to do
    assert t.step == 15
    with pytest.raises(ValueError, match="not several"):
        t.fit((x, y), steps=1, epochs=1)
    with pytest.raises(ValueError, match="known length"):
        t.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), epochs=1)


@pytest.mark.parametrize("options", [{"steps_per_execution": 3}, {"jit_compile": True}])
def test_steps_per_execution_and_jit_give_the_same_weights(options):
    x, y = regression_data(96)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def train(**kwargs):
        keras.utils.set_random_seed(1)
        model = penalised_model()
        t = Trainer(
            model,
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            log_every=4,
            progress=False,
            **kwargs,
        )
        logs = t.fit(data, steps=10).last
        return weights_of(model), logs, t.step

    ref_weights, ref_logs, ref_step = train(steps_per_execution=1)
    weights, logs, step = train(**{"steps_per_execution": 1, **options})
    assert step == ref_step == 10
    for a, b in zip(ref_weights, weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert logs["loss/loss"] == pytest.approx(ref_logs["loss/loss"], rel=1e-5)


class NaNAfter(Trainer):
    """Its `penalty` term turns NaN from global step `bad_step` on."""

    bad_step = 3

    def compute_terms(self, batch, training):
        x, y = batch
        mse = losses.mean_squared_error(y, self.model(x, training=training))
        step = tf.cast(self._step, tf.float32)
        penalty = tf.where(step >= self.bad_step, np.nan, 0.0) * tf.ones_like(mse)
        return {"mse": mse, "penalty": penalty}


def test_nonfinite_raise_names_term_and_step_and_keeps_weights():
    x, y = regression_data(64, features=2)
    model = linear_model()
    t = NaNAfter(model, sgd(0.01), progress=False, steps_per_execution=4)
    t.fit((x, y), steps=3, batch_size=16)
    good = weights_of(model)
    with pytest.raises(NonFiniteLossError, match=r"'penalty' \(phase 'train'\).*at step 4"):
        t.fit((x, y), steps=5, batch_size=16)
    for a, b in zip(good, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert t.step == 3


def test_nonfinite_skip_drops_and_counts():
    x, y = regression_data(64, features=2)
    model = linear_model()
    t = NaNAfter(model, sgd(0.01), progress=False, on_nonfinite="skip")
    t.fit((x, y), steps=3, batch_size=16)
    good = weights_of(model)
    logs = t.fit((x, y), steps=4, batch_size=16).last
    assert t.step == 7 and t.skipped_steps == 4
    assert logs["nonfinite/skipped"] == 4
    for a, b in zip(good, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_phases_each_update_their_own_variables():
    x, y = regression_data(32, features=2)
    first, second = linear_model(name="a"), linear_model(name="b")

    class TwoPhase(Trainer):
        def compute_terms(self, batch, training, phase):
            x, y = batch
            model = self.model[phase]
            return {f"mse_{phase}": losses.mean_squared_error(y, model(x, training=training))}

    t = TwoPhase(
        {"first": first, "second": second}, {"first": sgd(0.01), "second": sgd(0.0)}, progress=False
    )
    logs = t.fit((x, y), steps=2).last
    assert set(t.term_names) == {"first", "second"}
    assert {"total/first", "total/second", "loss/mse_first", "loss/mse_second"} <= set(logs)
    assert not np.allclose(weights_of(first)[0], 1.0)
    np.testing.assert_array_equal(weights_of(second)[0], 1.0)


def test_several_phases_need_a_phase_argument():
    with pytest.raises(ValueError, match="must take a `phase` argument"):
        Trainer(linear_model(), {"a": sgd(), "b": sgd()})


def test_build_checks_weights_eagerly_and_changes_nothing():
    x, y = regression_data(32)
    model = penalised_model()
    before = weights_of(model)
    t = Trainer(model, sgd(), loss=losses.mean_squared_error, progress=False)
    assert t.build((x, y)) == {"train": ("loss", "sparsity", "regularization")}
    bad = Trainer(model, sgd(), loss=losses.mean_squared_error, weights={"kl": 1.0})
    with pytest.raises(ValueError, match=r"\['kl'\]; known term names: \['loss', 'regular"):
        bad.build((x, y))
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert t.step == 0 and bad.step == 0


class WithMetrics(Trainer):
    """Logs the batch's mean |y_pred| (per example) and max |y| (a scalar) as metrics."""

    def compute_terms(self, batch, training):
        x, y = batch
        y_pred = self.model(x, training=training)
        self.add_metric("output/mean_abs", tf.abs(y_pred)[:, 0])
        self.add_metric("target_max", tf.reduce_max(tf.abs(y)))
        return {"mse": losses.mean_squared_error(y, y_pred)}


def test_metrics_are_logged_not_summed(tmp_path):
    x, y = regression_data(32, features=2)
    t = WithMetrics(linear_model(), sgd(0.0), progress=False, log_dir=str(tmp_path))
    logs = t.fit((x, y), steps=1, batch_size=32).last
    pred = x.sum(1)  # w = 1, b = 0 and a zero learning rate
    assert logs["output/mean_abs"] == pytest.approx(np.mean(np.abs(pred)), rel=1e-5)
    assert logs["target_max"] == pytest.approx(np.max(np.abs(y)), rel=1e-6)
    assert logs["total/train"] == pytest.approx(logs["loss/mse"])
    assert t.term_names == {"train": ("mse",)}
    result = t.evaluate((x, y), batch_size=8)
    assert result["output/mean_abs"] == pytest.approx(np.mean(np.abs(pred)), rel=1e-5)
    assert result["total"] == pytest.approx(result["mse"])


def test_metric_named_like_a_term_is_an_error():
    class Clash(Trainer):
        def compute_terms(self, batch, training):
            value = losses.mean_squared_error(batch[1], self.model(batch[0]))
            self.add_metric("mse", value)
            return {"mse": value}

    with pytest.raises(ValueError, match=r"add_metric names \['mse'\] are also loss terms"):
        Clash(linear_model(), sgd(), progress=False).build(regression_data(8, 2))
