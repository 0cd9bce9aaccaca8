"""scripts/train_gan.py end to end: a few steps, samples.png, --help and one-line flag errors."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "train_gan.py")


def run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


def test_trains_a_few_steps_and_writes_samples(tmp_path):
    out = run("--steps=3", f"--log_dir={tmp_path}", "--steps_per_execution=2", "--sample_every=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out at step 3: d_adversarial" in out.stdout
    for term in ("r1", "g_adversarial", "feature_matching"):
        assert f" {term} " in out.stdout
    assert (tmp_path / "samples.png").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--steps=-5", "--steps (-5) must be a positive integer"),
        ("--weights=nosuch=1", "--weights names terms that do not exist: ['nosuch']"),
        ("--weights=r1=linear:0:1", "--weights r1=linear:0:1"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, flag, expected):
    out = run(flag, f"--log_dir={tmp_path}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_help_lists_every_flag_with_its_default():
    out = run("--help")
    assert out.returncode == 0
    for flag in (
        "--steps",
        "--batch_size",
        "--learning_rate",
        "--log_dir",
        "--seed",
        "--deterministic",
        "--dataset",
        "--weights",
        "--balancer",
        "--log_every",
        "--grad_log_every",
        "--checkpoint_every",
        "--strategy",
        "--steps_per_execution",
        "--jit_compile",
        "--mixed_precision",
        "--loss",
        "--latent_dim",
        "--width",
        "--r1_gamma",
        "--gp_weight",
        "--feature_matching",
        "--drift",
        "--discriminator_learning_rate",
        "--sample_every",
    ):
        boolean = "--[no]" + flag[2:]  # how absl shows a boolean flag
        assert flag in out.stdout or boolean in out.stdout, flag
    assert "(default: 'nonsaturating')" in out.stdout
    assert "(default: '0.1')" in out.stdout  # --r1_gamma
