"""The multi-task digits problem: its data, terms, Delta_m, and the balancer table's rows."""

import csv
import math
import statistics

import keras
import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import scipy.stats
from sklearn.datasets import load_digits

from termwise.models import multitask as mt
from termwise.trainer import balancers

# ------------------------------------------------------------------------------------------------
# Data.


def test_angles_are_uniform_in_the_range_and_a_function_of_the_seed():
    angles = mt.rotation_angles(20000, seed=3, max_angle=30.0)
    assert angles.dtype == np.float32 and angles.shape == (20000,)
    assert angles.min() >= -30.0 and angles.max() <= 30.0
    assert scipy.stats.kstest(angles, scipy.stats.uniform(-30.0, 60.0).cdf).pvalue > 1e-3
    assert np.array_equal(angles, mt.rotation_angles(20000, seed=3, max_angle=30.0))
    assert not np.array_equal(angles, mt.rotation_angles(20000, seed=4, max_angle=30.0))
    for bad in (0.0, 180.0, -5.0):
        with pytest.raises(ValueError, match="max_angle"):
            mt.rotation_angles(3, seed=0, max_angle=bad)


def test_a_quarter_turn_is_rot90_and_zero_is_the_identity():
    images = load_digits().images[:5].astype(np.float32) / 16.0  # exact in float32
    turns = mt.rotate(images, np.array([90.0, -90.0, 180.0, 0.0, 360.0]))
    assert np.array_equal(turns[0], np.rot90(images[0], 1))  # counterclockwise as displayed
    assert np.array_equal(turns[1], np.rot90(images[1], -1))
    assert np.array_equal(turns[2], np.rot90(images[2], 2))
    assert np.array_equal(turns[3], images[3])
    assert np.array_equal(turns[4], images[4])


def test_rotation_is_scipys_bilinear_rotation_with_zeros_outside():
    rng = np.random.default_rng(0)
    images = rng.random((6, 8, 8))
    degrees = np.array([30.0, -17.3, 44.0, -45.0, 5.5, 123.0])
    rotated = mt.rotate(images[..., None], degrees)
    assert rotated.shape == (6, 8, 8, 1) and rotated.dtype == np.float32
    for image, angle, ours in zip(images, degrees, rotated[..., 0], strict=True):
        expected = scipy.ndimage.rotate(
            image, angle, reshape=False, order=1, mode="grid-constant", cval=0.0, prefilter=False
        )
        np.testing.assert_allclose(ours, expected, atol=1e-6)
    with pytest.raises(ValueError, match="degrees"):
        mt.rotate(images, degrees[:2])
    with pytest.raises(ValueError, match="images"):
        mt.rotate(images[0], degrees[:1])


def test_data_are_the_digits_each_rotated_by_its_angle():
    train, test = mt.load_data()
    again_train, again_test = mt.load_data()
    for a, b in ((train, again_train), (test, again_test)):
        for x, y in zip(a.arrays(), b.arrays(), strict=True):
            assert np.array_equal(x, y)
    digits = load_digits()
    assert len(train.labels) + len(test.labels) == len(digits.target)
    assert len(test.labels) == round(0.15 * len(digits.target))
    labels = np.concatenate([train.labels, test.labels])
    assert np.array_equal(np.sort(labels), np.sort(digits.target))
    angles = np.concatenate([train.angles, test.angles])
    drawn = mt.rotation_angles(len(digits.target), seed=mt.DATA_SEED)
    assert np.array_equal(np.sort(angles), np.sort(drawn))
    assert train.images.shape == (len(train.labels), 8, 8, 1)
    assert train.images.min() >= 0.0 and train.images.max() <= 1.0
    # Each held-out image is some digit of its label rotated by its angle (found by scipy).
    originals = digits.images / 16.0
    for k in range(4):
        angle, image = float(test.angles[k]), test.images[k, ..., 0]
        candidates = originals[digits.target == test.labels[k]]
        errors = [
            np.abs(
                scipy.ndimage.rotate(
                    o, angle, reshape=False, order=1, mode="grid-constant", prefilter=False
                ).clip(0, 1)
                - image
            ).max()
            for o in candidates
        ]
        assert min(errors) < 1e-5, (k, min(errors))


# ------------------------------------------------------------------------------------------------
# The network and its terms.


def test_the_network_has_a_head_per_task_on_the_shared_layer():
    model = mt.build_multitask()
    outputs = model(np.zeros((2, 8, 8, 1), np.float32))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "classification": (2, 10),
        "reconstruction": (2, 8, 8, 1),
        "rotation": (2,),
    }
    assert mt.LAST_SHARED_LAYER in [layer.name for layer in model.layers]
    single = mt.build_multitask(tasks=["rotation"])
    assert list(single(np.zeros((1, 8, 8, 1), np.float32))) == ["rotation"]
    for bad in ([], ["depth"], ["rotation", "rotation"]):
        with pytest.raises(ValueError, match="tasks"):
            mt.build_multitask(tasks=bad)


def test_terms_and_metrics_match_numpy():
    train, _ = mt.load_data()
    model = mt.build_multitask()
    trainer = mt.MultiTaskTrainer(model, keras.optimizers.Adam(1e-3), progress=False)
    images, labels, angles = (a[:50] for a in train.arrays())
    results = trainer.evaluate((images, labels, angles), batch_size=16)
    out = {k: np.asarray(v, np.float64) for k, v in model(images).items()}
    logits = out["classification"]
    cross_entropy = scipy.special.logsumexp(logits, axis=1) - logits[np.arange(50), labels]
    squared = ((out["reconstruction"] - images) ** 2).mean(axis=(1, 2, 3))
    scaled = angles / mt.MAX_ANGLE
    expected = {
        "classification": cross_entropy.mean(),
        "reconstruction": squared.mean(),
        "rotation": ((out["rotation"] - scaled) ** 2).mean(),
        "accuracy": (logits.argmax(axis=1) == labels).mean(),
        "reconstruction_mse": squared.mean(),
        "angle_error": np.abs(out["rotation"] * mt.MAX_ANGLE - angles).mean(),
    }
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_a_run_is_deterministic_and_times_its_steps():
    train, test = mt.load_data()
    small = mt.MultiTaskData(*(a[:256] for a in train.arrays()))
    kwargs = dict(train=small, test=test, steps=8, steps_per_execution=4, seed=1)
    first = mt.train_and_evaluate("pcgrad", **kwargs)
    second = mt.train_and_evaluate("pcgrad", **kwargs)
    assert list(first.metrics) == [m.name for m in mt.METRICS]
    assert np.array_equal(list(first.metrics.values()), list(second.metrics.values()))
    assert first.step_seconds > 0
    single = mt.train_and_evaluate(None, tasks=["reconstruction"], **kwargs)
    assert list(single.metrics) == ["reconstruction_mse"]
    with pytest.raises(ValueError, match="steps"):
        mt.train_and_evaluate(None, train=small, test=test, steps=7, steps_per_execution=4)


# ------------------------------------------------------------------------------------------------
# Delta_m and the table.


def test_delta_m_by_hand():
    metrics = {"accuracy": 0.9, "reconstruction_mse": 0.02, "angle_error": 5.0}
    baselines = {"accuracy": 0.95, "reconstruction_mse": 0.01, "angle_error": 4.0}
    # (100 / 3) * (-(0.9 - 0.95) / 0.95 + (0.02 - 0.01) / 0.01 + (5 - 4) / 4)
    #   = (100 / 3) * (1 / 19 + 1 + 1 / 4) = (100 / 3) * (99 / 76) = 43.42105263...
    assert mt.delta_m(metrics, baselines) == pytest.approx(9900 / 228, rel=1e-12)
    assert mt.delta_m(baselines, baselines) == 0.0
    better = {"accuracy": 0.96, "reconstruction_mse": 0.005, "angle_error": 3.0}
    assert mt.delta_m(better, baselines) < 0  # a gain is negative
    with pytest.raises(ValueError, match="angle_error"):
        mt.delta_m({"accuracy": 0.9, "reconstruction_mse": 0.02}, baselines)
    with pytest.raises(ValueError, match="accuracy"):
        mt.delta_m(metrics, dict(baselines, accuracy=0.0))


def test_every_balancer_is_compared_and_gradient_ones_also_on_the_last_shared_layer():
    names = mt.balancer_names()
    assert names[0] == mt.SUM
    assert {n for n in names[1:]} == {f.split("[")[0] for f in balancers.FORMS} - {"none"}
    methods = mt.plan(names)
    for name in names[1:]:
        balancer = balancers.parse(name)
        targeted = balancer.needs_gradients and not balancer.needs_stacks
        assert (f"{name}@layer=shared" in methods) == targeted, name
        if targeted:
            assert methods[methods.index(name) + 1] == f"{name}@layer=shared"
    assert "pcgrad@layer=shared" in methods and "ema@layer=shared" not in methods
    assert "db_mtl" in methods and "db_mtl@layer=shared" not in methods

    assert mt.plan(["sum", "mgda@layer=hidden", "gradnorm:1.5:0.025:shared"]) == [
        "sum",
        "mgda@layer=hidden",
        "gradnorm:1.5:0.025:shared",
    ]
    assert mt.plan(["sum", "pcgrad"], layer=None) == ["sum", "pcgrad"]
    with pytest.raises(ValueError, match="'sum'"):
        mt.plan(["pcgrad"])
    with pytest.raises(ValueError, match="twice"):
        mt.plan(["sum", "pcgrad", "pcgrad"])
    with pytest.raises(ValueError, match="'nope'"):
        mt.plan(["sum", "nope"])
    with pytest.raises(ValueError, match="'hiden'"):
        mt.plan(["sum", "mgda@layer=hiden"])
    with pytest.raises(ValueError, match="`layer`"):
        mt.plan(["sum", "pcgrad"], layer="encoder")
    for method in methods:  # every variant is a balancer string the Trainer accepts
        assert method == mt.SUM or mt.make_balancer(method) is not None


def test_db_mtl_refuses_a_target_layer_it_would_ignore():
    # Its update is made of the full per-term gradients, never of the Gramian: the benchmark
    # trained db_mtl@layer=shared to the same numbers as db_mtl on every seed.
    for spec in ("db_mtl@layer=shared", "db_mtl@representation=shared"):
        with pytest.raises(ValueError, match="db_mtl.*averages the parameters' gradients"):
            balancers.parse(spec)
    with pytest.raises(ValueError, match="layer"):
        balancers.DBMTL().target(layer="shared")


def _runs():
    """Runs with made-up results: three seeds of each baseline, the sum and PCGrad."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(3):
        for task, metric in zip(mt.TASKS, mt.METRICS, strict=True):
            value = float(rng.uniform(0.5, 1.0))
            runs.append(Run(mt.baseline_method(task), seed, {metric.name: value}, 1e-3))
        for method, seconds in (("sum", 2e-3 + seed * 1e-4), ("pcgrad", 5e-3)):
            metrics = {m.name: float(rng.uniform(0.5, 1.0)) for m in mt.METRICS}
            runs.append(Run(method, seed, metrics, seconds))
    runs.append(mt.Run("pcgrad", 3, None, "NonFiniteLossError: term 'rotation' at step 7"))
    return runs


def Run(method, seed, metrics, seconds):  # noqa: N802 (a Run with a result)
    return mt.Run(method, seed, mt.RunResult(metrics, seconds))


def test_rows_are_means_and_spreads_over_seeds_with_delta_m_of_the_means(tmp_path):
    runs = _runs()
    rows = mt.summarize(runs)
    assert [r.method for r in rows] == [mt.BASELINE, "sum", "pcgrad"]
    baseline, plain, pcgrad = rows
    for metric in mt.METRICS:
        values = [r.result.metrics[metric.name] for r in runs[:-1] if metric.task in r.method]
        assert baseline.means[metric.name] == pytest.approx(np.mean(values), rel=1e-12)
        assert baseline.spreads[metric.name] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert baseline.delta_m == 0.0 and baseline.step_ratio == pytest.approx(3e-3 / 2.1e-3)
    finished = [r for r in runs if r.method == "pcgrad" and r.result is not None]
    drops = [mt.delta_m(r.result.metrics, baseline.means) for r in finished]
    assert pcgrad.seeds == 3 and pcgrad.failures == (
        "seed 3: NonFiniteLossError: term 'rotation' at step 7",
    )
    assert pcgrad.delta_m == pytest.approx(mt.delta_m(pcgrad.means, baseline.means), rel=1e-9)
    assert pcgrad.delta_m_spread == pytest.approx(statistics.stdev(drops), rel=1e-12)
    assert plain.step_ratio == 1.0 and pcgrad.step_ratio == pytest.approx(5e-3 / 2.1e-3)

    path = tmp_path / "table.csv"
    mt.write_csv(rows, str(path))
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == mt.CSV_COLUMNS
    assert float(read[2]["delta_m_mean"]) == pcgrad.delta_m  # full precision
    assert read[2]["failures"] == pcgrad.failures[0]
    table = mt.markdown_table(rows, notes=["a note"])
    assert table.startswith("a note\n\n| method |")
    assert "| `pcgrad` |" in table and "* `pcgrad` seed 3: NonFiniteLossError" in table
    cells = [c.strip() for c in table.splitlines()[6].split("|")[1:-1]]  # the pcgrad row
    mean, spread = 100 * pcgrad.means["accuracy"], 100 * pcgrad.spreads["accuracy"]
    assert cells[1] == f"{mean:.2f} ± {spread:.2f}"

    with pytest.raises(ValueError, match="sum"):
        mt.summarize([r for r in runs if r.method != "sum"])


def test_a_method_whose_every_seed_failed_shows_as_failed():
    runs = [r for r in _runs() if r.method != "pcgrad"]
    runs.append(mt.Run("mgda", 0, None, "NonFiniteLossError: boom"))
    rows = mt.summarize(runs)
    assert rows[-1].method == "mgda" and rows[-1].seeds == 0
    assert all(math.isnan(v) for v in rows[-1].means.values())
    assert "| `mgda` | failed | failed | failed | failed |" in mt.markdown_table(rows)
