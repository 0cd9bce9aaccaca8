"""Checkpoint round trips: a resumed run continues exactly as an uninterrupted one."""

import keras
import numpy as np
import tensorflow as tf
from helpers import penalised_model, regression_data, weights_of

from termwise import losses
from termwise.trainer import Trainer


def make(log_dir, **kwargs):
    keras.utils.set_random_seed(3)
    model = penalised_model()
    return Trainer(
        model,
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        weights={"sparsity": "linear:0:1:20"},
        checkpoint_dir=str(log_dir),
        progress=False,
        **kwargs,
    )


def shuffled(x, y):
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(64, seed=5, reshuffle_each_iteration=True)
        .batch(16)
    )


def test_resume_is_exact(tmp_path):
    x, y = regression_data(64)
    reference = make(tmp_path / "reference")
    reference.fit(shuffled(x, y), steps=12)

    first = make(tmp_path / "resumed", checkpoint_every=5)
    first.fit(shuffled(x, y), steps=7)  # saves at 5 and at the end, 7
    assert sorted(
        int(p.split("-")[-1])
        for p in tf.train.get_checkpoint_state(str(tmp_path / "resumed")).all_model_checkpoint_paths
    ) == [5, 7]

    second = make(tmp_path / "resumed")  # a new process, the same command
    assert second.step == 7
    second.fit(shuffled(x, y), until_step=12)
    assert second.step == 12
    for a, b in zip(weights_of(reference.model), weights_of(second.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(second.phases["train"].optimizer.iterations.numpy()) == 12


def test_keeps_the_last_n(tmp_path):
    x, y = regression_data(32)
    t = make(tmp_path, checkpoint_every=1, max_checkpoints=2)
    t.fit((x, y), steps=4, batch_size=8)
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert [int(p.split("-")[-1]) for p in state.all_model_checkpoint_paths] == [3, 4]


def test_unbuilt_subclassed_model_is_built_then_restored(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    x, y = regression_data(32, features=2)
    t = Trainer(
        Net(),
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    t.fit((x, y), steps=3)
    kernel = np.array(t.model.dense.kernel)
    again = Trainer(
        Net(),
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    again.evaluate((x, y))  # builds the model, then restores it
    np.testing.assert_array_equal(np.array(again.model.dense.kernel), kernel)
    again.fit((x, y), steps=1)
    assert again.step == 4
    assert int(again.phases["train"].optimizer.iterations.numpy()) == 4


def test_resume_continues_the_random_stream(tmp_path):
    # GaussianNoise draws from a keras SeedGenerator, whose state Keras leaves out of
    # TensorFlow checkpoints: a resumed run must not replay the first steps' noise.
    def noisy(directory):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((4,))
        h = keras.layers.GaussianNoise(0.5, seed=1)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        return Trainer(
            model,
            keras.optimizers.SGD(0.05),
            loss=losses.mean_squared_error,
            checkpoint_dir=str(directory),
            progress=False,
            steps_per_execution=1,
        )

    x, y = regression_data(32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    reference = noisy(tmp_path / "reference")
    reference.fit(data, steps=4)
    first = noisy(tmp_path / "resumed")
    first.fit(data, steps=2)
    second = noisy(tmp_path / "resumed")
    second.fit(data, until_step=4)
    for a, b in zip(weights_of(reference.model), weights_of(second.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
