"""scripts/benchmark.py runs end to end and reports a ratio for every contender."""

import json
import os
import subprocess
import sys

from script_checks import ROOT, checkout_env


def test_benchmark_reports_ratios(tmp_path):
    out_file = tmp_path / "bench.json"
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "benchmark.py"),
            "--steps=4",
            "--repeats=1",
            "--steps_per_execution=2",
            f"--json={out_file}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env=checkout_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_file.read_text())
    ratios = result["ratio_to_handwritten"]
    assert ratios["handwritten"] == 1.0
    assert {"keras_fit", "termwise", "termwise(steps_per_execution=2)"} <= set(ratios)
    assert all(r > 0 for r in ratios.values())
    assert "vs handwritten" in out.stdout
