"""The same numbers on one replica and on two (MirroredStrategy over two logical CPUs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_run.py")


def run(kind):
    out = subprocess.run(
        [sys.executable, SCRIPT, kind], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_and_two_replicas_agree():
    single, mirrored = run("default"), run("mirrored")
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    assert set(single["logs"]) == set(mirrored["logs"])
    for key, value in single["logs"].items():
        assert mirrored["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, value in single["eval"].items():
        assert mirrored["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for a, b in zip(single["weights"], mirrored["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
