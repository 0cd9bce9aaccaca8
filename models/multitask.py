"""A three-task problem on the digits, and the table that compares loss balancers on it.

The data (`load_data`): scikit-learn's bundled 8x8 digits, each image rotated by its own angle
drawn uniformly from [-`max_angle`, `max_angle`] degrees (a fixed seed: the same angles on
every run). The network sees the rotated image and has three terms, one head each on a shared
encoder (`build_multitask`):

    classification(x, y) = -log softmax(f_c(x))_y                   10 classes, per example
    reconstruction(x)    = mean_p (f_r(x)_p - x_p)^2                the rotated image itself
    rotation(x, a)       = (f_a(x) - a / max_angle)^2               the angle, scaled to [-1, 1]

held out as the `accuracy`, the per-pixel `reconstruction_mse` and the mean absolute
`angle_error` in degrees (`METRICS`).

The comparison (`run_benchmark`): every balancer (the plain sum included) trains the
network over several seeds; the same network trained on each task alone gives the
single-task baselines, and each method's mean relative drop against them (Maninis, Radosavovic
and Kokkinos 2019, "Attentive Single-Tasking of Multiple Tasks"),

    Delta_m = (100 / T) sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t    in %,
    l_t = 1 where higher is better,

so a positive Delta_m is a drop (worse than training each task alone) and a negative one a
gain. Each run's steady-state step time (the steps after its first compiled call) is set
against the plain sum's. `markdown_table` and `write_csv` write the table.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from termwise.models import data as data_lib
from termwise.trainer import NonFiniteLossError, Trainer, balancers

TASKS = ("classification", "reconstruction", "rotation")
MAX_ANGLE = 45.0  # degrees: within it a 6 stays a 6
LAST_SHARED_LAYER = "shared"  # the encoder's last layer: the input of every head
SUM = "sum"  # the plain sum of the terms (no balancer)
BASELINE = "single-task"  # the table's row of the networks trained on one task each
DATA_SEED = 0  # the split and the angles: the same data for every run and seed


class Metric(NamedTuple):
    """A held-out metric of one task.

    Attributes:
        name: its key in `evaluate`'s results and in the table.
        task: the term it measures.
        higher_is_better: l_t of Delta_m.
        label: the table's column header.
        scale: the table shows the value times this.
    """

    name: str
    task: str
    higher_is_better: bool
    label: str
    scale: float = 1.0


METRICS = (
    Metric("accuracy", "classification", True, "accuracy (%)", 100.0),
    Metric("reconstruction_mse", "reconstruction", False, "reconstruction MSE (x1e-3)", 1e3),
    Metric("angle_error", "rotation", False, "angle error (deg)"),
)


# ------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class MultiTaskData:
    """Rotated digits and their three targets.

    Attributes:
        images: [n, 8, 8, 1] float32 in [0, 1], each rotated by its angle.
        labels: [n] int64 digit classes.
        angles: [n] float32 rotation angles in degrees (counterclockwise as displayed).
    """

    images: np.ndarray
    labels: np.ndarray
    angles: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.images, self.labels, self.angles


def rotation_angles(count: int, *, seed: int, max_angle: float = MAX_ANGLE) -> np.ndarray:
    """`count` angles drawn uniformly from [-max_angle, max_angle] degrees, a function of `seed`.

    Raises:
        ValueError: for a negative `count` or a `max_angle` outside (0, 180).
    """
    if count < 0:
        raise ValueError(f"`count` ({count!r}) must be >= 0.")
    if not 0.0 < max_angle < 180.0:
        raise ValueError(f"`max_angle` ({max_angle!r}) must be in (0, 180) degrees.")
    rng = np.random.default_rng(seed)
    return rng.uniform(-max_angle, max_angle, size=count).astype(np.float32)


def rotate(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotates each image about its centre, counterclockwise as displayed (rows downward).

    Bilinear interpolation of the inverse map, zero outside the image: output pixel (r, c) at
    ``(x, y) = (c - c0, r0 - r)`` from the centre ``(r0, c0) = ((h - 1) / 2, (w - 1) / 2)``
    takes the input at ``R(-theta) (x, y)``. Quarter turns are `np.rot90` exactly.

    Args:
        images: [n, h, w] or [n, h, w, 1] floats.
        degrees: [n] angles in degrees.

    Returns:
        float32 images of the input's shape.

    Raises:
        ValueError: for images of another rank, or a count of angles that is not n.
    """
    images = np.asarray(images, np.float64)
    channel = images.ndim == 4
    if channel:
        if images.shape[-1] != 1:
            raise ValueError(f"`images` ({images.shape}) must have one channel.")
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"`images` ({images.shape}) must be [n, h, w] or [n, h, w, 1].")
    theta = np.deg2rad(np.asarray(degrees, np.float64))
    if theta.shape != (len(images),):
        raise ValueError(f"`degrees` ({theta.shape}) must hold one angle per image, {len(images)}.")
    n, h, w = images.shape
    r0, c0 = (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x, y = cols - c0, r0 - rows
    # Rounded so that a quarter turn maps pixels onto pixels exactly (cos 90 is 6e-17).
    cos = np.round(np.cos(theta), 12)[:, None, None]
    sin = np.round(np.sin(theta), 12)[:, None, None]
    x_in = cos * x + sin * y
    y_in = -sin * x + cos * y
    r_in, c_in = r0 - y_in, x_in + c0  # [n, h, w] source coordinates
    top, left = np.floor(r_in), np.floor(c_in)
    out = np.zeros((n, h, w))
    index = np.arange(n)[:, None, None]
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = top + dr, left + dc
            weight = (1.0 - np.abs(r_in - r)) * (1.0 - np.abs(c_in - c))
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            ri = np.clip(r, 0, h - 1).astype(int)
            ci = np.clip(c, 0, w - 1).astype(int)
            out += np.where(inside, weight * images[index, ri, ci], 0.0)
    out = out.astype(np.float32)
    return out[..., None] if channel else out


def load_data(
    *, seed: int = DATA_SEED, max_angle: float = MAX_ANGLE, test_fraction: float = 0.15
) -> tuple[MultiTaskData, MultiTaskData]:
    """The digits, rotated: (train, test), both functions of `seed` alone.

    The split is `termwise.models.data.load_images`'s; the angles are drawn for the whole
    dataset in its order (`rotation_angles(1797, seed=seed)`), then split with the images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    angles = rotation_angles(len(digits.images), seed=seed, max_angle=max_angle)
    images = rotate(digits.images / 16.0, angles)[..., None]
    images = np.clip(images, 0.0, 1.0)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = max(1, int(round(len(images) * test_fraction)))
    labels = digits.target.astype(np.int64)

    def part(index):
        return MultiTaskData(images[index], labels[index], angles[index])

    return part(order[n_test:]), part(order[:n_test])


# ------------------------------------------------------------------------------------------------
# The network and its Trainer.


def build_multitask(
    image_shape: tuple[int, int, int] = (8, 8, 1),
    *,
    tasks: Sequence[str] = TASKS,
    num_classes: int = 10,
    width: int = 128,
) -> keras.Model:
    """A shared encoder with one head per task: images to a dict keyed by task.

    Layers: `flatten`, `hidden` (dense `width`, ReLU), `shared` (dense `width`, ReLU: the last
    shared layer, `LAST_SHARED_LAYER`), then one dense head per task on it: `classification`
    (logits [batch, num_classes]), `reconstruction` (the image, sigmoid, [batch, *image_shape],
    through `reconstruction_pixels`) and `rotation` ([batch], the scaled angle, through
    `rotation_angle`). Linear heads keep every task's information in the shared layer.

    Raises:
        ValueError: for a task not in `TASKS`, or none.
    """
    tasks = check_tasks(tasks)
    images = keras.Input(image_shape, name="images")
    h = keras.layers.Flatten(name="flatten")(images)
    h = keras.layers.Dense(width, activation="relu", name="hidden")(h)
    h = keras.layers.Dense(width, activation="relu", name=LAST_SHARED_LAYER)(h)
    outputs = {}
    if "classification" in tasks:
        outputs["classification"] = keras.layers.Dense(num_classes, name="classification")(h)
    if "reconstruction" in tasks:
        size = int(np.prod(image_shape))
        pixels = keras.layers.Dense(size, activation="sigmoid", name="reconstruction_pixels")(h)
        outputs["reconstruction"] = keras.layers.Reshape(image_shape, name="reconstruction")(pixels)
    if "rotation" in tasks:
        angle = keras.layers.Dense(1, name="rotation_angle")(h)
        outputs["rotation"] = keras.layers.Reshape((), name="rotation")(angle)
    return keras.Model(images, outputs, name="multitask")


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks, in `TASKS` order; a `ValueError` names an unknown one (or none)."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"`tasks` ({list(tasks)}) must be distinct names from {list(TASKS)}.")
    return tuple(t for t in TASKS if t in tasks)


class MultiTaskTrainer(Trainer):
    """Trains `build_multitask`'s network: one term per task, named after it.

    Batches are `(images, labels, angles)` (`MultiTaskData.arrays`). Each task logs its
    metric beside the terms (`METRICS`): `accuracy`, `reconstruction_mse`, `angle_error`.

    Args:
        model: `build_multitask(tasks=tasks)`'s network.
        optimizer: a Keras optimizer.
        tasks: the tasks the network has heads for (and the terms trained).
        max_angle: the angles' range, which scales the rotation target to [-1, 1].
        **kwargs: as for `Trainer`.
    """

    def __init__(self, model, optimizer, *, tasks=TASKS, max_angle: float = MAX_ANGLE, **kwargs):
        self.tasks = check_tasks(tasks)
        self.max_angle = float(max_angle)
        super().__init__(model, optimizer, **kwargs)

    def compute_terms(self, batch, training):
        images, labels, angles = batch
        outputs = self.model(images, training=training)
        terms = {}
        if "classification" in self.tasks:
            logits = tf.cast(outputs["classification"], tf.float32)
            labels = tf.cast(labels, tf.int64)
            correct = tf.equal(tf.argmax(logits, axis=-1), labels)
            self.add_metric("accuracy", tf.cast(correct, tf.float32))
            terms["classification"] = keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
        if "reconstruction" in self.tasks:
            pixels = tf.cast(outputs["reconstruction"], tf.float32)
            squared = tf.reduce_mean(tf.square(pixels - images), axis=[1, 2, 3])
            self.add_metric("reconstruction_mse", squared)
            terms["reconstruction"] = squared
        if "rotation" in self.tasks:
            predicted = tf.cast(outputs["rotation"], tf.float32)
            target = tf.cast(angles, tf.float32) / self.max_angle
            self.add_metric("angle_error", tf.abs(predicted - target) * self.max_angle)
            terms["rotation"] = tf.square(predicted - target)
        return terms


# ------------------------------------------------------------------------------------------------
# One run.


class RunResult(NamedTuple):
    """What one training run gives the table.

    Attributes:
        metrics: the held-out metrics of its tasks (`Metric.name` to value).
        step_seconds: the mean wall time of a training step after the first compiled call.
    """

    metrics: dict[str, float]
    step_seconds: float


def train_and_evaluate(
    balancer: str | balancers.Balancer | None,
    *,
    train: MultiTaskData,
    test: MultiTaskData,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    steps_per_execution: int = 100,
) -> RunResult:
    """Trains the network on `tasks` with `balancer` for `steps` steps; evaluates it on `test`.

    The seed sets the initial weights and the data order. No files are written, nothing is
    logged but the last step of each `fit` (`log_every=0`, `grad_log_every=0`), and the
    Trainer's progress lines are not shown. The step time is that of the steps after the first
    compiled call (which traces the step).

    Raises:
        ValueError: for an unknown balancer or task, or a `steps` below 2 * steps_per_execution.
        NonFiniteLossError: when a term or the update stops being finite (or a balancer's
            precondition breaks).
    """
    tasks = check_tasks(tasks)
    if steps < 2 * steps_per_execution:
        raise ValueError(
            f"`steps` ({steps}) must be at least 2 x steps_per_execution ({steps_per_execution}): "
            "the first compiled call is not timed."
        )
    keras.utils.set_random_seed(seed)
    model = build_multitask(train.images.shape[1:], tasks=tasks)
    trainer = MultiTaskTrainer(
        model,
        keras.optimizers.Adam(learning_rate),
        tasks=tasks,
        balancer=balancer,
        log_every=0,
        grad_log_every=0,
        steps_per_execution=steps_per_execution,
        progress=False,
        seed=seed,
    )
    data = data_lib.batches(train.arrays(), batch_size, shuffle=True, seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's line at the end of a fit
        trainer.fit(data, steps=steps_per_execution)
        start = time.perf_counter()
        trainer.fit(data, until_step=steps)
        seconds = (time.perf_counter() - start) / (steps - steps_per_execution)
    results = trainer.evaluate(data_lib.batches(test.arrays(), 512, shuffle=False, seed=0))
    metrics = {m.name: float(results[m.name]) for m in METRICS if m.task in tasks}
    return RunResult(metrics, seconds)


# ------------------------------------------------------------------------------------------------
# The comparison.


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float]) -> float:
    """The mean relative drop against the single-task baselines, in % (Maninis et al. 2019).

    ``Delta_m = (100 / T) sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t`` over the metrics
    of `METRICS`, ``l_t = 1`` where higher is better: positive is worse than single-task.

    Args:
        metrics: `Metric.name` to the method's value, for every metric of `METRICS`.
        baselines: the same names to the single-task values (nonzero).

    Raises:
        ValueError: for a missing metric or a zero baseline.
    """
    total = 0.0
    for metric in METRICS:
        if metric.name not in metrics or metric.name not in baselines:
            raise ValueError(f"`metrics` and `baselines` must both hold {metric.name!r}.")
        base = baselines[metric.name]
        if base == 0:
            raise ValueError(f"`baselines` {metric.name!r} is 0: no relative drop.")
        sign = -1.0 if metric.higher_is_better else 1.0
        total += sign * (metrics[metric.name] - base) / base
    return 100.0 * total / len(METRICS)


def balancer_names() -> tuple[str, ...]:
    """`SUM` (the plain sum), then every balancer `balancers.parse` knows, by name."""
    return (SUM, *(form.split("[")[0] for form in balancers.FORMS if form != "none"))


def make_balancer(spec: str) -> balancers.Balancer | None:
    """The balancer of a method: `balancers.parse(spec)`, None for `SUM`.

    Raises:
        ValueError: from `balancers.parse`, for a spec it does not accept.
    """
    return None if spec == SUM else balancers.parse(spec)


def plan(specs: Sequence[str], *, layer: str | None = LAST_SHARED_LAYER) -> list[str]:
    """The methods to run: `specs`, each gradient-based one followed by its `@layer=` variant.

    A gradient-based spec that already names a target (``mgda@layer=hidden``,
    ``gradnorm:1.5:0.025:shared``) gets no variant, nor does one that takes no target
    (`needs_stacks`: DB-MTL); `layer` None or "" adds none.

    Raises:
        ValueError: naming the spec, for one `balancers.parse` refuses, a repeated one, one
            (or `layer`) naming a layer `build_multitask`'s network does not have, or specs
            without `SUM` (the step times are relative to it).
    """
    layers = [item.name for item in build_multitask().layers]
    if layer and layer not in layers:
        raise ValueError(f"`layer` ({layer!r}) must be a layer of the network: {layers}.")
    methods = []
    for spec in specs:
        try:
            balancer = make_balancer(spec)
        except ValueError as error:
            raise ValueError(f"{spec!r}: {error}") from None
        for name in (getattr(balancer, "layer", None), getattr(balancer, "representation", None)):
            if name is not None and name not in layers:
                raise ValueError(f"{spec!r} names layer {name!r}; the network has {layers}.")
        methods.append(spec)
        untargeted = balancer is not None and balancer.layer is None
        untargeted = untargeted and balancer.representation is None
        if layer and untargeted and balancer.needs_gradients and not balancer.needs_stacks:
            methods.append(f"{spec}@layer={layer}")
    if SUM not in methods:
        raise ValueError(f"{list(specs)} must include {SUM!r}, the plain sum: times are relative.")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"{list(specs)} names {repeated} twice.")
    return methods


def baseline_method(task: str) -> str:
    """The method name of the single-task runs of `task` (`BASELINE/<task>`)."""
    return f"{BASELINE}/{task}"


class Run(NamedTuple):
    """One run: its method (a balancer spec, `SUM`, or `baseline_method(task)`) and seed.

    Attributes:
        result: what it gave; None when it failed.
        error: None, or the failure in one line: the error's type and its first line (a
            `NonFiniteLossError` names the term and the step).
    """

    method: str
    seed: int
    result: RunResult | None
    error: str | None = None


# Failures of one run that the table reports instead of stopping the whole comparison: a term
# or update that stopped being finite, a balancer's precondition, a failed op.
RUN_ERRORS = (NonFiniteLossError, tf.errors.OpError, ArithmeticError)


def run_benchmark(
    methods: Sequence[str],
    *,
    seeds: Sequence[int],
    steps: int,
    train: MultiTaskData,
    test: MultiTaskData,
    report: Callable[[str], None] = print,
    **options,
) -> list[Run]:
    """Runs the single-task baselines, then every method of `methods`, for each seed.

    The loop goes seed by seed (every method of a seed, then the next), so that a change of
    the machine's load during the run reaches every method alike. Each run passes one line to
    `report` (its method, seed, metrics, step time and wall time, or its error). A run that
    fails with one of `RUN_ERRORS` is recorded with its error, and the others go on.

    Args:
        methods: `plan`'s methods.
        seeds: training seeds (initial weights and data order; the data are the same).
        steps: training steps of every run.
        train, test: `load_data`'s.
        report: receives each run's line.
        **options: more `train_and_evaluate` options (batch_size, learning_rate, ...).

    Returns:
        The runs, in the order they ran.

    Raises:
        ValueError: for no seeds, or a method `make_balancer` refuses.
    """
    if not seeds:
        raise ValueError("`seeds` must name at least one seed.")
    for method in methods:
        make_balancer(method)
    everything = [baseline_method(t) for t in TASKS] + list(methods)
    runs: list[Run] = []
    total = len(everything) * len(seeds)
    for seed in seeds:
        for method in everything:
            if method.startswith(BASELINE):
                tasks, balancer = (method.split("/", 1)[1],), None
            else:
                tasks, balancer = TASKS, make_balancer(method)
            start = time.perf_counter()
            try:
                result = train_and_evaluate(
                    balancer, train=train, test=test, tasks=tasks, seed=seed, steps=steps, **options
                )
            except RUN_ERRORS as error:
                first = str(error).splitlines()[0] if str(error) else ""
                runs.append(Run(method, seed, None, f"{type(error).__name__}: {first}"))
                shown = f"FAILED {runs[-1].error}"
            else:
                runs.append(Run(method, seed, result))
                shown = " ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
                shown += f" step={1e3 * result.step_seconds:.2f}ms"
            wall = time.perf_counter() - start
            report(f"[{len(runs)}/{total}] {method} seed={seed}: {shown} ({wall:.1f}s)")
    return runs


class Row(NamedTuple):
    """One row of the table: a method's metrics over seeds, its Delta_m and its step time.

    Attributes:
        method: the balancer spec (`SUM` for none), or `BASELINE`.
        seeds: the seeds that finished.
        means, spreads: `Metric.name` to the mean and the sample standard deviation over
            those seeds (NaN when none finished).
        delta_m, delta_m_spread: `delta_m` of the means, which is also the mean of the seeds'
            Delta_m against the baselines' means (Delta_m is linear in the metrics), and the
            sample standard deviation of the seeds' Delta_m. 0 for `BASELINE`.
        step_ratio: the median step time over the plain sum's (`BASELINE`: the three
            single-task networks' medians together, what training them one by one costs).
        step_ms: the median step time in milliseconds (`BASELINE`: the three's sum).
        failures: one line per failed seed, ``seed N: <error>``.
    """

    method: str
    seeds: int
    means: dict[str, float]
    spreads: dict[str, float]
    delta_m: float
    delta_m_spread: float
    step_ratio: float
    step_ms: float
    failures: tuple[str, ...] = ()


def _spread(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _median_seconds(results: Sequence[RunResult]) -> float:
    return statistics.median(r.step_seconds for r in results) if results else math.nan


def summarize(runs: Sequence[Run]) -> list[Row]:
    """The table's rows: `BASELINE` first, then each method in the order it first ran.

    Raises:
        ValueError: when a task's baseline or the plain sum has no finished run.
    """
    finished: dict[str, list[RunResult]] = {}
    failures: dict[str, list[str]] = {}
    for run in runs:
        finished.setdefault(run.method, [])
        failures.setdefault(run.method, [])
        if run.result is None:
            failures[run.method].append(f"seed {run.seed}: {run.error}")
        else:
            finished[run.method].append(run.result)
    needed = [*map(baseline_method, TASKS), SUM]
    missing = [m for m in needed if not finished.get(m)]
    if missing:
        raise ValueError(f"`runs` has no finished run of {missing}; no table without them.")
    sum_seconds = _median_seconds(finished[SUM])
    means, spreads, seconds, seeds, baseline_failures = {}, {}, 0.0, [], []
    for metric in METRICS:
        method = baseline_method(metric.task)
        values = [r.metrics[metric.name] for r in finished[method]]
        means[metric.name], spreads[metric.name] = _mean(values), _spread(values)
        seconds += _median_seconds(finished[method])
        seeds.append(len(values))
        baseline_failures += [f"{metric.task} {line}" for line in failures[method]]
    rows = [
        Row(
            BASELINE,
            min(seeds),
            means,
            spreads,
            0.0,
            0.0,
            seconds / sum_seconds,
            1e3 * seconds,
            tuple(baseline_failures),
        )
    ]
    for method, results in finished.items():
        if method.startswith(BASELINE):
            continue
        values = {m.name: [r.metrics[m.name] for r in results] for m in METRICS}
        drops = [delta_m(r.metrics, means) for r in results]
        median = _median_seconds(results)
        rows.append(
            Row(
                method,
                len(results),
                {k: _mean(v) for k, v in values.items()},
                {k: _spread(v) for k, v in values.items()},
                _mean(drops),
                _spread(drops),
                median / sum_seconds,
                1e3 * median,
                tuple(failures[method]),
            )
        )
    return rows


CSV_COLUMNS = (
    "method",
    "seeds",
    *(f"{m.name}_{part}" for m in METRICS for part in ("mean", "std")),
    "delta_m_mean",
    "delta_m_std",
    "step_time_ratio",
    "step_ms",
    "failures",
)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """Writes the rows to `path` (`CSV_COLUMNS`): metrics unscaled, at full precision."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            numbers = [v for m in METRICS for v in (row.means[m.name], row.spreads[m.name])]
            numbers += [row.delta_m, row.delta_m_spread, row.step_ratio, row.step_ms]
            writer.writerow([row.method, row.seeds, *map(repr, numbers), "; ".join(row.failures)])


def _cell(mean: float, spread: float, digits: int) -> str:
    if math.isnan(mean):
        return "failed"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def markdown_table(rows: Sequence[Row], *, notes: Sequence[str] = ()) -> str:
    """The rows as Markdown: each cell mean ± sample standard deviation over the seeds.

    Args:
        rows: `summarize`'s.
        notes: lines written before the table (the command, the machine, ...).

    Returns:
        The notes, the table (columns: the method, each task's metric as `Metric.label`
        says, Delta_m in %, the step time over the plain sum's), and a line per failed run.
    """
    header = ["method", *(f"{m.task}: {m.label}" for m in METRICS), "Δm (%)", "step time (× sum)"]
    lines = [*notes, *([""] if notes else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.method if row.method == BASELINE else f"`{row.method}`"]
        for metric in METRICS:
            mean, spread = row.means[metric.name], row.spreads[metric.name]
            cells.append(_cell(mean * metric.scale, spread * metric.scale, 2))
        cells.append(_cell(row.delta_m, row.delta_m_spread, 2))
        cells.append("—" if math.isnan(row.step_ratio) else f"{row.step_ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(row.method, line) for row in rows for line in row.failures]
    if failed:
        lines += ["", "Failed runs (not in the means):", ""]
        lines += [f"* `{method}` {line}" for method, line in failed]
    return "\n".join(lines) + "\n"


__all__ = [
    "BASELINE",
    "CSV_COLUMNS",
    "LAST_SHARED_LAYER",
    "MAX_ANGLE",
    "METRICS",
    "RUN_ERRORS",
    "SUM",
    "TASKS",
    "Metric",
    "MultiTaskData",
    "MultiTaskTrainer",
    "Row",
    "Run",
    "RunResult",
    "balancer_names",
    "baseline_method",
    "build_multitask",
    "check_tasks",
    "delta_m",
    "load_data",
    "make_balancer",
    "markdown_table",
    "plan",
    "rotate",
    "rotation_angles",
    "run_benchmark",
    "summarize",
    "train_and_evaluate",
    "write_csv",
]
