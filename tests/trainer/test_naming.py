"""Term names through the Trainer: stable across modes, qualified across phases, paths for
repeated layer names, and per-example terms that must lead with the batch axis.

Each test's expected values are recomputed in float64 NumPy from the models' weights.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ActivityPenalty, regression_data, weights_of

from termwise import losses
from termwise.trainer import Trainer
from termwise.trainer.summaries import read_events

QUIET = {"progress": False, "log_every": 0, "grad_log_every": 0}


def sgd(lr=0.0):
    return keras.optimizers.SGD(lr)


# ---------------------------------------------------------------------------------------------
# Issue 11.3: a layer that adds a value only in training.


class TwoPositional(keras.layers.Layer):
    """Adds |x| (training only) then x^2 per example, both unnamed: twopen/0, twopen/1 in
    training, but twopen in evaluation."""

    def call(self, x, training=False):
        if training:
            self.add_loss(tf.reduce_sum(tf.abs(x), axis=-1))
        self.add_loss(tf.reduce_sum(tf.square(x), axis=-1))
        return x


class TwoNamed(keras.layers.Layer):
    """The same values, named: `smoothness` (training only) by add_term, then `scale` (per
    example) and `offset` (a scalar) from a dict given to add_loss."""

    def call(self, x, training=False):
        if training:
            losses.add_term(self, "smoothness", tf.reduce_sum(tf.abs(x), axis=-1))
        self.add_loss({"scale": tf.reduce_sum(tf.square(x), axis=-1), "offset": tf.reduce_mean(x)})
        return x


def penalised_linear(penalty):
    """y = x1 + x2 (w = 1, b = 0), then the penalty layer `twopen` on y."""
    inputs = keras.Input((2,))
    y = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(inputs)
    return keras.Model(inputs, penalty(y))


def test_positional_values_that_change_with_training_fail_in_build():
    x, y = regression_data(32, features=2)
    t = Trainer(
        penalised_linear(TwoPositional(name="twopen")),
        sgd(),
        loss=losses.mean_squared_error,
        weights={"twopen/1": 0.5},  # trains fine, but means nothing in evaluate
        **QUIET,
    )
    with pytest.raises(
        ValueError, match=r"Layer 'twopen' adds 2 unnamed .* 1 in evaluation.*add_term"
    ):
        t.build((x, y))


def test_fit_then_evaluate_rejects_changing_positional_names():
    x, y = regression_data(32, features=2)
    t = Trainer(
        penalised_linear(TwoPositional(name="twopen")),
        sgd(),
        loss=losses.mean_squared_error,
        **QUIET,
    )
    t.fit((x, y), steps=1, batch_size=16)
    with pytest.raises(ValueError, match=r"\['twopen/0', 'twopen/1'\] in fit and \['twopen'\]"):
        t.evaluate((x, y), batch_size=16)


def test_evaluate_then_fit_fails_before_any_update():
    x, y = regression_data(32, features=2)
    model = penalised_linear(TwoPositional(name="twopen"))
    t = Trainer(model, sgd(0.1), loss=losses.mean_squared_error, **QUIET)
    assert set(t.evaluate((x, y), batch_size=16)) == {"loss", "twopen", "total"}
    before = weights_of(model)
    with pytest.raises(ValueError, match="Layer 'twopen'.*add_term"):
        t.fit((x, y), steps=2, batch_size=16)
    assert t.step == 0
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_named_values_keep_their_names_in_fit_and_evaluate():
    x, y = regression_data(16, features=2)
    weights = {"twopen/smoothness": 0.5, "twopen/scale": 2.0, "loss": 1.0}
    t = Trainer(
        penalised_linear(TwoNamed(name="twopen")),
        sgd(),
        loss=losses.mean_squared_error,
        weights=weights,
        **QUIET,
    )
    names = ("loss", "twopen/smoothness", "twopen/scale", "twopen/offset")
    assert t.build((x, y), batch_size=16) == {"train": names}  # fit's names, traced
    pred = x.astype("float64").sum(1)
    mse = np.mean((pred - y[:, 0]) ** 2)
    smoothness, scale, offset = np.mean(np.abs(pred)), np.mean(pred**2), np.mean(pred)
    logs = t.fit((x, y), steps=1, batch_size=16).last
    assert logs["loss/twopen/smoothness"] == pytest.approx(smoothness, rel=1e-5)
    assert logs["weight/twopen/smoothness"] == 0.5 and logs["weight/twopen/offset"] == 1.0
    assert logs["total/train"] == pytest.approx(
        mse + 0.5 * smoothness + 2.0 * scale + offset, rel=1e-5
    )
    result = t.evaluate((x, y), batch_size=16)
    assert set(result) == {"loss", "twopen/scale", "twopen/offset", "total"}
    assert result["twopen/scale"] == pytest.approx(scale, rel=1e-5)
    assert result["total"] == pytest.approx(mse + 2.0 * scale + offset, rel=1e-5)
    assert t.term_names == {"train": names}  # evaluate does not replace fit's names


# ---------------------------------------------------------------------------------------------
# Issue 11.4: one name in two phases.


def regularized_linear(name, l2, seed):
    inputs = keras.Input((2,))
    layer = keras.layers.Dense(
        1,
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        kernel_regularizer=keras.regularizers.L2(l2),
        name=name,
    )
    return keras.Model(inputs, layer(inputs), name=f"{name}_model")


class TwoPhases(Trainer):
    """Phase `first` and phase `second` each fit their own model; `first` has one more term."""

    def compute_terms(self, batch, training, phase):
        x, y = batch
        terms = {"mse": losses.mean_squared_error(y, self.model[phase](x, training=training))}
        if phase == "first":
            terms["first_only"] = tf.reduce_sum(tf.abs(x), axis=-1)
        return terms


def two_phase_trainer(**options):
    models = {"first": regularized_linear("a", 0.1, 1), "second": regularized_linear("b", 0.3, 2)}
    optimizers = {"first": sgd(), "second": sgd()}
    return TwoPhases(models, optimizers, **{**QUIET, **options})


def test_a_name_in_two_phases_is_qualified_by_phase(tmp_path):
    x, y = regression_data(16, features=2)
    t = two_phase_trainer(
        weights={"regularization": 2.0, "second/regularization": 5.0, "mse": 0.5},
        balancer={"second": "ema"},
        log_dir=str(tmp_path),
    )
    assert t.build((x, y), batch_size=16) == {
        "first": ("first/mse", "first_only", "first/regularization"),
        "second": ("second/mse", "second/regularization"),
    }
    assert t.balancers["second"].term_names == ("second/mse", "second/regularization")
    x64, y64 = x.astype("float64"), y[:, 0].astype("float64")
    expected = {}
    for phase, l2 in (("first", 0.1), ("second", 0.3)):
        kernel, bias = (np.asarray(w, "float64") for w in t.model[phase].weights)
        expected[f"{phase}/mse"] = np.mean((x64 @ kernel[:, 0] + bias[0] - y64) ** 2)
        expected[f"{phase}/regularization"] = l2 * np.sum(kernel**2)
    first_only = np.mean(np.abs(x64).sum(1))

    logs = t.fit((x, y), steps=1, batch_size=16).last
    for name, value in expected.items():
        assert logs[f"loss/{name}"] == pytest.approx(value, rel=1e-5), name
    assert logs["loss/first_only"] == pytest.approx(first_only, rel=1e-5)
    assert logs["weight/first/regularization"] == 2.0  # the bare key
    assert logs["weight/first/mse"] == 0.5  # (the second phase's weights are the balancer's too)
    assert logs["weight/first_only"] == 1.0
    assert logs["total/first"] == pytest.approx(
        0.5 * expected["first/mse"] + first_only + 2.0 * expected["first/regularization"],
        rel=1e-5,
    )
    assert "loss/regularization" not in logs and "loss/mse" not in logs

    result = t.evaluate((x, y), batch_size=16)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-5), name
    assert result["total/second"] == pytest.approx(  # the qualified key wins over the bare one
        0.5 * expected["second/mse"] + 5.0 * expected["second/regularization"], rel=1e-5
    )
    tags = set(read_events(tmp_path).Tags()["tensors"])
    for phase in ("first", "second"):
        assert {f"loss/{phase}/regularization", f"eval/{phase}/regularization"} <= tags


def test_qualified_and_bare_weight_keys_are_checked():
    x, y = regression_data(16, features=2)
    with pytest.raises(ValueError, match=r"\['first/first_only'\]; known term names: \['first/mse"):
        two_phase_trainer(weights={"first/first_only": 1.0}).build((x, y))
    two_phase_trainer(weights={"first/mse": 1.0, "regularization": 1.0}).build((x, y))


def test_a_name_in_one_phase_of_a_gan_stays_plain():
    from termwise.models import gan

    generator, discriminator = gan.build_gan((8, 8, 1), 4, width=4, seed=1)
    t = gan.GANTrainer(
        {"generator": generator, "discriminator": discriminator},
        {"discriminator": sgd(), "generator": sgd()},
        r1_gamma=0.0,
        **QUIET,
    )
    images = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype("float32")
    names = t.build(tf.data.Dataset.from_tensor_slices(images).batch(8))
    assert names == {
        "discriminator": ("d_adversarial",),
        "generator": ("g_adversarial", "feature_matching"),
    }


# ---------------------------------------------------------------------------------------------
# Issue 15.2: one layer name in two sub-models.


def encoder(name):
    """What a helper in someone else's code builds: every encoder holds a layer named `kl`."""
    inputs = keras.Input((4,))
    mean = keras.layers.Dense(3, name="mean")(inputs)
    return keras.Model(inputs, ActivityPenalty(scale=0.1, name="kl")(mean), name=name)


def two_encoders(shared_twice=False):
    """Two encoders side by side; with `shared_twice`, `enc_a` is also called on 2x."""
    inputs = keras.Input((4,))
    enc_a, enc_b = encoder("enc_a"), encoder("enc_b")
    features = [enc_a(inputs), enc_b(inputs)]
    if shared_twice:
        features.append(enc_a(2.0 * inputs))
    h = keras.layers.Concatenate()(features)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def kl_of(model, encoder_name, x):
    layer = model.get_layer(encoder_name).get_layer("mean")
    kernel, bias = (np.asarray(w, "float64") for w in layer.weights)
    return 0.1 * np.mean(np.sum((x.astype("float64") @ kernel + bias) ** 2, axis=-1))


def test_repeated_layer_names_are_named_by_their_path(tmp_path):
    x, y = regression_data(32)
    model = two_encoders()
    t = Trainer(
        model,
        sgd(),
        loss=losses.mean_squared_error,
        weights={"enc_b/kl": 0.0},
        log_dir=str(tmp_path),
        **QUIET,
    )
    assert t.build((x, y)) == {"train": ("loss", "enc_a/kl", "enc_b/kl")}
    logs = t.fit((x, y), steps=1, batch_size=32).last
    result = t.evaluate((x, y), batch_size=32)
    for name in ("enc_a", "enc_b"):
        assert logs[f"loss/{name}/kl"] == pytest.approx(kl_of(model, name, x), rel=1e-5)
        assert result[f"{name}/kl"] == pytest.approx(kl_of(model, name, x), rel=1e-5)
    assert logs["weight/enc_b/kl"] == 0.0 and logs["weight/enc_a/kl"] == 1.0
    assert result["total"] == pytest.approx(result["loss"] + result["enc_a/kl"], rel=1e-6)
    tags = set(read_events(tmp_path).Tags()["tensors"])
    assert {"loss/enc_a/kl", "weight/enc_b/kl", "eval/enc_a/kl", "eval/enc_b/kl"} <= tags


def test_a_shared_layer_is_one_term_summed_over_its_calls():
    x, y = regression_data(16)
    model = two_encoders(shared_twice=True)
    t = Trainer(model, sgd(), loss=losses.mean_squared_error, **QUIET)
    result = t.evaluate((x, y), batch_size=16)
    assert set(result) == {"loss", "enc_a/kl", "enc_b/kl", "total"}
    both_calls = kl_of(model, "enc_a", x) + kl_of(model, "enc_a", 2.0 * x)
    assert result["enc_a/kl"] == pytest.approx(both_calls, rel=1e-5)

    inputs = keras.Input((4,))
    alone = encoder("enc")  # no other layer is named `kl`: the plain name
    model = keras.Model(inputs, keras.layers.Add()([alone(inputs), alone(2.0 * inputs)]))
    t = Trainer(model, sgd(), loss=lambda y, p: tf.reduce_sum(p, axis=-1), **QUIET)
    result = t.evaluate((x, y), batch_size=16)
    assert set(result) == {"loss", "kl", "total"}
    both_calls = kl_of(model, "enc", x) + kl_of(model, "enc", 2.0 * x)
    assert result["kl"] == pytest.approx(both_calls, rel=1e-5)


def test_path_names_are_stable_in_checkpoints(tmp_path):
    x, y = regression_data(32)

    def make():
        keras.utils.set_random_seed(4)
        return Trainer(
            two_encoders(),
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            balancer="ema",
            checkpoint_dir=str(tmp_path),
            **QUIET,
        )

    first = make()
    first.fit((x, y), steps=3, batch_size=16)
    second = make()  # a new run of the same command: restores
    assert second.build((x, y)) == first.term_names
    assert second.balancers["train"].term_names == ("loss", "enc_a/kl", "enc_b/kl")
    states = zip(
        first.balancers["train"].variables, second.balancers["train"].variables, strict=True
    )
    for a, b in states:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert second.step == 3


class Both(Trainer):
    """Calls the two models of a dict on the same batch, in one phase."""

    def compute_terms(self, batch, training):
        x, y = batch
        prediction = self.model["a"](x, training=training) + self.model["b"](x, training=training)
        return {"mse": losses.mean_squared_error(y, prediction)}


def penalised(name=None, nested=False):
    inputs = keras.Input((4,))
    if nested:
        h = encoder("enc")(inputs)
    else:
        h = ActivityPenalty(name="kl")(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(1)(h), name=name)


def test_one_name_at_one_path_in_two_models_is_an_error():
    x, y = regression_data(16)
    models = {"a": penalised("a"), "b": penalised("b")}
    with pytest.raises(ValueError, match="Two layers add losses under the name 'kl'"):
        Both(models, sgd(), **QUIET).build((x, y))
    models = {"a": penalised("a"), "b": penalised("b", nested=True)}  # two paths: two terms
    assert Both(models, sgd(), **QUIET).build((x, y)) == {"train": ("mse", "kl", "enc/kl")}


# ---------------------------------------------------------------------------------------------
# Issue 10: a rank >= 1 term whose leading axis is not the batch.


class FeatureMean(Trainer):
    """Returns the batch's per-feature mean square, a [features] vector, as a term."""

    def compute_terms(self, batch, training):
        x, y = batch
        prediction = self.model(x, training=training)
        return {
            "mse": losses.mean_squared_error(y, prediction),
            "feature_mean": tf.reduce_mean(tf.square(x), axis=0),
        }


def test_a_term_not_led_by_the_batch_fails_at_trace_time():
    x, y = regression_data(32)
    model = penalised()
    before = weights_of(model)
    t = FeatureMean(model, sgd(0.1), **QUIET)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    with pytest.raises(
        ValueError,
        match=r"Loss term 'feature_mean' of shape \[4\] .* leading dimension is 4; the batch has 8",
    ):
        t.fit(data, steps=1)
    assert t.step == 0
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_term_not_led_by_the_batch_fails_in_the_graph_as_a_value_error():
    x, y = regression_data(20)
    t = FeatureMean(penalised(), sgd(), **QUIET)  # arrays: batches of unknown static size
    with pytest.raises(
        ValueError,
        match=r"^Loss term 'feature_mean' of shape \[4\] .* leading dimension is 4; the batch "
        "has 10 examples",
    ):
        t.evaluate((x, y), batch_size=10)


def test_fit_reports_the_graph_check_as_a_value_error():
    # A batch of unknown size: the check of the term's leading axis runs in the graph, and fit
    # reports its failure as the ValueError evaluate gives, one line, before any update.
    x, y = regression_data(20)
    t = FeatureMean(penalised(), sgd(0.1), **QUIET)
    with pytest.raises(
        ValueError, match=r"^Loss term 'feature_mean' of shape \[4\] .*the batch has 10"
    ):
        t.fit((x, y), steps=1, batch_size=10)
    assert t.step == 0
