"""What the end-to-end script tests share: running scripts/<name>.py, and the checks that
every training script answers a bad flag with one line and --help with all its flags.

A plain module (not a test file): the tests import it as `from script_checks import ...`.
"""

import os
import re
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 300

# The flags scripts/common.py define_flags gives every training script (absl shows a boolean
# as --[no]name; assert_help_lists accepts either form).
COMMON_FLAGS = (
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
)


def checkout_env(**extra) -> dict:
    """The environment for a subprocess that must import this checkout's `termwise` (not
    another copy installed elsewhere): the clone's root first on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_script(name, *argvs, timeout=TIMEOUT_S):
    """Runs scripts/<name>.py once per argument list, all at once (each run pays a TensorFlow
    import, so running them side by side saves wall time); returns one CompletedProcess per
    argument list, in order. A run still going after `timeout` seconds is an error."""
    script = os.path.join(ROOT, "scripts", f"{name}.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=checkout_env(),
        )
        for argv in argvs
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # only left running when a run timed out (or the test was stopped)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def run_bad_flags_and_help(name, bad_flags, tmp_path, extra_args=()):
    """Runs scripts/<name>.py once per flag in `bad_flags` (each with `extra_args` and its own
    --log_dir under `tmp_path`) and once with --help, all at once. Returns the bad-flag runs as
    (expected, out, log_dir) triples, `expected` being bad_flags[flag], and the --help run."""
    log_dirs = [os.path.join(tmp_path, str(i)) for i in range(len(bad_flags))]
    *outs, help_out = run_script(
        name,
        *(
            [flag, f"--log_dir={log_dir}", *extra_args]
            for flag, log_dir in zip(bad_flags, log_dirs, strict=True)
        ),
        ["--help"],
    )
    return list(zip(bad_flags.values(), outs, log_dirs, strict=True)), help_out


def assert_one_line_error(out, expected, log_dir):
    """A bad flag: exit code 2, exactly one stderr line that names a flag and holds `expected`,
    no traceback, and nothing written (no checkpoints directory under `log_dir`)."""
    args = out.args[2:]  # the script's arguments, to say which run failed
    assert out.returncode == 2, (args, out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, (args, "want exactly one stderr line", out.stderr[-2000:])
    assert "--" in lines[0] and expected in lines[0], (args, expected, lines[0])
    assert "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert not os.path.exists(os.path.join(log_dir, "checkpoints")), (args, log_dir)


def assert_help_lists(out, extra_flags, default_text=None):
    """--help: exit code 0, and stdout lists every common flag plus `extra_flags` (a boolean as
    --[no]name), and holds `default_text` (one string or several, e.g. "(default: '5000')")."""
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    for flag in (*COMMON_FLAGS, *extra_flags):
        name = re.escape(flag.removeprefix("--"))
        listed = re.search(rf"^\s*--(\[no\])?{name}:", out.stdout, re.MULTILINE)
        assert listed, (flag, "not listed in --help", out.stdout[-4000:])
    if default_text is None:
        default_text = ()
    elif isinstance(default_text, str):
        default_text = (default_text,)
    for text in default_text:
        assert text in out.stdout, (text, "not in --help", out.stdout[-4000:])
