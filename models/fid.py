"""A sample-quality metric: the Fréchet distance in a digit classifier's features (FID).

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium": fit a Gaussian to the features of each set of images and take the Fréchet (2-
Wasserstein) distance between the two,

    FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),

where Tr (S_1 S_2)^(1/2) = Tr (S_1^(1/2) S_2 S_1^(1/2))^(1/2) is computed in float64 from the
eigenvalues of the symmetric positive semi-definite S_1^(1/2) S_2 S_1^(1/2) (no complex residue,
and exact for singular covariances).

The features are the penultimate activations of a small LeNet-like CNN (LeCun et al. 1998),
as MNIST GAN papers use in place of Inception, trained here on the dataset's training split
only (`build_classifier`, `train_classifier`). `fid_scorer` trains it (deterministically,
seconds on 2 CPU cores for the digits) or loads it from `<directory>/fid_classifier.keras`,
whose `fid_classifier.json` holds its held-out accuracy and the fingerprint of the data and
recipe it was trained on; a mismatch retrains it.

The reference side is the held-out split; the floor, the best a generator can do in these
features, is the training split scored against it (`FIDScorer.floor`). Generated sets are
scored with as many images as the floor's training side (`FIDScorer.num_samples`), so both
estimates carry the same finite-sample bias.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from termwise.models import data as data_lib

__all__ = [
    "CLASSIFIER_FILE",
    "CLASSIFIER_INFO_FILE",
    "FEATURES_LAYER",
    "FIDScorer",
    "build_classifier",
    "feature_frechet_distance",
    "fid_scorer",
    "frechet_distance",
    "moments",
    "train_classifier",
]

CLASSIFIER_FILE = "fid_classifier.keras"
CLASSIFIER_INFO_FILE = "fid_classifier.json"
FEATURES_LAYER = "features"
MAX_SAMPLES = 10_000  # generated images per score, at most (the training split's size, if less)
_RECIPE_VERSION = 1  # bump when build_classifier or train_classifier change what they make


# ------------------------------------------------------------------------------------------------
# The distance.


def moments(features) -> tuple[np.ndarray, np.ndarray]:
    """The mean [d] and the unbiased covariance [d, d] of features [n, d], in float64.

    Raises:
        ValueError: if `features` is not [n, d] with n >= 2.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"`features` (shape {features.shape}) must be [n, d] with n >= 2 (a covariance)."
        )
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1:] * 2)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (round-off negatives clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mean_1, cov_1, mean_2, cov_2) -> float:
    """The Fréchet distance between N(mean_1, cov_1) and N(mean_2, cov_2) (Heusel et al. 2017).

        d^2 = |mean_1 - mean_2|^2 + Tr(cov_1) + Tr(cov_2) - 2 Tr (cov_1 cov_2)^(1/2)

    in float64, with Tr (cov_1 cov_2)^(1/2) = sum_i sqrt(lambda_i) over the eigenvalues of the
    symmetric PSD matrix cov_1^(1/2) cov_2 cov_1^(1/2) (similar to cov_1 cov_2).

    Args:
        mean_1, mean_2: means [d].
        cov_1, cov_2: symmetric positive semi-definite covariances [d, d] (singular is fine).

    Returns:
        The squared distance (>= 0; a round-off negative is returned as 0).

    Raises:
        ValueError: if the shapes do not agree or a value is not finite.
    """
    mean_1, mean_2 = np.asarray(mean_1, np.float64), np.asarray(mean_2, np.float64)
    cov_1, cov_2 = np.asarray(cov_1, np.float64), np.asarray(cov_2, np.float64)
    d = mean_1.shape[0] if mean_1.ndim == 1 else -1
    if mean_2.shape != (d,) or cov_1.shape != (d, d) or cov_2.shape != (d, d):
        raise ValueError(
            f"`mean_1`, `cov_1`, `mean_2`, `cov_2` (shapes {mean_1.shape}, {cov_1.shape}, "
            f"{mean_2.shape}, {cov_2.shape}) must be [d], [d, d], [d], [d, d]."
        )
    for name, value in (("mean_1", mean_1), ("cov_1", cov_1), ("mean_2", mean_2), ("cov_2", cov_2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"`{name}` holds values that are not finite.")
    root_1 = _psd_sqrt(cov_1)
    middle = root_1 @ cov_2 @ root_1
    eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    distance = np.sum((mean_1 - mean_2) ** 2) + np.trace(cov_1) + np.trace(cov_2) - 2 * trace_sqrt
    return max(float(distance), 0.0)


def feature_frechet_distance(features_1, features_2) -> float:
    """`frechet_distance` between the Gaussians fitted (`moments`) to two feature sets [n, d]."""
    return frechet_distance(*moments(features_1), *moments(features_2))


# ------------------------------------------------------------------------------------------------
# The classifier whose features the distance is measured in.


def build_classifier(image_shape: tuple[int, int, int], num_classes: int, *, seed: int = 0):
    """A LeNet-like CNN (LeCun et al. 1998): two 3x3 convolutions with max pooling, then fully
    connected layers of 120 and 84 units (the latter named `features`), then the class logits.

    Every layer computes in float32 (whatever the global mixed-precision policy) and draws its
    initial weights from its own fixed seed, so building it leaves Keras's global random state
    untouched and gives the same weights every time.

    Args:
        image_shape: (height, width, channels) of the images.
        num_classes: number of classes.
        seed: base seed of the initial weights.

    Returns:
        A functional `keras.Model` from images to logits [batch, num_classes].
    """
    seeds = iter(range(1000 * seed, 1000 * seed + 100))

    def init():
        return {"kernel_initializer": keras.initializers.GlorotUniform(seed=next(seeds))}

    images = keras.Input(tuple(image_shape), name="images")
    h = images
    for filters in (32, 64):
        h = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", dtype="float32", **init()
        )(h)
        h = keras.layers.MaxPooling2D(2, padding="same", dtype="float32")(h)
    h = keras.layers.Flatten(dtype="float32")(h)
    h = keras.layers.Dense(120, activation="relu", dtype="float32", **init())(h)
    h = keras.layers.Dense(84, activation="relu", dtype="float32", name=FEATURES_LAYER, **init())(h)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits", **init())(h)
    return keras.Model(images, logits, name="fid_classifier")


def train_classifier(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> keras.Model:
    """Trains `model` with Adam on softmax cross-entropy, in one compiled loop.

    The batches are drawn by NumPy from `seed` (a fresh permutation every pass) and nothing else
    is random, so the same call gives the same weights, and Keras's global random state is left
    untouched.

    Returns:
        `model`, trained.
    """
    images = tf.constant(np.asarray(images, np.float32))
    labels = tf.constant(np.asarray(labels, np.int64))
    n = int(images.shape[0])
    batch_size = min(batch_size, n)
    rng = np.random.default_rng([seed, 3])
    passes = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])[: steps * batch_size]
    order = tf.constant(order.reshape(steps, batch_size).astype(np.int32))
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.trainable_variables)

    @tf.function
    def run(order):
        for i in tf.range(tf.shape(order)[0]):
            x, y = tf.gather(images, order[i]), tf.gather(labels, order[i])
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
        return tf.constant(0)

    run(order)
    return model


def _batched(fn, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    parts = [np.asarray(fn(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def _features(extractor: keras.Model, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return _batched(lambda x: extractor(x, training=False), images).astype(np.float64)


def _accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    logits = _batched(lambda x: model(x, training=False), images)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _fingerprint(split: data_lib.Split, recipe: dict) -> str:
    """sha256 of the recipe and of every array of the split (their shapes, dtypes and bytes)."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for array in (split.x_train, split.y_train, split.x_test, split.y_test):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _load_cached(directory: str, fingerprint: str) -> tuple[keras.Model, float] | None:
    model_path = os.path.join(directory, CLASSIFIER_FILE)
    info_path = os.path.join(directory, CLASSIFIER_INFO_FILE)
    if not (os.path.isfile(model_path) and os.path.isfile(info_path)):
        return None
    try:
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        if info.get("fingerprint") != fingerprint:
            logging.info(
                "%s was trained on other data or by another recipe: retraining.", info_path
            )
            return None
        model = keras.saving.load_model(model_path, compile=False)
        return model, float(info["held_out_accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning(
            "Could not load the FID classifier from %s (%s): retraining.", directory, error
        )
        return None


def _save(directory: str, model: keras.Model, info: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, CLASSIFIER_FILE))
    path = os.path.join(directory, CLASSIFIER_INFO_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)  # the fingerprint last: a torn save is retrained


# ------------------------------------------------------------------------------------------------
# The scorer.


@dataclasses.dataclass(frozen=True)
class FIDScorer:
    """Scores sets of images by their FID to a dataset's held-out split.

    Attributes:
        extractor: the classifier up to its `features` layer: images -> features [n, 84].
        reference_mean, reference_cov: the held-out split's feature moments (float64).
        floor: the FID of the training split's first `num_samples` images (the best any
            generator can score in these features, at this sample size).
        held_out_accuracy: the classifier's accuracy on the held-out split.
        num_samples: how many generated images a score should use (as many as the floor's).
        num_reference: the number of held-out images (the reference side).
    """

    extractor: keras.Model
    reference_mean: np.ndarray
    reference_cov: np.ndarray
    floor: float
    held_out_accuracy: float
    num_samples: int
    num_reference: int

    def features(self, images) -> np.ndarray:
        """Features [n, d] (float64) of images [n, h, w, c] in [0, 1]."""
        return _features(self.extractor, images)

    def score(self, images) -> float:
        """The FID of `images` [n, h, w, c] in [0, 1] to the held-out split (n >= 2; use
        `num_samples` to compare with `floor`)."""
        return frechet_distance(
            *moments(self.features(images)), self.reference_mean, self.reference_cov
        )


def fid_scorer(
    split: data_lib.Split,
    directory: str | None = None,
    *,
    write: bool = True,
    steps: int = 1500,
    seed: int = 0,
    num_samples: int | None = None,
) -> FIDScorer:
    """The FID scorer of a labelled dataset: its classifier trained (or loaded), and its floor.

    Args:
        split: the dataset; the classifier trains on `x_train`, `y_train` only.
        directory: where the classifier is cached (`fid_classifier.keras` and
            `fid_classifier.json`); None trains it in memory every time.
        write: save a newly trained classifier into `directory` (False on all but one worker).
        steps: training steps of the classifier (batches of 64).
        seed: seed of its initial weights and of its batches.
        num_samples: images per score (default: the training split's size, at most 10,000).

    Returns:
        The scorer.

    Raises:
        ValueError: if the split has no labels, or `num_samples` is not in [2, len(x_train)].
    """
    if split.y_train is None or split.y_test is None:
        raise ValueError("`split` has no labels (`y`): the FID classifier needs them.")
    num_samples = min(len(split.x_train), MAX_SAMPLES) if num_samples is None else num_samples
    if not 2 <= num_samples <= len(split.x_train):
        raise ValueError(
            f"`num_samples` ({num_samples!r}) must be in [2, {len(split.x_train)}] (the training "
            "split's size, the floor's side)."
        )
    num_classes = int(max(split.y_train.max(), split.y_test.max())) + 1
    recipe = {
        "version": _RECIPE_VERSION,
        "steps": steps,
        "seed": seed,
        "num_classes": num_classes,
        "keras": keras.__version__,
    }
    fingerprint = _fingerprint(split, recipe)
    cached = _load_cached(directory, fingerprint) if directory else None
    if cached is not None:
        classifier, accuracy = cached
        logging.info("FID classifier loaded from %s (held-out accuracy %.4f)", directory, accuracy)
    else:
        classifier = build_classifier(split.image_shape, num_classes, seed=seed)
        train_classifier(classifier, split.x_train, split.y_train, steps=steps, seed=seed)
        accuracy = _accuracy(classifier, split.x_test, split.y_test)
        logging.info("FID classifier trained: held-out accuracy %.4f", accuracy)
        if directory and write:
            info = {
                "fingerprint": fingerprint,
                "held_out_accuracy": accuracy,
                "train_examples": len(split.x_train),
                "held_out_examples": len(split.x_test),
                "recipe": recipe,
            }
            _save(directory, classifier, info)
    extractor = keras.Model(
        classifier.input, classifier.get_layer(FEATURES_LAYER).output, name="fid_features"
    )
    reference_mean, reference_cov = moments(_features(extractor, split.x_test))
    floor = frechet_distance(
        *moments(_features(extractor, split.x_train[:num_samples])), reference_mean, reference_cov
    )
    return FIDScorer(
        extractor, reference_mean, reference_cov, floor, accuracy, num_samples, len(split.x_test)
    )
