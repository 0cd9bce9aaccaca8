"""Penalty layers outside the Trainer: saved and reloaded in a fresh process after
`import termwise`, and trained by plain `keras.Model.fit`, which sums what Termwise averages."""

import inspect
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import termwise as tw
from termwise import losses
from termwise.losses import adversarial, penalties
from termwise.trainer import LossRecorder

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Loads each saved model in a process that imports nothing of Termwise but `termwise`, calls it
# on its inputs under a LossRecorder, and writes the outputs and the add_loss values.
LOAD = r"""
import sys
import numpy as np
import keras
import termwise
from termwise.trainer import LossRecorder

for path in sys.argv[1:]:
    inputs = np.load(path + ".inputs.npy")
    model = keras.models.load_model(path)
    with LossRecorder() as recorder:
        outputs = keras.tree.flatten(model(inputs))
    arrays = {f"output/{i}": np.asarray(o) for i, o in enumerate(outputs)}
    arrays.update({f"loss/{k}": np.asarray(v) for k, v in recorder.terms().items()})
    np.savez(path + ".loaded.npz", **arrays)
"""


def fresh_process(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Runs `code` in a new Python that imports this checkout's `termwise`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def outputs_and_losses(model: keras.Model, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """What LOAD writes, computed here with the original model."""
    with LossRecorder() as recorder:
        outputs = keras.tree.flatten(model(inputs))
    arrays = {f"output/{i}": np.asarray(o) for i, o in enumerate(outputs)}
    arrays.update({f"loss/{k}": np.asarray(v) for k, v in recorder.terms().items()})
    return arrays


def assert_reloads(models: dict[str, tuple[keras.Model, np.ndarray]], tmp_path) -> None:
    """Saves each model, loads them all in one fresh process, and compares everything."""
    expected = {}
    for name, (model, inputs) in models.items():
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        np.save(path + ".inputs.npy", inputs)
        expected[path] = outputs_and_losses(model, inputs)
    done = fresh_process(LOAD, *expected, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for path, arrays in expected.items():
        with np.load(path + ".loaded.npz") as loaded:
            assert sorted(loaded.files) == sorted(arrays), path
            assert any(key.startswith("loss/") for key in arrays), path
            for key, value in arrays.items():
                np.testing.assert_allclose(loaded[key], value, rtol=1e-6, err_msg=f"{path} {key}")


PENALTY_FUNCTIONS = [
    obj
    for name, obj in vars(penalties).items()
    if inspect.isfunction(obj) and obj.__module__ == penalties.__name__ and not name.startswith("_")
]


def _every_penalty_layer() -> keras.Model:
    """A functional model through every shipped penalty layer, with non-default arguments."""
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(x)
    h = losses.L1ActivitySparsity(scale=0.5, mean=True, name="l1")(h)
    h = losses.FeatureDiversity(scale=2.0, between="units", name="diversity")(h)
    h = losses.BernoulliSparsityKL(target=0.2, scale=0.3, squash="symmetric", name="bernoulli")(h)
    h = losses.GaussianActivityKL(sigma=0.5, scale=0.1, name="gaussian")(h)
    for fn in PENALTY_FUNCTIONS:  # ActivityPenalty holding each registered penalty function
        h = losses.ActivityPenalty(fn, scale=1.5, name=f"fn_{fn.__name__}")(h)
    logits = keras.layers.Dense(1, name="logits")(h)
    logits = losses.DriftPenalty(0.01, name="drift")(logits)
    logits = losses.ActivityPenalty(losses.drift_penalty, name="fn_drift_penalty")(logits)
    return keras.Model(x, [logits, h], name="every_penalty")


def _penalized_sequential() -> keras.Model:
    """`losses.penalize` on a Sequential model, with a function (an `ActivityPenalty`)."""
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="relu", name="hidden")], name="seq"
    )
    return losses.penalize(model, "hidden", losses.l1_activity, scale=0.2)


def test_every_layer_and_penalty_function_is_registered_under_termwise():
    layers = [
        obj
        for obj in (getattr(losses, name) for name in losses.__all__)
        if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer)
    ]
    assert {cls.__name__ for cls in layers} >= {"ActivityPenalty", "DriftPenalty"}
    assert {fn.__name__ for fn in PENALTY_FUNCTIONS} >= {"l1_activity", "gaussian_moments_kl"}
    for obj in [*layers, *PENALTY_FUNCTIONS, adversarial.drift_penalty]:
        name = f"termwise>{obj.__name__}"
        assert keras.saving.get_registered_name(obj) == name
        assert keras.saving.get_registered_object(name) is obj


def test_penalty_layers_reload_in_a_fresh_process_with_the_same_outputs_and_losses(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6)).astype("float32")
    every = _every_penalty_layer()
    terms = outputs_and_losses(every, x)
    expected_terms = {"l1", "diversity", "bernoulli", "gaussian", "drift", "fn_drift_penalty"}
    assert {k.removeprefix("loss/") for k in terms} >= expected_terms
    assert_reloads({"every": (every, x), "sequential": (_penalized_sequential(), x)}, tmp_path)


def _regressor():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            losses.L1ActivitySparsity(scale=0.1, name="sparsity"),
            losses.FeatureDiversity(name="diversity"),  # a scalar: the same under both rules
            keras.layers.Dense(1, name="out"),
        ],
        name="regressor",
    )


def _data(n=16):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, x[:, :1] - x[:, 1:2]


def _summed_penalty_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, losses.SummedPenaltyWarning)]


def test_plain_keras_fit_sums_a_per_example_penalty_and_warns_once_it_does():
    x, y = _data()
    model = _regressor()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    with pytest.warns(losses.SummedPenaltyWarning, match="L1ActivitySparsity") as record:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    messages = _summed_penalty_warnings(record)
    assert messages and all(m.startswith("L1ActivitySparsity adds") for m in messages), messages

    # What it warns about: Keras's loss is mse + the penalty summed over the batch (+ the
    # scalar), where the Trainer's is mse + its mean.
    dense = model.get_layer("hidden")
    hidden = np.maximum(x @ dense.kernel.numpy() + dense.bias.numpy(), 0.0).astype("float64")
    l1 = 0.1 * np.abs(hidden).sum(axis=1)
    mse = np.mean((model(x).numpy() - y) ** 2)
    norms = np.linalg.norm(hidden, axis=1, keepdims=True)
    unit = np.divide(hidden, norms, out=np.zeros_like(hidden), where=norms > 0)
    cosines = unit @ unit.T  # the mean over pairs i != j of cos(h_i, h_j); a zero row gives 0
    diversity = (cosines.sum() - np.trace(cosines)) / (len(x) * (len(x) - 1))
    keras_loss = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert keras_loss == pytest.approx(mse + l1.sum() + diversity, rel=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tw.Trainer(
            model, keras.optimizers.SGD(0.0), loss=losses.mean_squared_error, progress=False
        )
        trainer.fit((x, y), steps=2, batch_size=8)
        result = trainer.evaluate((x, y), batch_size=len(x))
    assert _summed_penalty_warnings(caught) == []
    assert result["sparsity"] == pytest.approx(l1.mean(), rel=1e-5)
    assert result["total"] == pytest.approx(mse + l1.mean() + diversity, rel=1e-5)


def test_only_a_per_example_value_in_training_outside_a_recorder_warns():
    x = np.abs(_data()[0])
    cases = [
        (losses.L1ActivitySparsity(name="l1"), {"training": True}, True),
        (losses.ActivityPenalty(losses.l1_activity, name="generic"), {"training": True}, True),
        (losses.L1ActivitySparsity(name="l1_inference"), {"training": False}, False),
        (losses.L1ActivitySparsity(name="l1_default"), {}, False),
        (losses.FeatureDiversity(name="scalar"), {"training": True}, False),
        (losses.GaussianActivityKL(name="scalar_kl"), {"training": True}, False),
        (losses.DriftPenalty(0.01, name="drift"), {"training": True}, True),
    ]
    for layer, kwargs, warns in cases:
        inputs = x[:, :1] if isinstance(layer, losses.DriftPenalty) else x  # logits: [batch, 1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(inputs, **kwargs)
            with LossRecorder():  # a Termwise step: never a warning
                layer(inputs, **kwargs)
        messages = _summed_penalty_warnings(caught)
        assert len(messages) == (1 if warns else 0), (layer.name, messages)
        if warns:
            assert messages[0].startswith(f"{type(layer).__name__} adds"), messages


# Two layers of one class, one of another, two fits and a hand-written step: each class warns
# once in the process, with Python's default warning filters.
ONCE = r"""
import numpy as np
import keras
import tensorflow as tf
from termwise import losses

x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
model = keras.Sequential([
    keras.Input((5,)),
    keras.layers.Dense(4, activation="relu"),
    losses.L1ActivitySparsity(0.1, name="first"),
    losses.L1ActivitySparsity(0.1, name="second"),
    losses.ActivityPenalty(losses.l1_activity, name="generic"),
    keras.layers.Dense(1),
])
model.compile(keras.optimizers.SGD(0.01), "mse")
model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0, validation_data=(x, x[:, :1]))
model.fit(x, x[:, :1], batch_size=5, epochs=1, verbose=0)
model(x, training=True)
"""


def test_each_layer_class_warns_once_per_process(tmp_path):
    done = fresh_process(ONCE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "SummedPenaltyWarning" in line]
    assert len(lines) == 2, done.stderr[-3000:]
    assert sum("SummedPenaltyWarning: L1ActivitySparsity adds" in line for line in lines) == 1
    assert sum("SummedPenaltyWarning: ActivityPenalty adds" in line for line in lines) == 1


def test_a_lambda_penalty_is_refused_on_load_in_safe_mode(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="hidden")])
    model = losses.penalize(model, "hidden", lambda a: tf.reduce_sum(tf.square(a), axis=1))
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    with pytest.raises(ValueError, match="lambda"):
        keras.models.load_model(path)
