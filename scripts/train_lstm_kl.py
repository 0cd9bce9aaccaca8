"""Trains an LSTM forecaster with a KL penalty on its hidden activations; compares it with
persistence (forecasting the last value) on held-out data.

    python scripts/train_lstm_kl.py                          # Mackey-Glass, offline
    python scripts/train_lstm_kl.py --kl_target bernoulli:0.3 --weights kl=linear:0:0.01:1000
    python scripts/train_lstm_kl.py --dataset series.csv --column load --horizon 4
    tensorboard --logdir runs/lstm_kl

--dataset: mackey_glass (generated, tau = 17, one sample per time unit), or PATH.csv with one
numeric column (or the column named by --column), in time order, with or without a header.
The KL's forms and why `KLDivergence` on raw activations is ill-posed: see models/lstm.py.
"""

import os

import common
from absl import flags

from termwise.models import lstm

flags.DEFINE_integer("window", 24, "Past values the LSTM sees.")
flags.DEFINE_integer("horizon", 8, "Steps ahead to forecast (persistence gets worse with it).")
flags.DEFINE_integer("units", 64, "LSTM units.")
flags.DEFINE_string(
    "kl_target",
    "gaussian:0.5",
    "Target of the hidden activations' KL: gaussian:SIGMA (each unit's batch moments vs "
    "N(0, SIGMA^2)) or bernoulli:RHO (mean of (h+1)/2 vs Bernoulli(RHO), Ng 2011).",
)
flags.DEFINE_string("column", "", "CSV column to read with --dataset=PATH.csv (default: first).")
common.define_flags(
    steps=3000,
    batch_size=64,
    learning_rate=3e-3,
    log_dir="runs/lstm_kl",
    dataset="mackey_glass",
    weights="kl=0.01",
    log_every=100,
    steps_per_execution=50,
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main():
    results = lstm.train_and_evaluate(
        common.config_from_flags(),
        window=FLAGS.window,
        horizon=FLAGS.horizon,
        units=FLAGS.units,
        kl_target=FLAGS.kl_target,
        column=FLAGS.column,
    )
    print(
        f"held-out forecast MSE {results['mse']:.4g} vs persistence "
        f"{results['persistence_mse']:.4g} ({FLAGS.horizon} steps ahead): ratio "
        f"{results['mse_ratio']:.4f}; KL {results['kl']:.4g}"
    )
    for name, file in lstm.MODEL_FILES.items():
        print(f"{name}: {os.path.join(FLAGS.log_dir, file)}")
    print(f"TensorBoard: tensorboard --logdir {FLAGS.log_dir}")


if __name__ == "__main__":
    common.run(main)
