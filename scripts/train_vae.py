"""Trains a variational autoencoder whose KL term is scheduled, and evaluates it held out.

    python scripts/train_vae.py                      # digits, offline, about a minute on 2 CPUs
    python scripts/train_vae.py --weights kl=cyclical:0:1:1250:0.5 --free_bits 0.1
    python scripts/train_vae.py --dataset mnist      # downloads once, then offline
    tensorboard --logdir runs/vae

--dataset: digits (bundled with scikit-learn), mnist, fashion_mnist, or PATH.npz with an
array `x` of images [n, h, w] or [n, h, w, 1].
"""

import os

import common
from absl import flags

from termwise.models import vae

flags.DEFINE_integer("latent_dim", 16, "Size of the latent code z.")
flags.DEFINE_float("free_bits", 0.0, "Free bits per latent dimension, in nats (0: off).")
flags.DEFINE_float("beta", 1.0, "Multiplies the KL weight (beta-VAE); 1 trains the ELBO.")
common.define_flags(
    steps=5000,
    batch_size=64,
    learning_rate=2e-3,
    log_dir="runs/vae",
    dataset="digits",
    weights="kl=linear:0:1:2000",
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main():
    results = vae.train_and_evaluate(
        common.config_from_flags(),
        latent_dim=FLAGS.latent_dim,
        free_bits=FLAGS.free_bits,
        beta=FLAGS.beta,
    )
    print(
        f"held-out negative ELBO: {results['negative_elbo']:.2f} nats per image "
        f"(reconstruction {results['reconstruction']:.2f} + KL {results['kl']:.2f})"
    )
    if "fid" in results:
        print(
            f"FID {results['fid']:.3f} (floor {results['fid_floor']:.3f}): "
            f"{int(results['fid_samples'])} samples from the prior against the held-out images, "
            f"in the features of a classifier of held-out accuracy "
            f"{results['fid_classifier_accuracy']:.4f}"
        )
    print(f"samples: {FLAGS.log_dir}/samples.png")
    for name, file in vae.MODEL_FILES.items():
        print(f"{name}: {os.path.join(FLAGS.log_dir, file)}")
    print(f"TensorBoard: tensorboard --logdir {FLAGS.log_dir}")


if __name__ == "__main__":
    common.run(main)
