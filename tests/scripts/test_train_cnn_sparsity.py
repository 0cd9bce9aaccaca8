"""scripts/train_cnn_sparsity.py end to end on tiny settings, --help and one-line errors."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "train_cnn_sparsity.py")


def run_all(*argvs):
    """Runs the script once per argument list, concurrently; returns the finished processes."""
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for argv in argvs
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def test_trains_with_penalties_on_named_layers(tmp_path):
    (out,) = run_all(
        [
            "--steps=3",
            f"--log_dir={tmp_path}",
            "--steps_per_execution=3",
            "--batch_size=16",
            "--sparsity_layers=conv2,features",
            "--diversity_layer=logits",
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out accuracy:" in out.stdout
    assert "below 1e-3: conv2 " in out.stdout and "features " in out.stdout
    assert (tmp_path / "checkpoints").exists()


def test_bad_flags_are_one_line_errors_and_help_lists_flags(tmp_path):
    cases = {
        "--steps=-5": "--steps (-5)",
        "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
        "--sparsity_layers=conv1,nosuch": "--sparsity_layers: 'nosuch' is not a layer",
    }
    dirs = [tmp_path / str(i) for i in range(len(cases))]
    outs = run_all(
        *([flag, f"--log_dir={d}"] for flag, d in zip(cases, dirs, strict=True)), ["--help"]
    )
    for (flag, expected), out, log_dir in zip(cases.items(), outs, dirs, strict=False):
        assert out.returncode == 2, (flag, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "--" in lines[0] and expected in lines[0], (flag, out.stderr)
        assert "Traceback" not in out.stderr
        assert not (log_dir / "checkpoints").exists()
    help_text = outs[-1].stdout
    assert outs[-1].returncode == 0
    for flag in (
        "--steps",
        "--weights",
        "--dataset",
        "--sparsity_layers",
        "--sparsity_weight",
        "--diversity_layer",
        "--diversity_weight",
    ):
        assert flag in help_text, flag
    assert "(default: 'conv1,conv2')" in help_text and "(default: '2000')" in help_text
