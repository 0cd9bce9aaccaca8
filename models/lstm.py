"""An LSTM forecaster whose hidden activations carry a KL penalty toward a declared target.

Terms:

    mse(x, y) = (f(x) - y)^2        the forecast's squared error, per example
    kl        = sum_j KL(P_j || Q)   added by the model's `kl` layer; a batch statistic

where P_j is the distribution of hidden unit j's activations h_tj over the batch and the
window's time steps, and Q the declared target. Two sound forms (`kl_target`):

* `gaussian:SIGMA` (default `gaussian:0.5`), the closed-form KL from each unit's
  moment-matched Gaussian N(m_j, s_j^2) (batch-and-time mean and variance) to N(0, SIGMA^2):

      KL_j = log(SIGMA / s_j) + (s_j^2 + m_j^2) / (2 SIGMA^2) - 1/2

* `bernoulli:RHO`, the sparse-autoencoder KL of Ng (2011): the activations, in (-1, 1) for an
  LSTM (h = o * tanh(c)), are mapped to (0, 1) by (h + 1) / 2, and their mean rho_hat_j is
  compared with a Bernoulli of mean RHO:

      KL_j = RHO log(RHO / rho_hat_j) + (1 - RHO) log((1 - RHO) / (1 - rho_hat_j))

Both are zero exactly when the batch's statistics match the target, and their gradients pull
each unit's statistics toward it.

Why not `keras.losses.KLDivergence()(h, tf.random.normal(tf.shape(h)))`, as the seed did?
`KLDivergence(y_true, y_pred)` computes sum_i y_true_i log(y_true_i / y_pred_i) over the last
axis, treating each row of both arguments as a probability vector: it clips both to
[1e-7, 1] and normalises neither. Raw activations are not probabilities, so every negative
activation (half of a tanh layer's) is clipped to 1e-7 and contributes nothing; rows do not sum
to one, so the value is not a divergence (it can be negative, and is not zero when the
distributions agree); and the "target" is a fresh random draw each step, half of it negative
and clipped, so it compares activations with noise element by element rather than with a
distribution. The value is meaningless and its gradient is noise. A KL between distributions
needs the activations' distribution (here: its moments, or its mean firing rate) and the
target's density, as above.

The forecast is judged against persistence, the forecast x_{t+horizon} = x_t, whose squared
error is logged beside the terms as `metric/persistence_mse` and `eval/persistence_mse`; the job
also writes `eval/mse_ratio` (LSTM MSE / persistence MSE).
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf
from absl import logging

from termwise import losses
from termwise.models import data as data_lib
from termwise.models.config import RunConfig, config_errors, make_optimizer, set_up, trainer_options
from termwise.trainer import Trainer

# The trained model the job writes to its run directory (on the chief), as a `.keras` file that
# `keras.models.load_model` reads after `import termwise`.
MODEL_FILES = {"forecaster": "forecaster.keras"}


def parse_kl_target(spec: str) -> tuple[str, float]:
    """Parses `--kl_target`: `gaussian:SIGMA` (SIGMA > 0) or `bernoulli:RHO` (0 < RHO < 1).

    Raises:
        ValueError: naming --kl_target and what is expected.
    """
    form, _, value = spec.partition(":")
    try:
        number = float(value) if value else None
    except ValueError:
        number = None
    ok = number is not None and (
        (form == "gaussian" and number > 0) or (form == "bernoulli" and 0 < number < 1)
    )
    if not ok:
        raise ValueError(
            f"--kl_target ({spec!r}) must be gaussian:SIGMA with SIGMA > 0 or bernoulli:RHO "
            "with 0 < RHO < 1, e.g. gaussian:0.5."
        )
    return form, number


@keras.saving.register_keras_serializable(package="termwise")
class LastStep(keras.layers.Layer):
    """[batch, time, units] -> [batch, units]: the last time step."""

    def call(self, inputs):
        return inputs[:, -1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def build_lstm(
    window: int, *, units: int = 64, kl_target: str = "gaussian:0.5", name: str = "lstm_forecaster"
) -> keras.Model:
    """Builds the forecaster: [batch, window, 1] -> [batch, 1].

    An LSTM over the window (its hidden sequence passes through the `kl` layer, which adds the
    KL with `add_loss`), then a linear read-out of its last hidden state that forecasts the
    change from the window's last value: y_hat = x_t + Dense(h_t).

    Args:
        window: input length.
        units: LSTM units.
        kl_target: the KL's target, see `parse_kl_target`.
    """
    form, value = parse_kl_target(kl_target)
    history = keras.Input((window, 1), name="history")
    hidden = keras.layers.LSTM(units, return_sequences=True, name="lstm")(history)
    if form == "gaussian":
        hidden = losses.GaussianActivityKL(sigma=value, name="kl")(hidden)
    else:
        hidden = losses.BernoulliSparsityKL(target=value, squash="symmetric", name="kl")(hidden)
    last_hidden = LastStep(name="last_hidden")(hidden)
    change = keras.layers.Dense(1, dtype="float32", name="change")(last_hidden)
    last_value = LastStep(name="last_value")(history)
    forecast = keras.layers.Add(name="forecast", dtype="float32")([last_value, change])
    return keras.Model(history, forecast, name=name)


class LSTMTrainer(Trainer):
    """Trains the forecaster: the `mse` term here, the `kl` term from the model's `kl` layer.

    Also logs `persistence_mse`, the squared error of forecasting the window's last value.
    """

    def compute_terms(self, batch, training):
        history, target = batch
        target = tf.cast(target, tf.float32)
        forecast = tf.cast(self.model(history, training=training), tf.float32)
        persistence = tf.cast(history[:, -1], tf.float32)
        self.add_metric("persistence_mse", losses.mean_squared_error(target, persistence))
        return {"mse": losses.mean_squared_error(target, forecast)}


def train_and_evaluate(
    config: RunConfig,
    *,
    window: int = 24,
    horizon: int = 8,
    units: int = 64,
    kl_target: str = "gaussian:0.5",
    column: str | None = None,
) -> dict[str, float]:
    """Trains the forecaster on `config.dataset` up to `config.steps`; evaluates it held out.

    The series (`termwise.models.data.load_forecast`) is split in time: the test windows come
    from its last 20%. Writes TensorBoard scalars (`loss/mse`, `loss/kl`, `metric/persistence_mse`,
    `eval/...`, `eval/mse_ratio`), checkpoints and, at the end, the trained model
    `forecaster.keras` (`MODEL_FILES`) to `config.log_dir`; a rerun of the same command resumes.

    Args:
        config: the common run options (`dataset`: "mackey_glass" or PATH.csv).
        window: past values the LSTM sees.
        horizon: steps ahead to forecast.
        units: LSTM units.
        kl_target: `gaussian:SIGMA` or `bernoulli:RHO` (see the module docstring).
        column: the CSV column to read (None: the first).

    Returns:
        Held-out `mse`, `kl`, `persistence_mse`, `mse_ratio` (mse / persistence_mse) and
        `total`; MSEs are in units of the training series' variance.

    Raises:
        ConfigError: for bad options or data, before any training.
    """
    strategy = set_up(config)
    with config_errors():
        for flag, value in (("window", window), ("horizon", horizon), ("units", units)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{flag} ({value!r}) must be a positive integer.")
        parse_kl_target(kl_target)
        split = data_lib.load_forecast(
            config.dataset, window=window, horizon=horizon, column=column or None
        )
        with strategy.scope():
            model = build_lstm(window, units=units, kl_target=kl_target)
            optimizer = make_optimizer(config)
        hparams = {
            "window": window,
            "horizon": horizon,
            "units": units,
            "kl_target": kl_target,
        }
        options = trainer_options(
            config, strategy, hparams=hparams, hparams_metrics=("eval/mse_ratio",)
        )
        trainer = LSTMTrainer(model, optimizer, **options)
        test = data_lib.batches((split.x_test, split.y_test), 256, shuffle=False, seed=config.seed)
        trainer.build(test)
    train = data_lib.batches(
        (split.x_train, split.y_train), config.batch_size, shuffle=True, seed=config.seed
    )
    trainer.fit(train, until_step=config.steps, **config.validation(test))
    results = trainer.evaluate(test)
    results["mse_ratio"] = results["mse"] / results["persistence_mse"]
    if trainer.writer is not None:
        trainer.writer.scalars(trainer.step, {"eval/mse_ratio": results["mse_ratio"]})
        trainer.writer.flush()
    _save_models(trainer, config.log_dir, {"forecaster": model})
    logging.info(
        "Held-out forecast MSE %.4g vs persistence %.4g (ratio %.4g), %d steps ahead, step %d",
        results["mse"],
        results["persistence_mse"],
        results["mse_ratio"],
        horizon,
        trainer.step,
    )
    return results


def _save_models(trainer: Trainer, log_dir: str, models: dict[str, keras.Model]) -> None:
    """Writes each model to `log_dir`/MODEL_FILES[name]; only where the trainer writes files."""
    if trainer.writer is None:  # no log directory, or a multi-worker worker other than the chief
        return
    for name, model in models.items():
        model.save(os.path.join(log_dir, MODEL_FILES[name]))
