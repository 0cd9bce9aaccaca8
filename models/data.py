"""Datasets for the reference models: offline by default, downloads only when asked.

* `"digits"` (default): scikit-learn's bundled 8x8 handwritten digits (1,797 images), offline.
* `"mnist"`, `"fashion_mnist"`: 28x28 images through `keras.datasets` (downloaded and cached on
  first use; offline once cached).
* `"PATH.npz"`: arrays `x` (images [n, h, w] or [n, h, w, 1], or features) and optional `y`,
  loaded with `allow_pickle=False`.

Images come back as float32 in [0, 1] with a channel axis: [n, h, w, 1].
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")


class DatasetError(ValueError):
    """A dataset could not be loaded: the message names it and what was expected."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Train and test arrays; `y_*` are None for unlabelled data."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise DatasetError(
            f"{source}: expected images of shape [n, h, w] or [n, h, w, 1], got {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{source}: expected numeric images, got dtype {x.dtype}.")
    x = x.astype("float32")
    top = float(x.max()) if x.size else 0.0
    if top > 1.0:
        x = x / (255.0 if top > 16.0 else 16.0)
    return np.clip(x, 0.0, 1.0)


def _split(x, y, test_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], None if y is None else y[train], x[test], None if y is None else y[test])


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads `x` and optional `y` from an .npz file, with one-line errors."""
    if not os.path.isfile(path):
        raise DatasetError(f"--dataset file {path!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise DatasetError(
                    f"{path}: expected an array named 'x' (and optionally 'y'), found "
                    f"{sorted(archive.files)}."
                )
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable .npz file ({error}).") from None
    if y is not None and len(y) != len(x):
        raise DatasetError(f"{path}: 'x' has {len(x)} rows but 'y' has {len(y)}.")
    return x, y


def load_images(name: str = "digits", *, seed: int = 0, test_fraction: float = 0.15) -> Split:
    """Loads an image dataset as [n, h, w, 1] floats in [0, 1].

    Args:
        name: "digits", "mnist", "fashion_mnist" or a path to an .npz file.
        seed: seed of the train/test split (digits and .npz files).
        test_fraction: held-out fraction (digits and .npz files).

    Raises:
        DatasetError: for an unknown name, or a missing, corrupt or wrongly shaped file.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = _as_images(digits.images, "digits")
        return _split(x, digits.target.astype("int64"), test_fraction, seed)
    if name in ("mnist", "fashion_mnist"):
        import keras

        module = getattr(keras.datasets, name)
        try:
            (x_train, y_train), (x_test, y_test) = module.load_data()
        except Exception as error:  # noqa: BLE001 - any download failure is one line
            raise DatasetError(
                f"--dataset={name}: could not download or read it ({error}); the default "
                "'digits' works offline."
            ) from None
        return Split(
            _as_images(x_train, name),
            y_train.astype("int64"),
            _as_images(x_test, name),
            y_test.astype("int64"),
        )
    if name.endswith(".npz"):
        x, y = load_npz(name)
        return _split(
            _as_images(x, name), None if y is None else y.astype("int64"), test_fraction, seed
        )
    raise DatasetError(
        f"--dataset={name!r}: expected one of {', '.join(IMAGE_DATASETS)} or a path to an .npz "
        "file."
    )
