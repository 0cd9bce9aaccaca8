"""A Keras loss as a Termwise term is exactly what `keras.Model.evaluate` reports for it.

Every loss class and loss function that `keras.losses` exports is enumerated (a Keras upgrade
that adds one fails `test_every_keras_loss_has_a_recipe` until it gets data here), run on 2-D
and 3-D outputs, without and with sample weights, through `Trainer.evaluate` and through Keras's
own `compile`/`evaluate` on the same model and the same batches (20 examples in batches of 8, so
the last batch is short).
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise.trainer import Trainer

N, BATCH, STEPS, FEATURES = 20, 8, 4, 3

# kind of data -> (units of the model's head, its activation)
HEADS = {
    "real": (2, None),
    "positive": (2, "softplus"),
    "binary": (2, "sigmoid"),
    "logits": (2, None),
    "categorical": (4, "softmax"),
    "categorical_logits": (4, None),
    "sparse": (4, "softmax"),
    "sparse_logits": (4, None),
    "embedding": (3, "unit_norm"),
    "ctc": (5, None),
}
RANKS = {"embedding": (2,), "ctc": (3,)}  # what the loss takes; the others take both

L = keras.losses
# (label, the loss, the kind of data): every class with its defaults, the options that change
# what is computed, and every function as `compile` would take it.
RECIPES = [
    ("MeanSquaredError", L.MeanSquaredError(), "real"),
    ("MeanAbsoluteError", L.MeanAbsoluteError(), "real"),
    ("MeanAbsolutePercentageError", L.MeanAbsolutePercentageError(), "positive"),
    ("MeanSquaredLogarithmicError", L.MeanSquaredLogarithmicError(), "positive"),
    ("Huber", L.Huber(delta=0.5), "real"),
    ("LogCosh", L.LogCosh(), "real"),
    ("CosineSimilarity", L.CosineSimilarity(), "real"),
    ("Poisson", L.Poisson(), "positive"),
    ("KLDivergence", L.KLDivergence(), "categorical"),
    ("Hinge", L.Hinge(), "logits"),
    ("SquaredHinge", L.SquaredHinge(), "logits"),
    ("CategoricalHinge", L.CategoricalHinge(), "categorical_logits"),
    ("BinaryCrossentropy", L.BinaryCrossentropy(), "binary"),
    ("BinaryCrossentropy/logits", L.BinaryCrossentropy(from_logits=True), "logits"),
    ("BinaryCrossentropy/smoothing", L.BinaryCrossentropy(label_smoothing=0.2), "binary"),
    ("BinaryFocalCrossentropy", L.BinaryFocalCrossentropy(), "binary"),
    (
        "BinaryFocalCrossentropy/balanced_logits",
        L.BinaryFocalCrossentropy(apply_class_balancing=True, from_logits=True),
        "logits",
    ),
    ("CategoricalCrossentropy", L.CategoricalCrossentropy(), "categorical"),
    (
        "CategoricalCrossentropy/logits_smoothing",
        L.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        "categorical_logits",
    ),
    ("CategoricalFocalCrossentropy", L.CategoricalFocalCrossentropy(), "categorical"),
    (
        "CategoricalFocalCrossentropy/logits",
        L.CategoricalFocalCrossentropy(from_logits=True),
        "categorical_logits",
    ),
    ("SparseCategoricalCrossentropy", L.SparseCategoricalCrossentropy(), "sparse"),
    (
        "SparseCategoricalCrossentropy/logits",
        L.SparseCategoricalCrossentropy(from_logits=True),
        "sparse_logits",
    ),
    (  # its ignored labels mask the values: Keras averages over the others
        "SparseCategoricalCrossentropy/ignore_class",
        L.SparseCategoricalCrossentropy(ignore_class=0),
        "sparse",
    ),
    ("CategoricalGeneralizedCrossEntropy", L.CategoricalGeneralizedCrossEntropy(q=0.7), "sparse"),
    ("Dice", L.Dice(), "binary"),  # one value per batch (axis=None)
    ("Dice/per_example", L.Dice(axis=-1), "binary"),
    ("Tversky", L.Tversky(alpha=0.3, beta=0.7), "binary"),
    ("Circle", L.Circle(), "embedding"),  # masks its zero values
    ("CTC", L.CTC(), "ctc"),
    ("mean_squared_error", L.mean_squared_error, "real"),
    ("mean_absolute_error", L.mean_absolute_error, "real"),
    ("mean_absolute_percentage_error", L.mean_absolute_percentage_error, "positive"),
    ("mean_squared_logarithmic_error", L.mean_squared_logarithmic_error, "positive"),
    ("huber", L.huber, "real"),
    ("log_cosh", L.log_cosh, "real"),
    ("cosine_similarity", L.cosine_similarity, "real"),
    ("poisson", L.poisson, "positive"),
    ("kl_divergence", L.kl_divergence, "categorical"),
    ("hinge", L.hinge, "logits"),
    ("squared_hinge", L.squared_hinge, "logits"),
    ("categorical_hinge", L.categorical_hinge, "categorical_logits"),
    ("binary_crossentropy", L.binary_crossentropy, "binary"),
    ("binary_focal_crossentropy", L.binary_focal_crossentropy, "binary"),
    ("categorical_crossentropy", L.categorical_crossentropy, "categorical"),
    ("categorical_focal_crossentropy", L.categorical_focal_crossentropy, "categorical"),
    ("sparse_categorical_crossentropy", L.sparse_categorical_crossentropy, "sparse"),
    ("dice", L.dice, "binary"),
    ("tversky", L.tversky, "binary"),
    ("circle", L.circle, "embedding"),
    ("ctc", L.ctc, "ctc"),
]


def keras_loss_classes():
    return {
        name: value
        for name, value in vars(keras.losses).items()
        if inspect.isclass(value)
        and issubclass(value, keras.losses.Loss)
        and value is not keras.losses.Loss
    }


def keras_loss_functions():
    return {
        name: value
        for name, value in vars(keras.losses).items()
        if inspect.isfunction(value) and value.__module__ == "keras.src.losses.losses"
    }


def required_extra_arguments(fn):
    parameters = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in parameters if p.default is inspect.Parameter.empty]


def test_every_keras_loss_has_a_recipe():
    classes = {type(loss).__name__ for _, loss, _ in RECIPES if isinstance(loss, L.Loss)}
    functions = {loss.__name__ for _, loss, _ in RECIPES if not isinstance(loss, L.Loss)}
    assert classes == set(keras_loss_classes())
    # A function with a required argument (categorical_generalized_cross_entropy: q) cannot be
    # given to `compile` as it is; its class is tested instead.
    untested = set(keras_loss_functions()) - functions
    assert untested == {"categorical_generalized_cross_entropy"}
    for name in untested:
        assert required_extra_arguments(keras_loss_functions()[name])


class UnitNorm(keras.layers.Layer):
    def call(self, x):
        return tf.math.l2_normalize(x, axis=-1)


def head_model(kind, rank, seed=0):
    units, activation = HEADS[kind]
    keras.utils.set_random_seed(seed)
    shape = (FEATURES,) if rank == 2 else (STEPS, FEATURES)
    inputs = keras.Input(shape)
    dense_activation = None if activation == "unit_norm" else activation
    outputs = keras.layers.Dense(units, activation=dense_activation, name="head")(inputs)
    if activation == "unit_norm":
        outputs = UnitNorm()(outputs)
    return keras.Model(inputs, outputs)


def targets(kind, rank, rng):
    units, _ = HEADS[kind]
    lead = (N,) if rank == 2 else (N, STEPS)
    if kind == "real":
        return rng.normal(size=(*lead, units)).astype("float32")
    if kind == "positive":
        return rng.uniform(0.5, 3.0, size=(*lead, units)).astype("float32")
    if kind in ("binary", "logits"):
        return rng.integers(0, 2, size=(*lead, units)).astype("float32")
    if kind.startswith("categorical"):
        return np.eye(units, dtype="float32")[rng.integers(0, units, size=lead)]
    if kind.startswith("sparse"):
        return rng.integers(0, units, size=lead).astype("int32")
    if kind == "embedding":
        return rng.integers(0, 3, size=(N,)).astype("int32")
    labels = rng.integers(1, units, size=(N, 2)).astype("int32")  # ctc: 0 is the blank
    labels[::3, 1] = 0
    return labels


def sample_weights(mode, rank, rng):
    if mode == "none":
        return None
    if mode == "example":
        return rng.uniform(0.0, 2.0, size=(N,) if rank == 2 else (N, 1)).astype("float32")
    return rng.uniform(0.0, 2.0, size=(N, STEPS)).astype("float32")  # one per value


def dataset(kind, rank, mode, seed=1):
    rng = np.random.default_rng(seed)
    shape = (N, FEATURES) if rank == 2 else (N, STEPS, FEATURES)
    x = rng.normal(size=shape).astype("float32")
    y = targets(kind, rank, rng)
    sw = sample_weights(mode, rank, rng)
    arrays = (x, y) if sw is None else (x, y, sw)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH)


def keras_value(model, loss, data):
    model.compile(loss=loss, run_eagerly=True)
    return model.evaluate(data, verbose=0, return_dict=True)["loss"]


def cases():
    out = []
    for kind in HEADS:
        for rank in RANKS.get(kind, (2, 3)):
            modes = ["none", "example"]
            if rank == 3 and kind != "ctc":  # CTC's values are per example: no [N, T] weights
                modes.append("value")
            out.extend((kind, rank, mode) for mode in modes)
    return out


@pytest.mark.parametrize("kind, rank, mode", cases())
def test_keras_losses_match_keras_evaluate(kind, rank, mode):
    recipes = {label: loss for label, loss, k in RECIPES if k == kind}
    model = head_model(kind, rank)
    data = dataset(kind, rank, mode)
    trainer = Trainer(model, keras.optimizers.SGD(0.0), loss=recipes, progress=False)
    ours = trainer.evaluate(data)
    for label, loss in recipes.items():
        expected = keras_value(model, loss, data)
        assert ours[label] == pytest.approx(expected, rel=1e-6, abs=1e-7), label


@pytest.mark.parametrize("reduction", ["sum", "mean", "mean_with_sample_weight"])
@pytest.mark.parametrize("mode", ["none", "example", "value"])
def test_reductions_match_keras_evaluate(reduction, mode):
    recipes = {
        "mse": L.MeanSquaredError(reduction=reduction),
        "masked": L.SparseCategoricalCrossentropy(ignore_class=0, reduction=reduction),
        "dice": L.Dice(reduction=reduction),
    }
    kinds = {"mse": "real", "masked": "sparse", "dice": "binary"}
    for label, loss in recipes.items():
        model = head_model(kinds[label], 3)
        data = dataset(kinds[label], 3, mode)
        trainer = Trainer(model, keras.optimizers.SGD(0.0), loss=loss, progress=False)
        ours = trainer.evaluate(data)["loss"]
        assert ours == pytest.approx(keras_value(model, loss, data), rel=1e-6), label


def test_time_axis_is_averaged_as_keras_does():
    # [batch, 10, 1] outputs: MSE's values are [batch, 10]; Keras averages all of them.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10, 2)).astype("float32")
    y = rng.normal(size=(64, 10, 1)).astype("float32")
    inputs = keras.Input((10, 2))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    prediction = np.asarray(model(x))
    expected = np.mean((prediction.astype("float64") - y) ** 2)
    for loss in (L.MeanSquaredError(), L.mean_squared_error):
        trainer = Trainer(model, keras.optimizers.SGD(0.0), loss=loss, progress=False)
        assert trainer.evaluate((x, y))["loss"] == pytest.approx(expected, rel=1e-6)


def test_training_follows_keras_fit():
    # One SGD step from the same weights: the same loss and the same update as keras fit.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 3)).astype("float32")
    y = rng.integers(0, 4, size=(16, 4)).astype("int32")
    sw = rng.uniform(0.0, 2.0, size=(16, 4)).astype("float32")
    loss = L.SparseCategoricalCrossentropy(from_logits=True)
    ours, theirs = head_model("sparse_logits", 3), head_model("sparse_logits", 3)
    trainer = Trainer(ours, keras.optimizers.SGD(0.5), loss=loss, progress=False)
    logs = trainer.fit((x, y, sw), steps=1, batch_size=16).last
    theirs.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    history = theirs.fit(x, y, sample_weight=sw, batch_size=16, epochs=1, verbose=0)
    assert logs["loss/loss"] == pytest.approx(history.history["loss"][0], rel=1e-6)
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_masked_outputs_follow_keras():
    # An Embedding(mask_zero) sequence model: Keras averages over the unmasked steps only.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(20, 6)).astype("int32")
    tokens[:, 0] = 1  # no empty sequence
    y = rng.normal(size=(20, 6, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(5, 3, mask_zero=True)(inputs)
    h = keras.layers.SimpleRNN(4, return_sequences=True)(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    data = tf.data.Dataset.from_tensor_slices((tokens, y)).batch(8)
    trainer = Trainer(model, keras.optimizers.SGD(0.0), loss=L.MeanSquaredError(), progress=False)
    ours = trainer.evaluate(data)["loss"]
    assert ours == pytest.approx(keras_value(model, L.MeanSquaredError(), data), rel=1e-6)
    by_hand = ((np.asarray(model(tokens))[..., 0] - y[..., 0]) ** 2 * (tokens != 0)).sum(1)
    # Per batch: the squared errors over its unmasked steps; batches weighted by their size.
    batches = [slice(0, 8), slice(8, 16), slice(16, 20)]
    means = [by_hand[b].sum() / (tokens[b] != 0).sum() * len(by_hand[b]) for b in batches]
    assert ours == pytest.approx(sum(means) / 20, rel=1e-5)


@pytest.mark.parametrize("reduction", [None, "none"])
def test_unreduced_keras_losses_are_refused_at_construction(reduction):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    message = (
        r"`loss\['mse'\]` \(MeanSquaredError with reduction=(None|'none')\): Termwise supports "
        r"the reductions 'sum_over_batch_size', 'mean', 'sum', 'mean_with_sample_weight'"
    )
    with pytest.raises(ValueError, match=message):
        Trainer(
            model, keras.optimizers.SGD(), loss={"mse": L.MeanSquaredError(reduction=reduction)}
        )


REPLICAS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from termwise.trainer import Trainer

    L = keras.losses
    rng = np.random.default_rng(0)
    # 13 examples in batches of 8: the last batch splits 3 / 2 over the replicas.
    x = rng.normal(size=(13, 4, 3)).astype("float32")
    labels = rng.integers(0, 4, size=(13, 4)).astype("int32")
    sw = rng.uniform(0.0, 2.0, size=(13, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, labels, sw)).batch(8)
    losses = {
        "mean": L.SparseCategoricalCrossentropy(from_logits=True),
        "sum": L.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
        "weighted": L.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"),
        "masked": L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    }

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 3))
        return keras.Model(inputs, keras.layers.Dense(4)(inputs))

    results = {}
    for name, strategy in [("one", tf.distribute.get_strategy()),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        with strategy.scope():
            net, optimizer = model(), keras.optimizers.SGD(0.0)
        trainer = Trainer(net, optimizer, loss=losses, strategy=strategy, progress=False)
        results[name] = trainer.evaluate(data)
    net = model()
    results["keras"] = {}
    for name, loss in losses.items():
        net.compile(loss=loss, run_eagerly=True)
        results["keras"][name] = net.evaluate(data, verbose=0, return_dict=True)["loss"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        net, optimizer = model(), keras.optimizers.SGD(0.0)
    trainer = Trainer(net, optimizer, loss=L.Dice(), strategy=strategy, progress=False)
    try:
        trainer.evaluate((x, np.eye(4, dtype="float32")[labels]))
        results["dice"] = "no error"
    except ValueError as error:
        results["dice"] = str(error)  # may be wrapped by autograph: the text is inside
    print(json.dumps(results))
    """
)


def test_keras_reductions_are_exact_on_two_replicas():
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run(
        [sys.executable, "-c", REPLICAS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, expected in results["keras"].items():
        assert results["one"][name] == pytest.approx(expected, rel=1e-6), name
        assert results["two"][name] == pytest.approx(expected, rel=1e-6), name
    assert "returns one value per batch, not per example: on 2 replicas" in results["dice"]
