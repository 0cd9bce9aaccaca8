"""scripts/benchmark_balancers.py runs end to end (--quick) and writes the whole table.

One quick run covers each kind of method the table has: the plain sum, a loss-based balancer
(FAMO), a gradient-based one (PCGrad) and its `@layer=shared` variant, and the single-task
baselines; every balancer string itself is trained by the balancers' own tests, and
tests/models/test_multitask.py checks that the default plan holds every one of them.
"""

import csv
import math

import pytest
from script_checks import run_script

from termwise.models import multitask

TASK_METRICS = {"classification": "accuracy", "reconstruction": "reconstruction_mse"}
TASK_METRICS["rotation"] = "angle_error"
HIGHER_IS_BETTER = {"accuracy": True, "reconstruction_mse": False, "angle_error": False}
METHODS = ("sum", "famo", "pcgrad", "pcgrad@layer=shared")


def _markdown_rows(text):
    """The table's rows as {method: [cells]} (the method without its backquotes)."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows[cells[0].strip("`")] = cells
    return header, rows


def _delta_m(row, baseline):
    """Delta_m from the CSV's own columns (Maninis et al. 2019), in %."""
    total = 0.0
    for metric, higher in HIGHER_IS_BETTER.items():
        mean, base = float(row[f"{metric}_mean"]), float(baseline[f"{metric}_mean"])
        total += (-1.0 if higher else 1.0) * (mean - base) / base
    return 100.0 * total / len(HIGHER_IS_BETTER)


def test_quick_run_writes_every_method_and_task_with_delta_m_from_the_columns(tmp_path):
    (out,) = run_script(
        "benchmark_balancers",
        ["--quick", "--balancers=sum,famo,pcgrad", f"--out_dir={tmp_path}"],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = 3 + len(METHODS)  # the single-task baselines, then each method, one seed
    progress = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == runs, out.stdout[-3000:]
    assert all(f"/{runs}] " in line for line in progress)
    assert "retracing" not in out.stderr
    with open(tmp_path / "balancers.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == [multitask.BASELINE, *METHODS]
    baseline = rows[multitask.BASELINE]
    for method, row in rows.items():
        numbers = {k: float(v) for k, v in row.items() if k not in ("method", "failures")}
        assert all(math.isfinite(v) for v in numbers.values()), (method, row)
        assert row["failures"] == "" and row["seeds"] == "1", (method, row)
        expected = 0.0 if method == multitask.BASELINE else _delta_m(row, baseline)
        assert float(row["delta_m_mean"]) == pytest.approx(expected, rel=1e-9, abs=1e-9), method
    assert float(rows["sum"]["step_time_ratio"]) == 1.0

    header, table = _markdown_rows((tmp_path / "balancers.md").read_text())
    for task in TASK_METRICS:
        assert any(cell.startswith(f"{task}:") for cell in header), (task, header)
    assert "Δm (%)" in header and "step time (× sum)" in header
    assert list(table) == list(rows)
    for method, cells in table.items():
        delta = float(cells[header.index("Δm (%)")].split(" ± ")[0])
        assert abs(delta - float(rows[method]["delta_m_mean"])) <= 0.005 + 1e-9, method
        accuracy = float(cells[1].split(" ± ")[0])
        assert abs(accuracy - 100 * float(rows[method]["accuracy_mean"])) <= 0.005 + 1e-9


def test_bad_flags_are_one_line_errors_and_help_lists_the_flags(tmp_path):
    # One subprocess per kind of check (each pays a TensorFlow import); plan's own checks
    # (a repeated method, no plain sum, an unknown layer in a spec) are unit-tested.
    bad = {
        "--balancers=sum,nope": "--balancers",
        "--seeds=0,x": "--seeds",
        "--layer=nope": "--layer",
    }
    *outs, help_out = run_script(
        "benchmark_balancers",
        *([flag, f"--out_dir={tmp_path / str(i)}"] for i, flag in enumerate(bad)),
        ["--help"],
    )
    for (flag, expected), out in zip(bad.items(), outs, strict=True):
        assert out.returncode == 2, (flag, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (flag, out.stderr[-2000:])
    assert not any((tmp_path / str(i)).exists() for i in range(len(bad)))
    assert help_out.returncode == 0, help_out.stderr[-2000:]
    for flag in ("balancers", "seeds", "steps", "out_dir", "markdown", "csv", "quick", "layer"):
        assert f"--{flag}" in help_out.stdout, flag
