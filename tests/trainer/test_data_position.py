"""The training data's position in checkpoints: a resumed run reads the same batches as a
straight one, for the pipelines researchers write, and a position no checkpoint can hold is
said before the first step.

Each case trains a linear model with plain SGD, so the final weights depend on every batch and
on their order: 8 + a resume to 20 steps must give the straight 20 steps' weights bit for bit.
The save at step 8 comes after a validation pause, while the pipeline's read-ahead has crossed
into the next pass (4 batches a pass); TensorFlow's explicit iterator state, which the Trainer
saved before, restored the next pass in another order there (in about half the runs for a
reshuffling pipeline; in every run for `batch -> shuffle -> unbatch -> batch`).
"""

import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise import losses
from termwise.trainer import Trainer

ROWS, BATCH = 1527, 64
X = np.arange(ROWS * 2, dtype="float32").reshape(ROWS, 2) / (ROWS * 2)
Y = X[:, :1] * 3 - X[:, 1:] + 0.5


def rows():
    return tf.data.Dataset.from_tensor_slices((X, Y))


PIPELINES = {
    "shuffle_batch_prefetch": lambda: (
        rows()
        .shuffle(ROWS, seed=7, reshuffle_each_iteration=True)
        .batch(BATCH, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    ),
    "batch_shuffle_unbatch_batch": lambda: (
        rows().batch(4).shuffle(8, seed=2).unbatch().batch(BATCH).prefetch(3)
    ),
    "small_shuffle_buffer_map": lambda: (
        rows()
        .shuffle(10, seed=3)
        .map(lambda a, b: (a * 2.0, b), num_parallel_calls=2)
        .batch(BATCH)
        .prefetch(2)
    ),
}


class Pause(keras.callbacks.Callback):
    """Lets the read-ahead run on before the save, as a validation or a slow logger does."""

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.01)


def trainer(directory):
    """A linear model with plain SGD; checkpoints in `directory` (None: none)."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    return Trainer(
        model,
        keras.optimizers.SGD(0.1),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(directory) if directory else None,
        checkpoint_every=10,
        log_every=10,
        progress=False,
    )


def train(directory, pipeline, until):
    t = trainer(directory)
    held_out = rows().take(8).batch(8)
    t.fit(
        PIPELINES[pipeline](),
        until_step=until,
        validation_data=held_out,
        validation_every=10,
        callbacks=[Pause()],
    )
    return [w.numpy() for w in t.model.weights]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_a_resume_reads_the_batches_a_straight_run_reads(tmp_path, pipeline):
    straight = train(tmp_path / "straight", pipeline, 50)
    train(tmp_path / "split", pipeline, 20)
    resumed = train(tmp_path / "split", pipeline, 50)  # a new Trainer, model and dataset
    for a, b in zip(straight, resumed, strict=True):
        assert np.array_equal(a, b), (a, b)


def test_a_cached_pipeline_is_saved_without_a_position_with_one_warning(tmp_path, caplog):
    """`cache` has no symbolic position, and TensorFlow says so only at the first save: the
    checkpoints are then saved without the position (one warning naming `cache`), as a
    PyDataset's are, and a resume starts the data from its beginning, with a warning."""
    cached = rows().cache().shuffle(ROWS, seed=7).batch(BATCH)
    with caplog.at_level(logging.WARNING):
        trainer(tmp_path).fit(cached, steps=20)
    warnings = [r.getMessage() for r in caplog.records if "cannot be saved" in r.getMessage()]
    assert len(warnings) == 1 and "CacheDataset" in warnings[0], warnings
    for step in (10, 20):
        keys = tf.train.load_checkpoint(str(tmp_path / f"ckpt-{step}")).get_variable_to_shape_map()
        assert not any(k.startswith("data/") for k in keys)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = trainer(tmp_path)
        resumed.fit(cached, steps=1)
    assert resumed.step == 21
    assert any("holds no data position" in r.getMessage() for r in caplog.records)


def test_finding_out_about_the_position_does_not_change_the_data_order(tmp_path):
    """With a checkpoint directory the Trainer reads the same batches as without one: nothing
    iterates the user's dataset beside the training iterator (a scratch iterator would move
    its shuffles' shared seeds on; the reference scripts' results changed that way)."""

    def weights(directory):
        t = trainer(directory)
        t.fit(PIPELINES["shuffle_batch_prefetch"](), steps=50)
        return [w.numpy() for w in t.model.weights]

    for a, b in zip(weights(None), weights(tmp_path), strict=True):
        assert np.array_equal(a, b)


def test_a_random_op_in_a_map_is_refused_a_position_before_the_first_step(tmp_path, caplog):
    """Its state is outside the pipeline: a symbolic position would silently restore other
    noise, so the position is not saved at all, and the warning says so at the start."""
    noisy = rows().map(lambda a, b: (a + tf.random.uniform([2]), b)).batch(BATCH)
    t = trainer(tmp_path)
    with caplog.at_level(logging.WARNING):
        t.fit(noisy, steps=4)
    warnings = [r.getMessage() for r in caplog.records if "cannot be saved" in r.getMessage()]
    assert len(warnings) == 1 and "RandomUniform" in warnings[0], warnings
    keys = tf.train.load_checkpoint(str(tmp_path / "ckpt-4")).get_variable_to_shape_map()
    assert not any(k.startswith("data/") for k in keys)
