"""A convolutional digit classifier with an L1 penalty on its convolutional activations.

Terms:

    cross_entropy(x, y) = -log softmax(f(x))_y                           per example
    sparsity_<layer>(x) = mean_d |a_d(x)|      for each penalised layer  per example
    diversity_<layer>   = mean_{i != j} cos(h_i, h_j)   (optional)       a batch statistic

The L1 activity penalty (Glorot, Bordes & Bengio 2011) drives ReLU activations to exactly zero:
a sparse code. The classifier is built plain (`build_cnn`), and the penalties are put on its
named layers afterwards with `losses.penalize`, which returns a model that shares the
classifier's layers and weights with a penalty layer after each named one: the Keras 3 way to
do what `model.add_loss(f(model.get_layer(name).output))` did in Keras 2, for any existing
Sequential or functional model. The feature-diversity penalty (`losses.feature_diversity`;
cf. Cogswell et al. 2016) on a dense layer is optional.

Logged beside the terms: `metric/accuracy`, and `metric/sparsity/<layer>`, the fraction of a
penalised layer's activations below 1e-3 (with `metric/sparsity/all` over every penalised
activation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise import losses
from termwise.models import data as data_lib
from termwise.models.config import RunConfig, config_errors, make_optimizer, set_up, trainer_options
from termwise.trainer import Trainer, schedules

THRESHOLD = 1e-3  # an activation below this counts as inactive

# The trained models the job writes to its run directory (on the chief), as `.keras` files that
# `keras.models.load_model` reads after `import termwise`: the plain classifier (images to
# logits), and the penalised model that was trained (logits, then the penalised activations).
MODEL_FILES = {"classifier": "classifier.keras", "penalized": "penalized.keras"}


def build_cnn(image_shape: tuple[int, int, int], num_classes: int = 10) -> keras.Model:
    """A plain convolutional classifier, images [batch, h, w, 1] -> logits [batch, classes].

    Layers: `conv1` (32 3x3, ReLU), `conv2` (64 3x3, ReLU), `pool`, `features` (dense 128,
    ReLU), `logits`. Images of 16 pixels or more are pooled after `conv1` too (`pool1`).
    """
    images = keras.Input(image_shape, name="images")
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(images)
    if image_shape[0] >= 16:
        h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", name="features")(h)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(h)
    return keras.Model(images, logits, name="cnn")


def add_penalties(
    model: keras.Model,
    sparsity_layers: Sequence[str] = ("conv1", "conv2"),
    diversity_layer: str | None = None,
) -> tuple[keras.Model, list[str]]:
    """Puts the penalties on an existing model's named layers, without editing it.

    Returns:
        (trained, penalty_names): `trained` shares every weight of `model`; it returns
        `[logits, activations of each sparsity layer...]`, and its layers named
        `sparsity_<layer>` (and `diversity_<layer>`) add the penalties with `add_loss`.

    Raises:
        ValueError: naming the flag, for a layer `model` does not have.
    """
    names = [layer.name for layer in model.layers]
    wanted = [("sparsity_layers", layer) for layer in sparsity_layers]
    if diversity_layer:
        wanted.append(("diversity_layer", diversity_layer))
    for flag, layer in wanted:
        if layer not in names:
            raise ValueError(
                f"--{flag}: {layer!r} is not a layer of the model; its layers are: "
                f"{', '.join(names)}."
            )
    if diversity_layer in sparsity_layers:
        raise ValueError(
            f"--diversity_layer ({diversity_layer!r}) is also in --sparsity_layers; penalise a "
            "layer with one of them."
        )
    penalties = {
        layer: losses.L1ActivitySparsity(mean=True, name=f"sparsity_{layer}")
        for layer in sparsity_layers
    }
    if diversity_layer:
        penalties[diversity_layer] = losses.FeatureDiversity(name=f"diversity_{diversity_layer}")
    penalized = losses.penalize(model, penalties)
    activations = [penalized.get_layer(f"sparsity_{layer}").output for layer in sparsity_layers]
    trained = keras.Model(penalized.input, [penalized.outputs[0], *activations], name=model.name)
    names = [f"sparsity_{layer}" for layer in sparsity_layers]
    return trained, names + ([f"diversity_{diversity_layer}"] if diversity_layer else [])


class CNNTrainer(Trainer):
    """Trains the classifier: `cross_entropy` here, the penalties from the model's layers.

    Args:
        sparsity_layers: the names of the layers whose activations the model returns after
            its logits, in order (for the `sparsity/<layer>` metrics).
        **kwargs: as for `Trainer`.
    """

    def __init__(self, model, optimizer, *, sparsity_layers: Sequence[str] = (), **kwargs):
        self.sparsity_layers = list(sparsity_layers)
        super().__init__(model, optimizer, **kwargs)

    def compute_terms(self, batch, training):
        images, labels = batch
        logits, *activations = self.model(images, training=training)
        logits = tf.cast(logits, tf.float32)
        labels = tf.cast(labels, tf.int64)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32)
        self.add_metric("accuracy", correct)
        if activations:
            below, sizes = [], []
            for layer, value in zip(self.sparsity_layers, activations, strict=True):
                fraction = losses.fraction_below(value, THRESHOLD)
                self.add_metric(f"sparsity/{layer}", fraction)
                size = float(np.prod(value.shape[1:]))
                below.append(fraction * size)
                sizes.append(size)
            self.add_metric("sparsity/all", tf.add_n(below) / sum(sizes))
        cross_entropy = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
        return {"cross_entropy": cross_entropy}


def _parse_schedule(flag: str, spec: str) -> schedules.Schedule:
    try:
        return schedules.parse(spec)
    except ValueError as error:
        raise ValueError(f"--{flag} ({spec!r}): {error}") from None


def train_and_evaluate(
    config: RunConfig,
    *,
    sparsity_layers: Sequence[str] = ("conv1", "conv2"),
    sparsity_weight: str = "linear:0:0.1:500",
    diversity_layer: str | None = None,
    diversity_weight: str = "0.1",
) -> dict[str, float]:
    """Trains the penalised classifier on `config.dataset` up to `config.steps`; evaluates it.

    Writes TensorBoard scalars, checkpoints and, at the end, the trained models
    `classifier.keras` and `penalized.keras` (`MODEL_FILES`) to `config.log_dir`.

    Args:
        config: the common run options (`dataset`: digits, mnist, fashion_mnist or PATH.npz
            with labels `y`).
        sparsity_layers: the layers whose activations get the L1 penalty (any layer of
            `build_cnn`'s model).
        sparsity_weight: the schedule of every `sparsity_<layer>` term that `config.weights`
            does not name.
        diversity_layer: the layer whose features get the diversity penalty (None: none).
        diversity_weight: its schedule, unless `config.weights` names `diversity_<layer>`.

    Returns:
        Held-out `accuracy`, `cross_entropy`, each penalty term, `sparsity/<layer>`,
        `sparsity/all` and `total`.

    Raises:
        ConfigError: for bad options or data, before any training.
    """
    strategy = set_up(config)
    with config_errors():
        sparsity_layers = list(sparsity_layers)
        if len(set(sparsity_layers)) != len(sparsity_layers):
            raise ValueError(f"--sparsity_layers ({sparsity_layers}) names a layer twice.")
        weights = dict(config.weights)
        sparsity_schedule = _parse_schedule("sparsity_weight", sparsity_weight)
        diversity_schedule = _parse_schedule("diversity_weight", diversity_weight)
        split = data_lib.load_images(config.dataset, seed=config.seed)
        if split.y_train is None:
            raise data_lib.DatasetError(
                f"{config.dataset}: the classifier needs labels: an array 'y' beside 'x'."
            )
        num_classes = int(max(split.y_train.max(), split.y_test.max())) + 1
        with strategy.scope():
            classifier = build_cnn(split.image_shape, num_classes)
            model, penalty_names = add_penalties(classifier, sparsity_layers, diversity_layer)
            optimizer = make_optimizer(config)
        for name in penalty_names:
            default = diversity_schedule if name.startswith("diversity_") else sparsity_schedule
            weights.setdefault(name, default)
        hparams = {
            "sparsity_layers": ",".join(sparsity_layers),
            "sparsity_weight": sparsity_weight,
            "diversity_layer": diversity_layer or "",
            "diversity_weight": diversity_weight,
        }
        trainer = CNNTrainer(
            model,
            optimizer,
            sparsity_layers=sparsity_layers,
            **trainer_options(config, strategy, weights=weights, hparams=hparams),
        )
        test = data_lib.batches((split.x_test, split.y_test), 256, shuffle=False, seed=config.seed)
        trainer.build(test)
    train = data_lib.batches(
        (split.x_train, split.y_train), config.batch_size, shuffle=True, seed=config.seed
    )
    trainer.fit(train, until_step=config.steps, **config.validation(test))
    results = trainer.evaluate(test)
    _save_models(trainer, config.log_dir, {"classifier": classifier, "penalized": model})
    logging.info(
        "Held-out accuracy %.4f; activations below %g: %s at step %d",
        results["accuracy"],
        THRESHOLD,
        ", ".join(f"{k[9:]} {v:.3f}" for k, v in results.items() if k.startswith("sparsity/")),
        trainer.step,
    )
    return results


def _save_models(trainer: Trainer, log_dir: str, models: dict[str, keras.Model]) -> None:
    """Writes each model to `log_dir`/MODEL_FILES[name]; only where the trainer writes files."""
    if trainer.writer is None:  # no log directory, or a multi-worker worker other than the chief
        return
    for name, model in models.items():
        model.save(os.path.join(log_dir, MODEL_FILES[name]))
