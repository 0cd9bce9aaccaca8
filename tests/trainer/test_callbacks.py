"""Keras callbacks in Trainer.fit, with Keras's own classes, and averaged weights (use_ema)."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, regression_data, weights_of

from termwise import losses
from termwise.trainer import Trainer


def one_batch(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))  # one step per epoch


def drifting_problem():
    """Training pulls y = w.x toward 3x; validation wants 1x: validation worsens every step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2)).astype("float32")
    return x, 3.0 * x.sum(1, keepdims=True), x.sum(1, keepdims=True)


def test_early_stopping_restores_the_best_weights():
    x, y_train, y_val = drifting_problem()

    def trainer():
        return Trainer(
            linear_model(),
            keras.optimizers.SGD(0.05),
            loss=losses.mean_squared_error,
            progress=False,
        )

    best = trainer()
    best.fit(one_batch(x, y_train), steps=1)  # the weights after epoch 0, the best one
    t = trainer()
    stop = keras.callbacks.EarlyStopping(
        monitor="eval/total", mode="min", patience=1, restore_best_weights=True
    )
    t.fit(
        one_batch(x, y_train),
        steps=10,
        validation_data=one_batch(x, y_val),
        callbacks=[stop],
    )
    assert t.step == 2  # epoch 0 is the best, epoch 1 worse: patience 1 is used up
    for a, b in zip(weights_of(best.model), weights_of(t.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_defaults_monitor_val_loss():
    x, y_train, y_val = drifting_problem()
    t = Trainer(
        linear_model(), keras.optimizers.SGD(0.05), loss=losses.mean_squared_error, progress=False
    )
    t.fit(
        one_batch(x, y_train),
        steps=10,
        validation_data=one_batch(x, y_val),
        callbacks=[keras.callbacks.EarlyStopping(patience=2)],
    )
    assert t.step == 3


def test_reduce_lr_on_plateau_changes_the_rate_the_step_uses():
    x, y, _ = drifting_problem()
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss/loss", factor=0.5, patience=0, min_delta=1e9, mode="min"
    )
    t = Trainer(
        linear_model(),
        keras.optimizers.SGD(0.1),
        loss=losses.mean_squared_error,
        log_every=1,
        progress=False,
    )
    h = t.fit(one_batch(x, y), steps=3, callbacks=[plateau])
    # The first epoch sets the best value; each later one fails to improve by min_delta and
    # halves the rate at its end, after that step's rate was logged.
    assert h.history["optimizer/train/learning_rate"] == pytest.approx([0.1, 0.1, 0.05])
    assert float(t.phases["train"].optimizer.learning_rate) == pytest.approx(0.025)
    # The steps used those rates: replay the updates by hand with SGD.
    w, b = np.ones((2, 1), "float32"), np.zeros((1,), "float32")
    for lr in (0.1, 0.1, 0.05):
        residual = x @ w + b - y
        w = w - lr * 2 * x.T @ residual / len(x)
        b = b - lr * 2 * residual.mean(0)
    np.testing.assert_allclose(weights_of(t.model)[0], w, rtol=1e-5)


def test_model_checkpoint_csv_logger_and_a_custom_callback(tmp_path):
    x, y, _ = drifting_problem()
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append("train_begin")

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(f"epoch_begin {epoch}")

        def on_train_batch_end(self, batch, logs=None):
            seen.append(f"batch_end {batch} loss={logs['loss']:.6f}")

        def on_epoch_end(self, epoch, logs=None):
            seen.append(f"epoch_end {epoch} {'loss/loss' in logs}")

        def on_train_end(self, logs=None):
            seen.append("train_end")

    path = tmp_path / "best.keras"
    log = tmp_path / "log.csv"
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # two steps per epoch
    t = Trainer(
        linear_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        steps_per_execution=1,
        progress=False,
    )
    t.fit(
        data,
        epochs=2,
        callbacks=[
            Recorder(),
            keras.callbacks.ModelCheckpoint(str(path)),
            keras.callbacks.CSVLogger(str(log)),
        ],
    )
    kinds = [s.split(" loss=")[0] for s in seen]
    assert kinds == [
        "train_begin",
        "epoch_begin 0",
        "batch_end 0",
        "batch_end 1",
        "epoch_end 0 True",
        "epoch_begin 1",
        "batch_end 0",
        "batch_end 1",
        "epoch_end 1 True",
        "train_end",
    ]
    reloaded = keras.models.load_model(path)
    for a, b in zip(weights_of(t.model), weights_of(reloaded), strict=True):
        np.testing.assert_array_equal(a, b)
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1"] and "loss/loss" in rows[0]


def test_terminate_on_nan_stops_a_skipping_run():
    x, y, _ = drifting_problem()
    y_bad = y.copy()
    y_bad[8:12] = np.nan  # the third of four batches
    data = tf.data.Dataset.from_tensor_slices((x, y_bad)).batch(4)
    t = Trainer(
        linear_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        on_nonfinite="skip",
        steps_per_execution=1,
        progress=False,
    )
    t.fit(data, steps=8, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert t.step == 3 and t.skipped_steps == 1


# ----------------------------------------------------------------------------------------------
# use_ema: fit ends with the averaged weights, as keras.Model.fit does.


def ema_optimizer():
    return keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.8)


def test_fit_ends_with_the_averaged_weights_as_keras_does():
    x, y = regression_data(32, features=2)
    keras_model = linear_model()
    keras_model.compile(ema_optimizer(), loss="mse")
    keras_model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    model = linear_model()
    t = Trainer(model, ema_optimizer(), loss=keras.losses.MeanSquaredError(), progress=False)
    t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2)
    for a, b in zip(weights_of(keras_model), weights_of(model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(weights_of(model)[0], 1.0)


def test_averages_never_change_training_and_checkpoints_keep_the_raw_weights(tmp_path):
    x, y = regression_data(32, features=2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def trainer(directory=None):
        return Trainer(
            linear_model(),
            ema_optimizer(),
            loss=losses.mean_squared_error,
            checkpoint_dir=directory,
            progress=False,
        )

    straight = trainer()
    straight.fit(data, steps=8)
    twice = trainer()  # after the first fit the model shows the averages; the second goes on
    twice.fit(data, steps=4)
    twice.fit(data, steps=4)  # from the raw weights, as if the averages had never been shown
    for a, b in zip(weights_of(straight.model), weights_of(twice.model), strict=True):
        np.testing.assert_array_equal(a, b)

    first = trainer(str(tmp_path))
    first.fit(data, steps=4)
    first.save()  # an explicit save after fit holds the raw weights too
    averaged = weights_of(first.model)
    resumed = trainer(str(tmp_path))
    resumed.evaluate(data)  # restores: the raw weights, not the averages the model showed
    assert not np.array_equal(weights_of(resumed.model)[0], averaged[0])
    resumed.fit(data, until_step=8)
    for a, b in zip(weights_of(straight.model), weights_of(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
