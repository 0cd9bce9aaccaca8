"""Coming from Keras: what keras.Model.fit does through the optimizer and `compile`, the
Trainer does too, weight for weight (the README's "Coming from Keras" table)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import weights_of

from termwise.trainer import Trainer


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]], "float32") + 3.0).astype("float32")
    return x, y


def model(outputs=1):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    if outputs == 1:
        return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    heads = [keras.layers.Dense(1, name=name)(h) for name in ("a", "b")]
    return keras.Model(inputs, heads)


def fit_both(make_optimizer, epochs=2, **trainer_options):
    x, y = data()
    theirs = model()
    theirs.compile(make_optimizer(), loss="mse")
    theirs.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    ours = model()
    t = Trainer(
        ours,
        make_optimizer(),
        loss=keras.losses.MeanSquaredError(),
        progress=False,
        **trainer_options,
    )
    t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=epochs)
    return theirs, ours, t


def assert_same_weights(a, b):
    for u, v in zip(weights_of(a), weights_of(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "option", [{"clipnorm": 0.05}, {"global_clipnorm": 0.05}, {"clipvalue": 0.01}]
)
def test_gradient_clipping_is_the_optimizer_s(option):
    theirs, ours, _ = fit_both(lambda: keras.optimizers.SGD(0.1, **option))
    assert_same_weights(theirs, ours)


def test_gradient_accumulation_is_the_optimizer_s():
    theirs, ours, t = fit_both(
        lambda: keras.optimizers.Adam(1e-2, gradient_accumulation_steps=3), grad_log_every=0
    )
    assert_same_weights(theirs, ours)
    assert int(t.phases["train"].optimizer.iterations) == 12 // 3  # 12 steps, one update in 3


def test_gradient_accumulation_through_per_term_gradients():
    # A diagnostic step on every step takes one backward pass per term; the optimizer still
    # accumulates what it is given.
    theirs, ours, _ = fit_both(
        lambda: keras.optimizers.Adam(1e-2, gradient_accumulation_steps=3), grad_log_every=1
    )
    assert_same_weights(theirs, ours)


def test_a_learning_rate_schedule_is_the_optimizer_s():
    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)

    theirs, ours, t = fit_both(lambda: keras.optimizers.SGD(schedule()), log_every=1)
    assert_same_weights(theirs, ours)
    logged = t.fit(tf.data.Dataset.from_tensors(data()), steps=1).last
    # Logged after the update of step 13: the schedule at the optimizer's 13 iterations.
    assert logged["optimizer/train/learning_rate"] == pytest.approx(0.1 * 0.5 ** (13 / 2))


def test_loss_weights_are_weights():
    x, y = data()
    y2 = 2.0 * y
    theirs = model(outputs=2)
    theirs.compile(
        keras.optimizers.SGD(0.05),
        loss={"a": "mse", "b": "mse"},
        loss_weights={"a": 1.0, "b": 0.3},
    )
    theirs.fit(x, {"a": y, "b": y2}, batch_size=8, epochs=1, shuffle=False, verbose=0)
    ours = model(outputs=2)
    t = Trainer(
        ours,
        keras.optimizers.SGD(0.05),
        loss={"a": keras.losses.MeanSquaredError(), "b": keras.losses.MeanSquaredError()},
        weights={"b": 0.3},
        progress=False,
    )
    t.fit(tf.data.Dataset.from_tensor_slices((x, (y, y2))).batch(8), epochs=1)
    assert_same_weights(theirs, ours)
