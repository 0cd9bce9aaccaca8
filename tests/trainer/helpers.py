"""Small models and data shared by the trainer tests."""

import keras
import numpy as np
import tensorflow as tf


class ActivityPenalty(keras.layers.Layer):
    """Adds `scale * sum(x**2)` per example with add_loss (a per-example term)."""

    def __init__(self, scale=0.01, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        self.add_loss(self.scale * tf.reduce_sum(tf.square(x), axis=-1))
        return x


def regression_data(n=256, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ np.arange(1, features + 1, dtype="float32"))[:, None]
    return x, y


def penalised_model(features=4, regularize=True):
    inputs = keras.Input((features,))
    reg = keras.regularizers.L2(1e-3) if regularize else None
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=reg, name="hidden")(inputs)
    h = ActivityPenalty(name="sparsity")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def linear_model(features=2, name="linear"):
    """y = w.x + b with w = 1, b = 0: losses are easy to compute by hand."""
    inputs = keras.Input((features,))
    layer = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros", name=name)
    return keras.Model(inputs, layer(inputs))


def weights_of(model):
    return [np.array(v) for v in model.weights]
