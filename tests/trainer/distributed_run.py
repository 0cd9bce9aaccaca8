"""Trains a small penalised model on 1 or 2 replicas and prints the results as JSON.

Two runs: scheduled weights with a gradient-diagnostic step, then a PCGrad-balanced run (per-term
gradients on every step, all-reduced before they are combined) with diagnostics.

Run as a script (TensorFlow's logical devices must be set before it initialises):
    python distributed_run.py {default,mirrored}
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
from helpers import penalised_model, regression_data  # noqa: E402

from termwise import losses  # noqa: E402
from termwise.trainer import Trainer, balancers  # noqa: E402


class Scalar(Trainer):
    """Adds a scalar term, which the reduction divides by the number of replicas."""

    def sample_weight(self, batch):  # its batches are Keras's (x, y, sample_weight)
        return batch[2]

    def compute_terms(self, batch, training):
        terms = super().compute_terms(batch, training)
        terms["mean_abs_output"] = tf.reduce_mean(tf.abs(self.model(batch[0], training=training)))
        return terms


def train(strategy, evaluate=True, **options):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = penalised_model()
        optimizer = keras.optimizers.SGD(0.05)
    x, y = regression_data(64)
    sw = tf.linspace(0.5, 1.5, 64)
    data = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(16)
    t = Scalar(
        model,
        optimizer,
        loss=losses.mean_squared_error,
        strategy=strategy,
        weights={"sparsity": "linear:0:1:4"},
        progress=False,
        **options,
    )
    logs = t.fit(data, steps=6).last
    evaluation = t.evaluate((x, y, sw.numpy()), batch_size=16) if evaluate else {}
    return {
        "logs": {k: v for k, v in logs.items() if not k.startswith("perf/")},
        "eval": evaluation,
        "weights": [w.numpy().ravel().tolist() for w in model.weights],
    }


def main(kind):
    strategy = (
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        if kind == "mirrored"
        else tf.distribute.get_strategy()
    )
    runs = {
        "weighted": train(strategy, grad_log_every=3),
        # Evaluation does not involve balancers: skip it (and its trace) here.
        "pcgrad": train(strategy, False, grad_log_every=2, balancer=balancers.PCGrad()),
    }
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "runs": runs}))


if __name__ == "__main__":
    main(sys.argv[1])
