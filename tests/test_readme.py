"""The README's subclassing example runs as written, in a fresh process."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def readme_example(heading: str = "## Subclass `Trainer`") -> str:
    """The first python block after `heading` in the README."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_fresh(code: str, cwd) -> str:
    """Runs `code` in a fresh Python process in `cwd` with this checkout; its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_subclassing_example_runs_as_written(tmp_path):
    out = run_fresh(readme_example(), tmp_path)
    results = ast.literal_eval(out.strip().splitlines()[-1])
    assert {"reconstruction", "sparsity", "total"} <= set(results)
    assert results["total"] < 40.0  # it learned (an untrained model scores about 44 nats)
    assert (tmp_path / "runs" / "dn").is_dir()  # its TensorBoard run


MAKE_DECODER = """
import keras
from termwise.models import vae
keras.utils.set_random_seed(0)
_, _, decoder = vae.build_vae((8, 8, 1), latent_dim=16)
decoder.save("runs/vae/decoder.keras")
"""


def test_the_loading_example_runs_as_written_in_a_fresh_process(tmp_path):
    # The reference job's decoder file, written by one process, loaded by another.
    (tmp_path / "runs" / "vae").mkdir(parents=True)
    run_fresh(MAKE_DECODER, tmp_path)
    out = run_fresh(readme_example("## Saving and loading models"), tmp_path)
    assert out.strip().splitlines()[-1] == "(16, 8, 8, 1)"
