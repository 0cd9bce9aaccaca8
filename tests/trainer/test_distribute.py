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
    for name in ("weighted", "pcgrad"):
        one, two = single["runs"][name], mirrored["runs"][name]
        assert set(one["logs"]) == set(two["logs"]), name
        # The last step (6) is a diagnostic step in both runs.
        assert {"grad_norm/loss", "grad_cosine/sparsity", "grad_conflict/train"} <= set(one["logs"])
        for key, value in one["logs"].items():
            assert two["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        for key, value in one["eval"].items():
            assert two["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        for a, b in zip(one["weights"], two["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
