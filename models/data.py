"""Datasets for the reference models: offline by default, downloads only when asked.

* `"digits"` (default): scikit-learn's bundled 8x8 handwritten digits (1,797 images), offline.
* `"mnist"`, `"fashion_mnist"`: 28x28 images through `keras.datasets` (downloaded and cached on
  first use; offline once cached).
* `"PATH.npz"`: arrays `x` (images [n, h, w] or [n, h, w, 1], or features) and optional `y`,
  loaded with `allow_pickle=False`.

Images come back as float32 in [0, 1] with a channel axis: [n, h, w, 1].

Series, for the forecasters (`load_forecast`):

* `"mackey_glass"` (default): the chaotic Mackey-Glass series (tau = 17), generated here,
  deterministically, offline.
* `"PATH.csv"`: one numeric column (or the column named by `column`), with or without a header
  row, in time order.

A series is split chronologically (the test part is the end of the series), normalised with
the training part's mean and standard deviation, and cut into windows of `window` past values,
each with the value `horizon` steps after its last one as the target.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import zipfile

import numpy as np
import tensorflow as tf

IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")
SERIES_DATASETS = ("mackey_glass",)


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
    bad = ~np.isfinite(x)
    if bad.any():  # NaN would train to NaN, and clipping would turn Inf into white pixels
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(
            f"{source}: expected finite pixel values, found {int(bad.sum())} NaN or Inf "
            f"(the first in image {first[0]}, at {list(first[1:])})."
        )
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
        # numpy's own message for a file that is no archive suggests allow_pickle, which would
        # run code from the file: never offered here.
        reason = "" if "pickle" in str(error) else f" ({str(error).splitlines()[0]})"
        raise DatasetError(
            f"{path}: not a readable .npz file{reason}; expected a zip archive of arrays, as "
            "numpy.savez writes, with an array 'x' (and optionally 'y')."
        ) from None
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


# ------------------------------------------------------------------------------------------------
# Series.


def mackey_glass(
    length: int,
    *,
    tau: float = 17.0,
    beta: float = 0.2,
    gamma: float = 0.1,
    exponent: float = 10.0,
    initial: float = 1.2,
    dt: float = 0.1,
    sample_every: float = 1.0,
    discard: float = 500.0,
) -> np.ndarray:
    """The Mackey-Glass series (Mackey & Glass 1977, "Oscillation and chaos in physiological
    control systems"), the classic benchmark of chaotic time-series prediction.

        dx/dt = beta * x(t - tau) / (1 + x(t - tau)^exponent) - gamma * x(t)

    With the standard beta = 0.2, gamma = 0.1, exponent = 10 and tau = 17 the attractor is
    chaotic (tau > 16.8). Integrated with the classical fourth-order Runge-Kutta scheme at step
    `dt`, the delayed term at half steps taken as the mean of its two neighbours on the grid;
    the history is x(t) = `initial` for t <= 0. Deterministic: same arguments, same series.

    Args:
        length: number of samples returned.
        tau: the delay; `tau / dt` must be a whole number of steps.
        beta, gamma, exponent: the equation's parameters.
        initial: the constant history x(t), t <= 0.
        dt: the integration step.
        sample_every: time between returned samples (a whole number of steps).
        discard: time integrated and dropped first, so the series starts on the attractor.

    Returns:
        float64 array [length] of x(discard + i * sample_every), i = 0..length-1.
    """
    if length <= 0:
        raise ValueError(f"`length` ({length!r}) must be a positive integer.")
    delay, every = round(tau / dt), round(sample_every / dt)
    if not (math.isclose(delay * dt, tau) and math.isclose(every * dt, sample_every)) or every < 1:
        raise ValueError(
            f"`tau` ({tau}) and `sample_every` ({sample_every}) must be whole multiples of `dt` "
            f"({dt})."
        )
    skip = round(discard / dt)
    total = skip + (length - 1) * every + 1
    x = np.empty(delay + total)
    x[: delay + 1] = initial  # x[delay] is t = 0

    def f(value, delayed):
        return beta * delayed / (1.0 + delayed**exponent) - gamma * value

    for n in range(delay, delay + total - 1):
        now, lagged, lagged_next = x[n], x[n - delay], x[n - delay + 1]
        lagged_half = 0.5 * (lagged + lagged_next)
        k1 = f(now, lagged)
        k2 = f(now + 0.5 * dt * k1, lagged_half)
        k3 = f(now + 0.5 * dt * k2, lagged_half)
        k4 = f(now + dt * k3, lagged_next)
        x[n + 1] = now + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return x[delay + skip :: every][:length].copy()


def load_csv_series(path: str, column: str | None = None) -> np.ndarray:
    """Reads one numeric column of a CSV file, in row order.

    Args:
        path: the file. A first row whose chosen cell is not a number is a header.
        column: the header name of the column to read; None: the first column.

    Returns:
        float64 array of the column's values.

    Raises:
        DatasetError: one line, for a missing or unreadable file, an unknown column, or a value
            that is empty, not a number or not finite.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"--dataset file {path!r} does not exist.")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: not a readable CSV file ({error}).") from None
    if not rows:
        raise DatasetError(f"{path}: expected a column of numbers, the file is empty.")
    header, start = [c.strip() for c in rows[0]], 0
    index = 0
    if column is not None:
        if column not in header:
            raise DatasetError(
                f"{path}: expected a header row with a column named {column!r}, found {header}."
            )
        index, start = header.index(column), 1
    elif not _is_number(header[0]):
        start = 1
    values = []
    for line, row in enumerate(rows[start:], start=start + 1):
        cell = row[index].strip() if index < len(row) else ""
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DatasetError(
                f"{path}: row {line} of column {column or index + 1}: expected a finite number, "
                f"got {cell!r}."
            )
        values.append(value)
    return np.asarray(values, np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class ForecastSplit:
    """Windows of a normalised series: x [n, window, 1] past values, y [n, 1] the target.

    `mean` and `std` are the training part's: the raw value is `y * std + mean`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float
    horizon: int


def windows(series: np.ndarray, window: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a series into (history, target) pairs.

    Pair i is x = series[i : i + window] and y = series[i + window - 1 + horizon]: the value
    `horizon` steps after the window's last one.

    Returns:
        float32 x [n, window, 1] and y [n, 1], n = len(series) - window - horizon + 1.
    """
    series = np.asarray(series, np.float32)
    n = len(series) - window - horizon + 1
    if n <= 0:
        raise ValueError(
            f"A series of {len(series)} values has no window of {window} with a target "
            f"{horizon} steps ahead."
        )
    index = np.arange(n)[:, None] + np.arange(window)[None, :]
    return series[index][..., None], series[window - 1 + horizon :][:n, None]


def load_forecast(
    name: str = "mackey_glass",
    *,
    window: int = 24,
    horizon: int = 8,
    test_fraction: float = 0.2,
    length: int = 6000,
    column: str | None = None,
) -> ForecastSplit:
    """Loads a series, splits it in time, normalises it, and cuts it into windows.

    Args:
        name: "mackey_glass" or a path to a .csv file.
        window: past values in each input.
        horizon: steps ahead of the window's last value to forecast.
        test_fraction: the final fraction of the series held out.
        length: samples of a generated series.
        column: the CSV column to read (None: the first).

    Raises:
        DatasetError: for an unknown name, an unreadable file, or a series too short to give
            windows in both parts.
    """
    if name == "mackey_glass":
        series = mackey_glass(length)
    elif name.endswith(".csv"):
        series = load_csv_series(name, column)
    else:
        raise DatasetError(
            f"--dataset={name!r}: expected one of {', '.join(SERIES_DATASETS)} or a path to a "
            ".csv file."
        )
    n_test = int(round(len(series) * test_fraction))
    needed = window + horizon  # values a part needs for one window and its target
    if n_test < needed or len(series) - n_test < 2 * needed:
        raise DatasetError(
            f"{name}: too short: {len(series)} values; windows of {window} with a target "
            f"{horizon} ahead need {needed} in the test part ({test_fraction:g} of the series) "
            f"and {2 * needed} in the training part."
        )
    train, test = series[:-n_test], series[-n_test:]
    mean, std = float(train.mean()), float(train.std())
    if not std > 0:
        raise DatasetError(f"{name}: the training part of the series is constant.")
    x_train, y_train = windows((train - mean) / std, window, horizon)
    x_test, y_test = windows((test - mean) / std, window, horizon)
    return ForecastSplit(x_train, y_train, x_test, y_test, mean, std, horizon)


def batches(arrays, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
    """A `tf.data.Dataset` of batches of `arrays` (an array, or a tuple of them).

    Training data (`shuffle=True`) is reshuffled every pass with `seed` and keeps only full
    batches, so every step sees `batch_size` examples and the step traces once; evaluation
    data keeps every example, in order.

    Raises:
        DatasetError: for training data with fewer examples than one batch (naming
            --batch_size).
    """
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        length = len(arrays[0] if isinstance(arrays, tuple) else arrays)
        if length < batch_size:
            raise DatasetError(
                f"--batch_size ({batch_size}) is larger than the training split ({length} "
                "examples): every step takes one full batch, so there is none to train on."
            )
        dataset = dataset.shuffle(length, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=shuffle).prefetch(tf.data.AUTOTUNE)
