"""Termwise's reference models: each module has a builder, its Trainer and its job.

* `termwise.models.vae`: a VAE whose `kl` layer adds the KL with `add_loss`.
* `termwise.models.cnn`: a digit classifier with L1 activation-sparsity penalties on named layers.
* `termwise.models.lstm`: an LSTM forecaster with a KL penalty on its hidden activations.
* `termwise.models.gan`: a GAN trained in two phases, with R1 (or WGAN-GP) and feature matching.

Each has a builder, its Trainer subclass and a job, `train_and_evaluate(config, ...)`.

* `termwise.models.data`: the offline default datasets (scikit-learn's digits) and file loaders.
* `termwise.models.config`: the options every job shares (`RunConfig`) and their one-line errors.
* `termwise.models.images`: image grids for TensorBoard and PNG files.

Import the module you need (`from termwise.models import vae`); this package imports nothing heavy.
"""
