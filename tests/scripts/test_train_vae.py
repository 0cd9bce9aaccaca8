"""scripts/train_vae.py end to end: a few steps, resume, --help and one-line flag errors."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "train_vae.py")


def run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


def test_trains_then_resumes_to_the_total(tmp_path):
    out = run("--steps=4", f"--log_dir={tmp_path}", "--steps_per_execution=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out negative ELBO" in out.stdout
    assert f"tensorboard --logdir {tmp_path}" in out.stdout
    assert (tmp_path / "samples.png").exists()
    again = run("--steps=6", f"--log_dir={tmp_path}", "--steps_per_execution=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Restored" in again.stderr and "step 6/6" in again.stderr


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--steps=-5", "--steps"),
        ("--weights=nosuch=1", "--weights names terms that do not exist: ['nosuch']"),
        ("--weights=kl=linear:0:1", "--weights kl=linear:0:1"),
        ("--strategy=tpu", "--strategy"),
        ("--balancer=magic", "--balancer: Balancer 'magic': unknown balancer"),
        ("--dataset=/no/such.npz", "/no/such.npz"),
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
        "--latent_dim",
        "--free_bits",
        "--beta",
    ):
        boolean = "--[no]" + flag[2:]  # how absl shows a boolean flag
        assert flag in out.stdout or boolean in out.stdout, flag
    assert "(default: '5000')" in out.stdout
