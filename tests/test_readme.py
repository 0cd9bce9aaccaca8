"""The README's subclassing example runs as written, in a fresh process."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def readme_example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("## Subclass `Trainer`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_subclassing_example_runs_as_written(tmp_path):
    code = readme_example()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert {"reconstruction", "sparsity", "total"} <= set(results)
    assert results["total"] < 40.0  # it learned (an untrained model scores about 44 nats)
    assert (tmp_path / "runs" / "dn").is_dir()  # its TensorBoard run
