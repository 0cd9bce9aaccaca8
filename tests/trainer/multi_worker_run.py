"""Trains a small penalised model as one worker of a cluster, or alone; prints JSON.

TF_CONFIG=... python multi_worker_run.py multi_worker LOG_DIR [UNTIL_STEP]
python multi_worker_run.py default LOG_DIR [UNTIL_STEP]
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from helpers import penalised_model, regression_data  # noqa: E402

from termwise import losses  # noqa: E402
from termwise.trainer import Trainer  # noqa: E402


def main(kind, log_dir, until=4):
    if kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = penalised_model()
        optimizer = keras.optimizers.SGD(0.05)
    x, y = regression_data(64)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)
    t = Trainer(
        model,
        optimizer,
        loss=losses.mean_squared_error,
        strategy=strategy,
        weights={"sparsity": "linear:0:1:4"},
        log_dir=log_dir,
        checkpoint_dir=os.path.join(log_dir, "checkpoints"),
        checkpoint_every=2,
        log_every=2,
        progress=False,
    )
    logs = t.fit(data, until_step=until).last
    print(
        json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "step": t.step,
                "logs": {k: v for k, v in logs.items() if not k.startswith("perf/")},
                "weights": [w.numpy().ravel().tolist() for w in model.weights],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
