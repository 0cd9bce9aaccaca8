"""Which loss applies to which output, targets and sample weights by output, batches, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise import losses
from termwise.trainer import Trainer
from termwise.trainer import options as options_lib
from termwise.trainer import outputs as outputs_lib

L = keras.losses
N = 24


def sgd(lr=0.0):
    return keras.optimizers.SGD(lr)


def two_outputs(seed=0):
    """A model with list outputs from layers named `a` and `b`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    return keras.Model(
        inputs, [keras.layers.Dense(1, name="a")(h), keras.layers.Dense(1, name="b")(h)]
    )


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 2)).astype("float32")
    ya = rng.normal(size=(N, 1)).astype("float32")
    yb = 3.0 * rng.normal(size=(N, 1)).astype("float32")
    return x, ya, yb


def predictions(model, x):
    return [np.asarray(p, "float64") for p in tf.nest.flatten(model(x))]


# ---------------------------------------------------------------------------------------------
# Which loss applies to which output.


def test_dict_loss_keyed_by_output_names_applies_to_each_list_output():
    x, ya, yb = data()
    model = two_outputs()
    mse = L.mean_squared_error
    t = Trainer(model, sgd(), loss={"a": mse, "b": mse}, progress=False)
    ours = t.evaluate((x, (ya, yb)))
    pa, pb = predictions(model, x)
    assert ours["a"] == pytest.approx(np.mean((pa - ya) ** 2), rel=1e-6)
    assert ours["b"] == pytest.approx(np.mean((pb - yb) ** 2), rel=1e-6)
    model.compile(loss={"a": mse, "b": mse})
    theirs = model.evaluate(x, (ya, yb), verbose=0, return_dict=True, batch_size=32)
    assert ours["a"] == pytest.approx(theirs["a_loss"], rel=1e-6)
    assert ours["b"] == pytest.approx(theirs["b_loss"], rel=1e-6)
    assert ours["total"] == pytest.approx(theirs["loss"], rel=1e-6)


@pytest.mark.parametrize("form", ["list", "tuple", "dict"])
def test_targets_as_list_tuple_or_dict_keyed_by_output_names(form):
    x, ya, yb = data()
    model = two_outputs()
    loss = {"a": L.MeanAbsoluteError(), "b": L.Huber()}
    pa, pb = predictions(model, x)
    if form == "list":  # tf.data stacks a list of arrays into one tensor: call the rules
        y_pred = model(x)
        ours = outputs_lib.loss_terms(loss, [ya, yb], y_pred, output_names=model.output_names)
        ours = {k: float(np.mean(v)) for k, v in ours.items()}
    else:
        y = (ya, yb) if form == "tuple" else {"b": yb, "a": ya}
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        ours = Trainer(model, sgd(), loss=loss, progress=False).evaluate(dataset)
    assert ours["a"] == pytest.approx(np.mean(np.abs(pa - ya)), rel=1e-6)
    huber = np.where(np.abs(pb - yb) <= 1, 0.5 * (pb - yb) ** 2, np.abs(pb - yb) - 0.5)
    assert ours["b"] == pytest.approx(np.mean(huber), rel=1e-6)


def test_loss_list_gives_one_term_per_output_named_by_the_outputs():
    x, ya, yb = data()
    model = two_outputs()
    loss = [L.MeanSquaredError(), L.MeanAbsoluteError()]
    t = Trainer(model, sgd(), loss=loss, progress=False)
    ours = t.evaluate((x, (ya, yb)))
    model.compile(loss=loss)
    theirs = model.evaluate(x, (ya, yb), verbose=0, return_dict=True, batch_size=32)
    assert set(ours) == {"a", "b", "total"}
    assert ours["a"] == pytest.approx(theirs["a_loss"], rel=1e-6)
    assert ours["b"] == pytest.approx(theirs["b_loss"], rel=1e-6)


def test_loss_list_with_none_leaves_an_output_without_a_term():
    x, ya, yb = data()
    t = Trainer(two_outputs(), sgd(), loss=[None, L.MeanSquaredError()], progress=False)
    assert set(t.evaluate((x, (ya, yb)))) == {"b", "total"}


def test_one_keras_loss_on_several_outputs_gives_a_term_per_output():
    x, ya, yb = data()
    model = two_outputs()
    t = Trainer(model, sgd(), loss=L.MeanSquaredError(), progress=False)
    ours = t.evaluate((x, (ya, yb)))
    model.compile(loss=L.MeanSquaredError())
    theirs = model.evaluate(x, [ya, yb], verbose=0, return_dict=True, batch_size=32)
    assert ours["a"] == pytest.approx(theirs["a_loss"], rel=1e-6)
    assert ours["b"] == pytest.approx(theirs["b_loss"], rel=1e-6)
    assert ours["total"] == pytest.approx(theirs["loss"], rel=1e-6)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_own_callable_takes_all_outputs_at_once(form):
    x, ya, yb = data()
    model = two_outputs()
    y = (ya, yb) if form == "tuple" else {"a": ya, "b": yb}
    loss = losses.mean_over_outputs(losses.mean_squared_error)
    t = Trainer(model, sgd(), loss=loss, progress=False)
    ours = t.evaluate((x, y))
    pa, pb = predictions(model, x)
    expected = np.mean(((pa - ya) ** 2 + (pb - yb) ** 2) / 2)
    assert set(ours) == {"loss", "total"}
    assert ours["loss"] == pytest.approx(expected, rel=1e-6)


def nested_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    p = {"u": keras.layers.Dense(1)(h), "w": keras.layers.Dense(2)(h)}
    return keras.Model(inputs, {"p": p, "q": keras.layers.Dense(1)(h)})


def test_nested_dict_outputs_take_nested_dict_losses_and_targets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2)).astype("float32")
    y = {
        "p": {"u": rng.normal(size=(N, 1)), "w": rng.normal(size=(N, 2))},
        "q": rng.normal(size=(N, 1)),
    }
    y = tf.nest.map_structure(lambda a: a.astype("float32"), y)
    model = nested_model()
    loss = {"p": {"u": L.MeanSquaredError()}, "q": L.MeanAbsoluteError()}
    t = Trainer(model, sgd(), loss=loss, progress=False)
    ours = t.evaluate((x, y))
    out = tf.nest.map_structure(lambda v: np.asarray(v, "float64"), model(x))
    assert set(ours) == {"p/u", "q", "total"}
    assert ours["p/u"] == pytest.approx(np.mean((out["p"]["u"] - y["p"]["u"]) ** 2), rel=1e-6)
    assert ours["q"] == pytest.approx(np.mean(np.abs(out["q"] - y["q"])), rel=1e-6)
    # A Keras loss keyed by a dict node applies to each output below it.
    t = Trainer(model, sgd(), loss={"p": L.MeanSquaredError()}, progress=False)
    ours = t.evaluate((x, y))
    assert set(ours) == {"p/u", "p/w", "total"}
    assert ours["p/w"] == pytest.approx(np.mean((out["p"]["w"] - y["p"]["w"]) ** 2), rel=1e-6)


def test_dict_on_one_output_makes_one_term_per_key():
    x, ya, _ = data()
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))
    t = Trainer(
        model,
        sgd(),
        loss={"out": L.MeanSquaredError(), "l1": L.mean_absolute_error},
        progress=False,
    )
    ours = t.evaluate((x, ya))
    (p,) = predictions(model, x)
    assert ours["out"] == pytest.approx(np.mean((p - ya) ** 2), rel=1e-6)
    assert ours["l1"] == pytest.approx(np.mean(np.abs(p - ya)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Sample weights by output, and what the Trainer's reduction weighs.


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_sample_weights_per_output(form):
    x, ya, yb = data()
    rng = np.random.default_rng(5)
    swa, swb = rng.uniform(0, 2, size=(2, N)).astype("float32")
    sw = (swa, swb) if form == "tuple" else {"a": swa}  # the dict leaves `b` unweighted
    model = two_outputs()
    t = Trainer(model, sgd(), loss=L.MeanSquaredError(), progress=False)
    ours = t.evaluate(tf.data.Dataset.from_tensor_slices((x, (ya, yb), sw)).batch(8))
    pa, pb = predictions(model, x)
    assert ours["a"] == pytest.approx(np.mean(swa[:, None] * (pa - ya) ** 2), rel=1e-6)
    weight_b = swb[:, None] if form == "tuple" else 1.0
    assert ours["b"] == pytest.approx(np.mean(weight_b * (pb - yb) ** 2), rel=1e-6)


def test_per_value_weights_weigh_the_loss_terms_and_per_example_weights_every_term():
    # [batch, T] weights weigh the loss alone; [batch] weights also weigh add_loss terms.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5, 2)).astype("float32")
    y = rng.normal(size=(N, 5, 1)).astype("float32")

    class Activity(keras.layers.Layer):
        def call(self, h):
            self.add_loss(tf.reduce_sum(tf.square(h), axis=[1, 2]))
            return h

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 2))
    model = keras.Model(inputs, keras.layers.Dense(1)(Activity(name="activity")(inputs)))
    p = np.asarray(model(x), "float64")
    activity = np.sum(x.astype("float64") ** 2, axis=(1, 2))
    for sw, expected_activity in [
        (rng.uniform(0, 2, size=(N, 5)).astype("float32"), None),
        (rng.uniform(0, 2, size=(N,)).astype("float32"), "weighted"),
    ]:
        t = Trainer(model, sgd(), loss=lambda a, b: tf.square(a - b), progress=False)
        ours = t.evaluate((x, y, sw))
        weights = sw[:, :, None] if sw.ndim == 2 else sw[:, None, None]
        assert ours["loss"] == pytest.approx(np.mean((weights * (p - y) ** 2).sum((1, 2))))
        if expected_activity:
            assert ours["activity"] == pytest.approx(np.mean(sw * activity), rel=1e-6)
        else:
            assert ours["activity"] == pytest.approx(np.mean(activity), rel=1e-6)


def test_own_callable_gets_labels_aligned_with_predictions():
    # Labels [n] against predictions [n, 1]: Keras squeezes, it does not broadcast to [n, n].
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2)).astype("float32")
    y = rng.normal(size=(N,)).astype("float32")
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    t = Trainer(model, sgd(), loss=lambda a, b: tf.square(a - b), progress=False)
    (p,) = predictions(model, x)
    assert t.evaluate((x, y))["loss"] == pytest.approx(np.mean((p[:, 0] - y) ** 2), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Sample weights when compute_terms is overridden (issue 15 section 1).


def three_part_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2)).astype("float32")
    a = rng.normal(size=(N, 1)).astype("float32")
    b = rng.normal(size=(N, 1)).astype("float32") - 1.0  # negative weights, if misread
    return x, a, b


class TwoTargets(Trainer):
    """Reads batches (x, a, b): two targets, no sample weights."""

    def compute_terms(self, batch, training):
        x, a, b = batch
        pred = self.model(x, training=training)
        return {"a": tf.square(pred - a)[:, 0], "b": tf.abs(pred - b)[:, 0]}


def test_overridden_compute_terms_owns_its_batch():
    x, a, b = three_part_data()
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    t = TwoTargets(model, sgd(0.05), progress=False)
    (p,) = predictions(model, x)
    result = t.evaluate((x, a, b))
    assert result["a"] == pytest.approx(np.mean((p - a) ** 2), rel=1e-6)
    assert result["b"] == pytest.approx(np.mean(np.abs(p - b)), rel=1e-6)
    t.fit((x, a, b), steps=30, batch_size=8)
    assert t.evaluate((x, a, b))["total"] < result["total"]


def test_overridden_sample_weight_weighs_the_terms():
    x, a, b = three_part_data()
    weights = np.abs(b[:, 0])

    class Weighted(TwoTargets):
        def sample_weight(self, batch):
            return tf.abs(batch[2])

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    (p,) = predictions(model, x)
    result = Weighted(model, sgd(), progress=False).evaluate((x, a, b))
    assert result["a"] == pytest.approx(np.mean(weights * (p[:, 0] - a[:, 0]) ** 2), rel=1e-6)


def test_super_compute_terms_refuses_a_third_element_it_may_not_read():
    class Logging(Trainer):
        def compute_terms(self, batch, training):
            return super().compute_terms(batch, training)

    x, a, b = three_part_data()
    inputs = keras.Input((2,))
    t = Logging(
        keras.Model(inputs, keras.layers.Dense(1)(inputs)), sgd(), loss=L.mean_squared_error
    )
    with pytest.raises(ValueError, match=r"compute_terms is overridden, so the third element"):
        t.evaluate((x, a, np.abs(b)))


# ---------------------------------------------------------------------------------------------
# Bad input: one clear ValueError.


def one_output():
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))


def test_x_alone_is_refused_when_loss_needs_targets():
    x, _, _ = data()
    t = Trainer(one_output(), sgd(), loss=L.MeanSquaredError(), progress=False)
    with pytest.raises(ValueError, match=r"`loss` needs targets: .* got a tensor of shape"):
        t.evaluate(x)


def test_dict_batch_is_the_inputs_alone():
    x, ya, _ = data()
    dataset = tf.data.Dataset.from_tensor_slices({"x": x, "y": ya}).batch(8)
    t = Trainer(one_output(), sgd(), loss=L.MeanSquaredError(), progress=False)
    message = r"got a dict with keys \['x', 'y'\] \(a dict batch is the model's inputs alone"
    with pytest.raises(ValueError, match=message):
        t.evaluate(dataset)


def test_batch_of_four_parts_is_refused():
    x, ya, _ = data()
    t = Trainer(one_output(), sgd(), loss=L.MeanSquaredError(), progress=False)
    with pytest.raises(ValueError, match=r"x, \(x, y\) or \(x, y, sample_weight\).*tuple of 4"):
        t.evaluate((x, ya, ya[:, 0], ya))


@pytest.mark.parametrize("loss", [L.MeanSquaredError(), lambda a, b: tf.square(a - b)])
def test_sample_weights_of_the_wrong_shape_are_refused(loss):
    x, ya, _ = data()
    sw = np.ones((N, 3), "float32")
    t = Trainer(one_output(), sgd(), loss=loss, progress=False)
    with pytest.raises(ValueError, match=r"sample weights of shape \(None, 3\) cannot weigh"):
        t.evaluate((x, ya, sw))


def test_shapes_that_cannot_be_aligned_are_refused():
    x, _, _ = data()
    y = np.zeros((N, 2), "float32")
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    t = Trainer(model, sgd(), loss=L.MeanSquaredError(), progress=False)
    message = (
        r"`loss` \(MeanSquaredError\) cannot be applied to y_true of shape \(None, 2\) and "
        r"y_pred of shape \(None, 3\)"
    )
    with pytest.raises(ValueError, match=message):
        t.evaluate((x, y))


@pytest.mark.parametrize(
    "y, message",
    [
        ("one", r"`y` is one tensor of shape \(\w+, 1\) but the model has 2 outputs \('a', 'b'\)"),
        ("three", r"`y` is a tuple of 3 elements .* but the model has 2 outputs"),
        ("typo", r"`y` has keys \['c'\] that name no output; the model's outputs are 'a', 'b'"),
    ],
)
def test_targets_that_do_not_match_the_outputs_are_refused(y, message):
    x, ya, yb = data()
    y = {"one": ya, "three": (ya, yb, yb), "typo": {"a": ya, "c": yb}}[y]
    t = Trainer(two_outputs(), sgd(), loss=L.MeanSquaredError(), progress=False)
    with pytest.raises(ValueError, match=message):
        t.build((x, y))


def test_loss_key_naming_no_output_is_refused_before_training():
    model = two_outputs()
    message = r"`loss` key 'c' names no output of the model; its outputs are 'a', 'b'"
    with pytest.raises(ValueError, match=message):  # what the Trainer's constructor checks
        options_lib.check_loss({"a": L.mean_squared_error, "c": L.mean_squared_error}, model)
    with pytest.raises(ValueError, match=message):  # a built model: at construction
        Trainer(model, sgd(0.1), loss={"a": L.mean_squared_error, "c": L.mean_squared_error})


def test_loss_key_naming_no_output_of_a_subclassed_model_fails_in_build():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(1), keras.layers.Dense(1)

        def call(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    x, ya, yb = data()
    t = Trainer(
        Net(), sgd(), loss={"a": L.mean_squared_error, "z": L.mean_squared_error}, progress=False
    )
    with pytest.raises(ValueError, match=r"`loss` key 'z' names no output.*'a', 'b'"):
        t.build((x, {"a": ya, "b": yb}))


def test_loss_list_of_the_wrong_length_is_refused():
    message = r"`loss` is a list of 3 losses but the model has 2 outputs \('a', 'b'\)"
    with pytest.raises(ValueError, match=message):
        options_lib.check_loss(
            [L.mean_squared_error, L.mean_squared_error, L.mean_squared_error], two_outputs()
        )


@pytest.mark.parametrize(
    "loss, message",
    [
        ({"a": 3}, r"`loss\['a'\]` \(3\) must be callable"),
        ({"a": {"b": "mse"}}, r"`loss\['a'\]\['b'\]` \('mse'\) must be callable"),
        ([L.mean_squared_error, 2], r"`loss\[1\]` \(2\) must be callable .* or None"),
        ({"a": None}, r"gives no loss for any output"),
        ({3: L.mean_squared_error}, r"the keys of `loss` must be non-empty strings"),
    ],
)
def test_bad_loss_entries_are_named(loss, message):
    with pytest.raises(ValueError, match=message):
        outputs_lib.check_loss(loss)


def test_keras_loss_functions_are_told_from_own_callables():
    assert outputs_lib.is_keras_loss(L.mean_squared_error)
    assert outputs_lib.is_keras_loss(L.get("mse"))
    assert outputs_lib.is_keras_loss(L.Huber())
    assert not outputs_lib.is_keras_loss(losses.mean_squared_error)
    assert not outputs_lib.is_keras_loss(L.get)
    assert not outputs_lib.is_keras_loss(lambda a, b: a - b)
