"""Trains a convolutional digit classifier with an L1 penalty on its convolutional activations.

    python scripts/train_cnn_sparsity.py                       # digits, offline
    python scripts/train_cnn_sparsity.py --sparsity_layers conv2,features --sparsity_weight 0.05
    python scripts/train_cnn_sparsity.py --diversity_layer features --diversity_weight 0.1
    python scripts/train_cnn_sparsity.py --dataset mnist       # downloads once, then offline
    tensorboard --logdir runs/cnn_sparsity

The classifier is built plain, then `losses.penalize` puts an `L1ActivitySparsity` layer after
each layer named by --sparsity_layers (any layer of the model, without editing it), adding the
term `sparsity_<layer>`; TensorBoard shows `sparsity/<layer>`, the fraction of its activations
below 1e-3, and `accuracy`.

--dataset: digits (bundled with scikit-learn), mnist, fashion_mnist, or PATH.npz with arrays
`x` (images [n, h, w] or [n, h, w, 1]) and `y` (integer labels).
"""

import os

import common
from absl import flags

from termwise.models import cnn

flags.DEFINE_list(
    "sparsity_layers", ["conv1", "conv2"], "Layers whose activations get the L1 penalty."
)
flags.DEFINE_string(
    "sparsity_weight",
    "linear:0:0.1:500",
    "Weight schedule of each sparsity_<layer> term (--weights can set one term's).",
)
flags.DEFINE_string(
    "diversity_layer", "", "Layer whose features get the diversity penalty (empty: off)."
)
flags.DEFINE_string("diversity_weight", "0.1", "Weight schedule of the diversity term.")
common.define_flags(
    steps=2000,
    batch_size=64,
    learning_rate=1e-3,
    log_dir="runs/cnn_sparsity",
    dataset="digits",
    log_every=100,
    steps_per_execution=50,
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main():
    results = cnn.train_and_evaluate(
        common.config_from_flags(),
        sparsity_layers=FLAGS.sparsity_layers,
        sparsity_weight=FLAGS.sparsity_weight,
        diversity_layer=FLAGS.diversity_layer or None,
        diversity_weight=FLAGS.diversity_weight,
    )
    sparsity = ", ".join(
        f"{key.split('/', 1)[1]} {value:.3f}"
        for key, value in results.items()
        if key.startswith("sparsity/")
    )
    print(f"held-out accuracy: {results['accuracy']:.4f}")
    print(f"fraction of penalised activations below 1e-3: {sparsity}")
    for name, file in cnn.MODEL_FILES.items():
        print(f"{name}: {os.path.join(FLAGS.log_dir, file)}")
    print(f"TensorBoard: tensorboard --logdir {FLAGS.log_dir}")


if __name__ == "__main__":
    common.run(main)
