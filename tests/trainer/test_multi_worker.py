"""Two worker processes on loopback agree with one process, and only the chief writes files."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

SCRIPT = os.path.join(os.path.dirname(__file__), "multi_worker_run.py")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def last_json(out):
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_workers_match_one_process_and_only_the_chief_writes(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    shared = tmp_path / "shared"
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config)}
        processes.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, "multi_worker", str(shared)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append(
            last_json(subprocess.CompletedProcess([], process.returncode, stdout, stderr))
        )
    single = last_json(
        subprocess.run(
            [sys.executable, SCRIPT, "default", str(tmp_path / "one")],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    )
    assert [r["replicas"] for r in results] == [2, 2] and single["replicas"] == 1
    for result in results:
        assert result["step"] == 4
        for key, value in single["logs"].items():
            assert result["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for a, b in zip(single["weights"], result["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # One writer: the chief's events and checkpoints, no worker's scratch directory left over.
    events = [f for f in os.listdir(shared) if f.startswith("events.out.tfevents")]
    assert len(events) == 1, os.listdir(shared)
    assert sorted(os.listdir(shared / "checkpoints")) == sorted(
        os.listdir(tmp_path / "one" / "checkpoints")
    )


def start_cluster(shared, until):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config)}
        processes.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, "multi_worker", str(shared), str(until)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def test_sigterm_to_one_worker_saves_every_worker_at_one_step(tmp_path):
    # TensorFlow's PreemptionCheckpointHandler: the workers agree on a step, save there (the
    # chief writes) and exit with 128 + SIGTERM; a rerun resumes at that step.
    shared = tmp_path / "shared"
    processes = start_cluster(shared, 100_000)
    try:
        for line in processes[1].stdout:  # progress lines: the workers are training
            if line.startswith("step 6/"):
                break
        processes[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [143, 143], [o[1][-2000:] for o in outs]
    stops = [re.search(r"SIGTERM at step (\d+)", err) for _, err in outs]
    assert all(stops), [err[-2000:] for _, err in outs]
    (step,) = {int(m.group(1)) for m in stops}
    assert step >= 6
    saved = tf.train.latest_checkpoint(str(shared / "checkpoints"))
    assert saved.endswith(f"ckpt-{step}")
    again = start_cluster(shared, step + 2)
    results = []
    for process in again:
        stdout, stderr = process.communicate(timeout=240)
        results.append(
            last_json(subprocess.CompletedProcess([], process.returncode, stdout, stderr))
        )
    assert [r["step"] for r in results] == [step + 2, step + 2]
