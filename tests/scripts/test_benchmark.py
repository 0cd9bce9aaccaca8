"""scripts/benchmark.py runs end to end (--quick) and reports every contender of every model.

The four models are split over two runs that go at once (each pays a TensorFlow import and its
contenders' tracing; together they use both cores), and a third run measures one contender's
start-up alone, as the full benchmark does in a fresh subprocess per contender.
"""

import json
import math

from script_checks import run_script

CONTENDERS = (
    "trainer_defaults",
    "trainer_logging",
    "trainer_quiet",
    "fit_defaults",
    "fit_spe",
    "handwritten",
    "folded",
)
TERM_CONTENDERS = ("plain", "diagnostic", "pcgrad", "mgda")


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_reports_every_contender(tmp_path):
    runs = {
        "vae,lstm": ("2", tmp_path / "a"),
        "cnn,gan": ("", tmp_path / "b"),
    }
    argvs = [
        [
            "--quick",
            f"--models={models}",
            f"--terms={terms}",
            f"--json={out}.json",
            f"--markdown={out}.md",
        ]
        for models, (terms, out) in runs.items()
    ]
    *outs, startup = run_script(
        "benchmark", *argvs, ["--quick", "--startup=vae/handwritten"], timeout=600
    )
    for out in (*outs, startup):
        assert out.returncode == 0, (out.args, out.stderr[-3000:])

    for (models, (terms, prefix)), out in zip(runs.items(), outs, strict=True):
        result = json.loads(prefix.with_suffix(".json").read_text())
        assert result["machine"]["cpus"] >= 1 and result["machine"]["tensorflow"]
        assert result["settings"]["quick"] and not result["settings"]["isolate"]
        assert list(result["models"]) == models.split(",")
        for name, model in result["models"].items():
            assert set(model["contenders"]) == set(CONTENDERS), name
            for contender, c in model["contenders"].items():
                for key in (
                    "steps_per_sec",
                    "ratio_to_handwritten",
                    "ratio_to_folded",
                    "time_to_first_step_s",
                    "first_steps_s",
                    "first_steps_vs_steady",
                ):
                    assert _positive(c[key]), (name, contender, key, c[key])
            assert model["contenders"]["handwritten"]["ratio_to_handwritten"] == 1.0
            assert model["contenders"]["folded"]["ratio_to_folded"] == 1.0
            assert f"[{name}] repeat 1/1" in out.stdout  # progress lines while it runs
        targets = {(t["model"], t["target"]) for t in result["targets"]}
        assert {m for m, _ in targets} == set(models.split(","))
        text = prefix.with_suffix(".md").read_text()
        assert "Machine:" in text and "## Targets" in text
        for name in models.split(","):
            assert f"## {name}:" in text
        if terms:
            assert list(result["terms"]) == terms.split(",")
            for count, row in result["terms"].items():
                assert set(row["steps_per_sec"]) == set(TERM_CONTENDERS), count
                assert all(_positive(v) for v in row["steps_per_sec"].values()), row
                assert row["cost_in_plain_steps"]["plain"] == 1.0
            assert "## Cost as the number of terms grows" in text
            assert "| 2 |" in text
        else:
            assert result["terms"] == {}
            assert "Cost as the number of terms grows" not in text

    lines = [line for line in startup.stdout.splitlines() if line.startswith("STARTUP_JSON ")]
    assert len(lines) == 1, startup.stdout[-2000:]
    measured = json.loads(lines[0].removeprefix("STARTUP_JSON "))
    assert measured["isolated"] and measured["first_steps"] == 5
    assert _positive(measured["time_to_first_step_s"]) and _positive(measured["peak_rss_mb"])
    assert measured["peak_rss_mb"] >= measured["rss_before_first_call_mb"]


def test_ratios_pair_the_contenders_of_each_repeat():
    # The ratio of the two medians mixed a fast repeat of one with a slow repeat of the other.
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark_under_test", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rates = {"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 3.0]}  # per repeat: 2, 3 and 1
    assert benchmark.paired_ratio(rates, "a", "b") == 2.0  # the medians' ratio is 3 / 2
