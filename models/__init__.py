"""Termwise's reference models: each module has a builder, its Trainer and its job.

* `models.vae`: a VAE whose `kl` layer adds the KL with `add_loss`; `train_and_evaluate`.
* `models.data`: the offline default datasets (scikit-learn's digits) and file loaders.
* `models.config`: the options every job shares (`RunConfig`) and their one-line errors.
* `models.images`: image grids for TensorBoard and PNG files.

Import the module you need (`from models import vae`); this package imports nothing heavy.
"""
