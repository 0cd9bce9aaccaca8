"""Process behaviour through scripts/train_vae.py as real subprocesses: SIGTERM and Ctrl-C save
at the signalled step and the rerun resumes there; a second Ctrl-C aborts at once; `kill -9` in
a loop, during saves, always leaves a newest intact checkpoint that the rerun restores (taking
over the dead owner's lock with a warning); a second writer in a held --log_dir is one line,
exit 2, and writes nothing.

The data is the digits as an .npz without labels, so the script trains no FID classifier.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from script_checks import ROOT, checkout_env  # noqa: E402

from termwise.trainer import data as positions  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "train_vae.py")
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=(load_digits().images / 16.0).astype("float32"))
    return str(path)


def args(log_dir, dataset, *extra):
    return [
        f"--log_dir={log_dir}",
        f"--dataset={dataset}",
        "--steps=100000",
        "--log_every=1",
        "--steps_per_execution=1",
        "--validation_every=100000",
        "--grad_log_every=0",
        *extra,
    ]


def start(argv):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=checkout_env(PYTHONUNBUFFERED="1"),
    )


def wait_for_step(proc, step):
    """Reads the progress lines on stdout until one reports `step` or later; returns them."""
    deadline = time.monotonic() + TIMEOUT_S
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(("the run ended early", lines, proc.stderr.read()[-3000:]))
        lines.append(line)
        seen = re.match(r"step (\d+)/", line)
        if seen and int(seen[1]) >= step:
            return lines
    proc.kill()
    raise AssertionError(("no step", step, lines))


def finish(proc):
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout, stderr


def checkpoint_steps(log_dir):
    folder = os.path.join(log_dir, "checkpoints")
    return sorted(
        int(m[1]) for f in os.listdir(folder) if (m := re.fullmatch(r"ckpt-(\d+)\.index", f))
    )


def newest_intact(log_dir):
    """The newest ckpt-N every tensor of which reads back (independently of the Trainer)."""
    for step in reversed(checkpoint_steps(log_dir)):
        prefix = os.path.join(log_dir, "checkpoints", f"ckpt-{step}")
        try:
            reader = tf.train.load_checkpoint(prefix)
            for key, dtype in reader.get_variable_to_dtype_map().items():
                if dtype != tf.variant:
                    reader.get_tensor(key)
        except (tf.errors.OpError, ValueError):
            continue
        return step
    return None


def listing(folder):
    """The files under `folder` (names: the owner keeps appending to its own)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_its_step_and_the_rerun_resumes_there(signum, tmp_path, digits_npz):
    log_dir = tmp_path / "run"
    owner = start(args(log_dir, digits_npz, "--checkpoint_every=100000"))
    wait_for_step(owner, 5)
    if signum == signal.SIGTERM:
        # A second writer while the first holds the directory: one line, exit 2, nothing written.
        before = listing(log_dir)
        second = start(args(log_dir, digits_npz, "--checkpoint_every=100000"))
        code, _, stderr = finish(second)
        assert code == 2, (code, stderr[-3000:])
        assert len(stderr.strip().splitlines()) == 1, stderr[-3000:]
        assert "--log_dir" in stderr and str(owner.pid) in stderr, stderr
        assert listing(log_dir) == before
        assert not [f for f in before if f".{second.pid}." in f]
    owner.send_signal(signum)
    code, _, stderr = finish(owner)
    assert code == 128 + signum, (code, stderr[-3000:])
    name = signal.Signals(signum).name
    said = [line for line in stderr.splitlines() if line.startswith(name)]
    assert len(said) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped = int(re.match(rf"{name} at step (\d+): checkpoint saved in ", said[0])[1])
    assert "rerun the same command to resume" in said[0]
    assert stopped >= 5 and checkpoint_steps(log_dir) == [stopped]  # saved at that step only
    # The rerun (the same flags, two steps more) restores that step and goes on from it.
    rerun = args(log_dir, digits_npz, "--checkpoint_every=100000")
    rerun[2] = f"--steps={stopped + 2}"
    code, stdout, stderr = finish(start(rerun))
    assert code == 0, stderr[-3000:]
    assert f"Restored {log_dir}/checkpoints/ckpt-{stopped}" in stderr, stderr[-3000:]
    steps = [int(m) for m in re.findall(r"^step (\d+)/", stdout, re.M)]
    assert steps == [stopped + 1, stopped + 2], stdout


def test_a_second_ctrl_c_aborts_at_once(tmp_path, digits_npz):
    # The second Ctrl-C must land while the first one's stop (end of the call, save) runs; on
    # this tiny model that stop can end first, so the gap shrinks until it lands inside it.
    # Were a second Ctrl-C ignored, every attempt would end with the first one's clean save.
    outcomes = []
    for attempt, gap in enumerate((0.05, 0.01, 0.0)):
        log_dir = tmp_path / f"run{attempt}"
        proc = start(args(log_dir, digits_npz, "--checkpoint_every=100000"))
        wait_for_step(proc, 3)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)  # two signals sent at once may be one pending signal
        proc.send_signal(signal.SIGINT)
        code, _, stderr = finish(proc)
        assert code == 130, (code, stderr[-3000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        outcomes.append(last)
        if last == "Interrupted again: aborting without saving.":
            assert not os.path.exists(log_dir / "checkpoints") or checkpoint_steps(log_dir) == []
            return
        assert re.match(r"SIGINT at step \d+", last), last  # the stop ended before the second
    raise AssertionError(f"no second Ctrl-C aborted the stop: {outcomes}")


def test_kill_9_during_saves_then_every_rerun_restores_the_newest_intact(tmp_path, digits_npz):
    """A save every step; each run is killed a varying time into its saves; each rerun restores
    the newest checkpoint that reads back, and takes over the dead run's lock with a warning."""
    log_dir = tmp_path / "run"
    proc = start(args(log_dir, digits_npz, "--checkpoint_every=1"))
    restored = []
    for kill in range(4):
        wait_for_step(proc, (restored[-1] if restored else 0) + 2)
        time.sleep(0.05 * kill)  # somewhere into the next saves
        proc.kill()
        _, _, stderr = finish(proc)
        if kill:
            # This run took over the lock of the one killed before it, with a warning.
            assert re.search(r"Taking over .*\.termwise\.lock: the run that held it", stderr)
        assert os.path.exists(log_dir / "checkpoints" / ".termwise.lock") or os.path.exists(
            log_dir / ".termwise.lock"
        )
        want = newest_intact(log_dir)
        assert want is not None
        proc = start(args(log_dir, digits_npz, "--checkpoint_every=1"))
        lines = wait_for_step(proc, want + 1)
        first = int(re.match(r"step (\d+)/", lines[0])[1])
        assert first == want + 1, (want, lines[:3])  # resumed at the newest intact checkpoint
        restored.append(want)
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = finish(proc)
    assert code == 143, stderr[-3000:]
    assert "Taking over" in stderr
    assert restored == sorted(restored) and len(set(restored)) == len(restored), restored


PREFETCHED = """
import sys
import keras
import numpy as np
import tensorflow as tf
from termwise import losses
from termwise.trainer import Trainer

until, directory = int(sys.argv[1]), sys.argv[2]
keras.utils.set_random_seed(7)
x = np.arange(1527 * 2, dtype="float32").reshape(1527, 2) / 3000
data = (
    tf.data.Dataset.from_tensor_slices((x, x[:, :1]))
    .shuffle(1527, seed=7, reshuffle_each_iteration=True)
    .batch(64, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)  # the usual ending, before the Trainer's repeat
)
held_out = tf.data.Dataset.from_tensor_slices((x[:100], x[:100, :1])).batch(64)
inputs = keras.Input((2,))
t = Trainer(keras.Model(inputs, keras.layers.Dense(1)(inputs)), keras.optimizers.SGD(0.01),
            loss=losses.mean_squared_error, checkpoint_dir=directory, checkpoint_every=10,
            log_every=10, progress=False)
t.build(data)
t.fit(data, until_step=until, validation_data=held_out, validation_every=10)
"""


def test_a_prefetched_reshuffled_dataset_resumes_exactly_across_passes(tmp_path):
    """A user's shuffle -> batch -> prefetch pipeline, validated every 10 steps: the data
    position saved at step 20 after 10 + a rerun to 20 continues as 20 straight does, past the
    end of the pass (23 batches). With TensorFlow's explicit iterator state, which the Trainer
    saved before, the next pass's order differed in about half the runs."""
    env = checkout_env(TF_CPP_MIN_LOG_LEVEL="3")
    for until, name in ((20, "straight"), (10, "split"), (20, "split")):
        subprocess.run(
            [sys.executable, "-c", PREFETCHED, str(until), str(tmp_path / name)],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def following(name):
        x = np.arange(1527 * 2, dtype="float32").reshape(1527, 2) / 3000
        data = (
            tf.data.Dataset.from_tensor_slices((x, x[:, :1]))
            .shuffle(1527, seed=7, reshuffle_each_iteration=True)
            .batch(64, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        iterator = iter(positions.with_symbolic_position(data.repeat()))  # the Trainer's
        prefix = tf.train.latest_checkpoint(str(tmp_path / name))
        assert prefix.endswith("ckpt-20")
        tf.train.Checkpoint(data=iterator).read(prefix).expect_partial()
        return np.stack([next(iterator)[0].numpy() for _ in range(30)])

    np.testing.assert_array_equal(following("straight"), following("split"))
