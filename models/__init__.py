"""Termwise's reference models: each module has a builder, its Trainer and its job.

* `models.vae`: a VAE whose `kl` layer adds the KL with `add_loss`.
* `models.cnn`: a digit classifier with L1 activation-sparsity penalties on named layers.
* `models.lstm`: an LSTM forecaster with a KL penalty on its hidden activations.
* `models.gan`: a GAN trained in two phases, with R1 (or WGAN-GP) and feature matching.

Each has a builder, its Trainer subclass and a job, `train_and_evaluate(config, ...)`.

* `models.data`: the offline default datasets (scikit-learn's digits) and file loaders.
* `models.config`: the options every job shares (`RunConfig`) and their one-line errors.
* `models.images`: image grids for TensorBoard and PNG files.

Import the module you need (`from models import vae`); this package imports nothing heavy.
"""
