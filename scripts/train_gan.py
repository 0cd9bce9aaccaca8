"""Trains a DCGAN-style GAN in two phases (discriminator, then generator) with named penalties.

    python scripts/train_gan.py                        # digits, offline, a few minutes on 2 CPUs
    python scripts/train_gan.py --loss wgan_gp --r1_gamma 0 --drift 0.001
    python scripts/train_gan.py --loss wgan_gp --r1_gamma 0 --n_critic 5   # Gulrajani et al.
    python scripts/train_gan.py --feature_matching l1 --weights feature_matching=0.1
    python scripts/train_gan.py --dataset mnist        # downloads once, then offline
    tensorboard --logdir runs/gan

Terms: phase `discriminator`: d_adversarial, r1 (--r1_gamma > 0), gradient_penalty
(--loss=wgan_gp), drift (--drift > 0); phase `generator`: g_adversarial, feature_matching
(unless --feature_matching=none). --weights reweighs any of them.

At every --sample_every steps and at the end: the sample grid and `eval/fid`, `eval/fid_floor`
(1527 samples against the 270 held-out digits in the features of a digit classifier trained
on the training split, cached in --log_dir; see termwise.models.fid); at the end it prints
`FID <score> (floor <score>)` and writes generator.keras and discriminator.keras. Samples, the
FID and generator.keras come from the moving average of the generator's weights
(--ema_momentum). BUILD.md's "GAN sample quality" section has the sweep behind the defaults.

--dataset: digits (bundled with scikit-learn), mnist, fashion_mnist, or PATH.npz with an
array `x` of images [n, h, w] or [n, h, w, 1].
"""

import os

import common
from absl import flags

from termwise.models import gan

flags.DEFINE_enum(
    "loss",
    "nonsaturating",
    list(gan.ADVERSARIAL_LOSSES),
    "Adversarial loss: nonsaturating (Goodfellow et al. 2014) or wgan_gp (Wasserstein critic "
    "with the gradient penalty of Gulrajani et al. 2017; add --r1_gamma=0 for their setup).",
)
flags.DEFINE_integer("latent_dim", 32, "Size of the latent code z.")
flags.DEFINE_integer("width", 32, "Base number of channels of both networks.")
flags.DEFINE_enum(
    "generator_norm",
    "pixel",
    list(gan.GENERATOR_NORMS),
    "The generator's normalization: pixel (each position's features over their RMS, per "
    "example; Karras et al. 2018) or batch (batch norm, as in DCGAN).",
)
flags.DEFINE_float(
    "r1_gamma", 0.1, "gamma of the R1 penalty on real data (Mescheder et al. 2018); 0: off."
)
flags.DEFINE_float("gp_weight", 10.0, "lambda of the WGAN-GP gradient penalty (--loss=wgan_gp).")
flags.DEFINE_enum(
    "feature_matching",
    "l2",
    list(gan.FEATURE_MATCHING),
    "Feature matching on the discriminator's features (Salimans et al. 2016): l2, l1 or none.",
)
flags.DEFINE_float(
    "drift", 0.0, "epsilon of the drift penalty epsilon D(x)^2 (Karras et al. 2018); 0: off."
)
flags.DEFINE_float(
    "discriminator_learning_rate", None, "The discriminator's learning rate (default: the same)."
)
flags.DEFINE_float(
    "ema_momentum",
    0.995,
    "Momentum of the moving average of the generator's weights that samples, the FID and "
    "generator.keras use (Karras et al. 2018); 0 uses the raw weights.",
)
flags.DEFINE_integer(
    "n_critic",
    1,
    "Discriminator updates per generator update, each on its own batch (Gulrajani et al. 2017 "
    "use 5 with --loss=wgan_gp).",
)
flags.DEFINE_integer(
    "sample_every", 1000, "Steps between sample images and FID scores (0: only at the end)."
)
common.define_flags(
    steps=3500,
    batch_size=256,
    learning_rate=5e-4,
    log_dir="runs/gan",
    dataset="digits",
    steps_per_execution=20,
)
flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main():
    results = gan.train_and_evaluate(
        common.config_from_flags(),
        loss=FLAGS.loss,
        latent_dim=FLAGS.latent_dim,
        width=FLAGS.width,
        generator_norm=FLAGS.generator_norm,
        r1_gamma=FLAGS.r1_gamma,
        gp_weight=FLAGS.gp_weight,
        feature_matching=FLAGS.feature_matching,
        drift=FLAGS.drift,
        discriminator_learning_rate=FLAGS.discriminator_learning_rate,
        ema_momentum=FLAGS.ema_momentum or None,
        n_critic=FLAGS.n_critic,
        sample_every=FLAGS.sample_every,
    )
    terms = ", ".join(
        f"{k} {v:.3f}"
        for k, v in results.items()
        if k != "step" and not k.startswith(("total", "fid"))
    )
    print(f"held-out at step {int(results['step'])}: {terms}")
    if "fid" in results:
        print(
            f"FID {results['fid']:.3f} (floor {results['fid_floor']:.3f}): "
            f"{int(results['fid_samples'])} samples against the held-out images, in the features "
            f"of a classifier of held-out accuracy {results['fid_classifier_accuracy']:.4f}"
        )
    else:
        print("FID: not measured (the dataset has no labels to train its classifier on)")
    print(f"samples: {os.path.join(FLAGS.log_dir, 'samples.png')}")
    print(f"generator: {os.path.join(FLAGS.log_dir, gan.GENERATOR_FILE)}")
    print(f"discriminator: {os.path.join(FLAGS.log_dir, gan.DISCRIMINATOR_FILE)}")
    print(f"TensorBoard: tensorboard --logdir {FLAGS.log_dir}")


if __name__ == "__main__":
    common.run(main)
