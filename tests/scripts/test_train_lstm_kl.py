"""scripts/train_lstm_kl.py end to end on tiny settings, resume, --help and one-line errors."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "train_lstm_kl.py")
TINY = ("--units=4", "--window=12", "--horizon=3", "--steps_per_execution=3", "--batch_size=16")


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


def test_trains_then_resumes_to_the_total(tmp_path):
    (out,) = run_all(["--steps=3", f"--log_dir={tmp_path}", *TINY])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out forecast MSE" in out.stdout and "vs persistence" in out.stdout
    assert "ratio" in out.stdout
    (again,) = run_all(["--steps=6", f"--log_dir={tmp_path}", *TINY])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Restored" in again.stderr and "step 6/6" in again.stderr


def test_bad_flags_are_one_line_errors_and_help_lists_flags(tmp_path):
    cases = {
        "--steps=-5": "--steps (-5)",
        "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
        "--kl_target=gaussian:-1": "--kl_target ('gaussian:-1')",
    }
    dirs = [tmp_path / str(i) for i in range(len(cases))]
    outs = run_all(
        *([flag, f"--log_dir={d}", *TINY] for flag, d in zip(cases, dirs, strict=True)),
        ["--help"],
    )
    for (flag, expected), out, log_dir in zip(cases.items(), outs, dirs, strict=False):
        assert out.returncode == 2, (flag, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "--" in lines[0] and expected in lines[0], (flag, out.stderr)
        assert "Traceback" not in out.stderr
        assert not (log_dir / "checkpoints").exists()
    help_text = outs[-1].stdout
    assert outs[-1].returncode == 0
    for flag in ("--steps", "--weights", "--dataset", "--window", "--horizon", "--kl_target"):
        assert flag in help_text, flag
    assert "(default: 'gaussian:0.5')" in help_text
    assert "(default: \"['kl=0.01']\")" in help_text
