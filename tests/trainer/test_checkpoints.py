"""Checkpoint round trips: a resumed run continues exactly as an uninterrupted one; damaged,
mismatched and unsaveable state; changed options; TensorBoard after a resume."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ActivityPenalty, penalised_model, regression_data, weights_of
from tensorboard.backend.event_processing import plugin_event_accumulator

from termwise import losses
from termwise.trainer import Trainer


def make(checkpoint_dir, **kwargs):
    keras.utils.set_random_seed(3)
    model = penalised_model()
    return Trainer(
        model,
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        weights={"sparsity": "linear:0:1:20"},
        checkpoint_dir=str(checkpoint_dir),
        progress=False,
        **kwargs,
    )


def shuffled(x, y):
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(64, seed=5, reshuffle_each_iteration=True)
        .batch(16)
    )


def test_resume_is_exact(tmp_path):
    x, y = regression_data(64)
    reference = make(tmp_path / "reference")
    reference.fit(shuffled(x, y), steps=12)

    first = make(tmp_path / "resumed", checkpoint_every=5)
    first.fit(shuffled(x, y), steps=7)  # saves at 5 and at the end, 7
    assert sorted(
        int(p.split("-")[-1])
        for p in tf.train.get_checkpoint_state(str(tmp_path / "resumed")).all_model_checkpoint_paths
    ) == [5, 7]

    second = make(tmp_path / "resumed")  # a new process, the same command
    assert second.step == 7
    second.fit(shuffled(x, y), until_step=12)
    assert second.step == 12
    for a, b in zip(weights_of(reference.model), weights_of(second.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(second.phases["train"].optimizer.iterations.numpy()) == 12


def test_keeps_the_last_n(tmp_path):
    x, y = regression_data(32)
    t = make(tmp_path, checkpoint_every=1, max_checkpoints=2)
    t.fit((x, y), steps=4, batch_size=8)
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert [int(p.split("-")[-1]) for p in state.all_model_checkpoint_paths] == [3, 4]


def test_unbuilt_subclassed_model_is_built_then_restored(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    x, y = regression_data(32, features=2)
    t = Trainer(
        Net(),
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    t.fit((x, y), steps=3)
    kernel = np.array(t.model.dense.kernel)
    again = Trainer(
        Net(),
        keras.optimizers.Adam(1e-2),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    again.evaluate((x, y))  # builds the model, then restores it
    np.testing.assert_array_equal(np.array(again.model.dense.kernel), kernel)
    again.fit((x, y), steps=1)
    assert again.step == 4
    assert int(again.phases["train"].optimizer.iterations.numpy()) == 4


def test_resume_continues_the_random_stream(tmp_path):
    # GaussianNoise draws from a keras SeedGenerator, whose state Keras leaves out of
    # TensorFlow checkpoints: a resumed run must not replay the first steps' noise.
    def noisy(directory):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((4,))
        h = keras.layers.GaussianNoise(0.5, seed=1)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        return Trainer(
            model,
            keras.optimizers.SGD(0.05),
            loss=losses.mean_squared_error,
            checkpoint_dir=str(directory),
            progress=False,
            steps_per_execution=1,
        )

    x, y = regression_data(32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    reference = noisy(tmp_path / "reference")
    reference.fit(data, steps=4)
    first = noisy(tmp_path / "resumed")
    first.fit(data, steps=2)
    second = noisy(tmp_path / "resumed")
    second.fit(data, until_step=4)
    for a, b in zip(weights_of(reference.model), weights_of(second.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Damaged checkpoints: the newest intact one restores, and nothing is lost when none does.


def checkpoint_steps(directory):
    """The steps of the ckpt-N checkpoints whose .index file is in `directory`."""
    return sorted(
        int(n[5:-6]) for n in os.listdir(directory) if re.fullmatch(r"ckpt-\d+\.index", n)
    )


def three_checkpoints(directory):
    """A run of 6 steps saved at 2, 4 and 6; returns its inputs."""
    x, y = regression_data(64)
    make(directory, checkpoint_every=2).fit((x, y), steps=6, batch_size=16)
    assert checkpoint_steps(directory) == [2, 4, 6]
    return x, y


def all_tensors(prefix):
    """Every readable (non-variant) tensor of a checkpoint, by key."""
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    return {k: reader.get_tensor(k) for k, d in dtypes.items() if d != tf.variant}


def delete_index(directory):
    os.remove(directory / "ckpt-6.index")


def garble_state_file(directory):
    (directory / "checkpoint").write_text("model_checkpoint_path: {{ garbled")


def truncate_data(directory):
    data = directory / "ckpt-6.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


@pytest.mark.parametrize(
    "harm, restored, damaged",
    [(delete_index, 4, "ckpt-6"), (truncate_data, 4, "ckpt-6"), (garble_state_file, 6, None)],
)
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, caplog, harm, restored, damaged
):
    x, y = three_checkpoints(tmp_path)
    harm(tmp_path)
    with caplog.at_level(logging.WARNING):
        resumed = make(tmp_path)
    assert resumed.step == restored  # not a silent restart from step 0
    expected = all_tensors(tmp_path / f"ckpt-{restored}")
    for variable, key in (
        (resumed.phases["train"].optimizer.iterations, "optimizer_train/_iterations"),
        (resumed.model.get_layer("out").kernel, "optimizer_train/_trainable_variables/2"),
    ):
        np.testing.assert_array_equal(
            variable.numpy(), expected[f"{key}/.ATTRIBUTES/VARIABLE_VALUE"]
        )
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    if damaged:
        assert f"Checkpoint {damaged} " in warnings and "is damaged" in warnings, warnings
    else:
        assert "state file" in warnings, warnings
    resumed.fit((x, y), until_step=7, batch_size=16)
    # The intact checkpoints before the damaged one are kept: only the oldest beyond three goes.
    assert {restored, 7} <= set(checkpoint_steps(tmp_path))
    again = make(tmp_path)
    assert again.step == 7


def test_when_no_checkpoint_restores_it_is_an_error_and_nothing_is_deleted(tmp_path):
    three_checkpoints(tmp_path)
    for step in (2, 4, 6):
        os.remove(tmp_path / f"ckpt-{step}.index")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError) as raised:
        make(tmp_path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert "none can be restored" in message and "ckpt-6 (its .index file is missing)" in message
    assert "Nothing was deleted" in message
    assert sorted(os.listdir(tmp_path)) == before


# ------------------------------------------------------------------------------------------
# A restore matches both ways; weights from another program only on purpose (init_from).


def wider_model():
    """penalised_model with one more Dense layer between `hidden` and the penalty."""
    inputs = keras.Input((4,))
    reg = keras.regularizers.L2(1e-3)
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=reg, name="hidden")(inputs)
    h = keras.layers.Dense(8, name="extra")(h)
    h = ActivityPenalty(name="sparsity")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


def narrower_model():
    """penalised_model without its `hidden` layer."""
    inputs = keras.Input((4,))
    h = ActivityPenalty(name="sparsity")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


@pytest.mark.parametrize(
    "build, differs",
    [(wider_model, "this has model_main"), (narrower_model, "the checkpoint holds model_main")],
)
def test_a_checkpoint_of_another_model_is_refused_both_ways(tmp_path, build, differs):
    three_checkpoints(tmp_path)
    keras.utils.set_random_seed(3)
    model = build()
    initial = weights_of(model)
    with pytest.raises(ValueError) as raised:
        Trainer(
            model,
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            checkpoint_dir=str(tmp_path),
            progress=False,
        )
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert "does not match" in message and differs in message, message
    assert f"`init_from`={tmp_path / 'ckpt-6'}" in message
    for a, b in zip(initial, weights_of(model), strict=True):  # nothing was assigned
        np.testing.assert_array_equal(a, b)


def test_init_from_loads_the_matching_weights_and_starts_at_step_0(tmp_path, caplog):
    three_checkpoints(tmp_path / "old")
    saved = all_tensors(tmp_path / "old" / "ckpt-6")
    keras.utils.set_random_seed(4)
    model = wider_model()
    extra_before = model.get_layer("extra").kernel.numpy()
    with caplog.at_level(logging.INFO):
        t = Trainer(
            model,
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            checkpoint_dir=str(tmp_path / "new"),
            init_from=str(tmp_path / "old"),  # a directory: its newest intact checkpoint
            progress=False,
        )
    assert t.step == 0 and int(t.phases["train"].optimizer.iterations.numpy()) == 0
    # `hidden` sits at the same place with the same shapes: loaded. `extra` is new, and `out`
    # sits where the checkpoint's penalty layer was: neither is loaded.
    np.testing.assert_array_equal(
        model.get_layer("hidden").kernel.numpy(),
        saved["optimizer_train/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"],
    )
    np.testing.assert_array_equal(model.get_layer("extra").kernel.numpy(), extra_before)
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "init_from=" in log and "loaded 2 model variables" in log and "hidden/kernel" in log
    assert "extra/kernel [8, 8]: not in the checkpoint" in log
    with pytest.raises(ValueError, match="init_from"):
        make(tmp_path / "other", init_from=str(tmp_path / "nothing-here"))


# ------------------------------------------------------------------------------------------
# Changed options on a rerun.


def test_a_changed_learning_rate_wins_and_is_logged_at_the_resume_step(tmp_path):
    x, y = regression_data(64)
    first = make(tmp_path, log_dir=str(tmp_path / "logs"))
    first.fit((x, y), steps=4, batch_size=16)
    # A callback may change the learning rate in training: the checkpoint holds its value, and
    # a rerun given the same learning rate as before keeps it.
    first.phases["train"].optimizer.learning_rate = 4e-3
    first.save()
    same = make(tmp_path, log_dir=str(tmp_path / "logs"))
    assert float(same.phases["train"].optimizer.learning_rate) == np.float32(4e-3)
    assert same._checkpoints.notes == []
    keras.utils.set_random_seed(3)
    changed = Trainer(
        penalised_model(),
        keras.optimizers.Adam(1e-5),  # the user changed --learning_rate
        loss=losses.mean_squared_error,
        weights={"sparsity": "linear:0:1:20"},
        checkpoint_dir=str(tmp_path),
        log_dir=str(tmp_path / "logs"),
        progress=False,
    )
    assert float(changed.phases["train"].optimizer.learning_rate) == np.float32(1e-5)
    changed.fit((x, y), steps=1, batch_size=16)
    events = plugin_events(tmp_path / "logs")
    (text,) = events.Tensors("resume")
    assert text.step == 5
    assert (
        "is 1e-05 as given, in place of 0.004" in tf.make_ndarray(text.tensor_proto).item().decode()
    )
    rates = [
        tf.make_ndarray(e.tensor_proto).item()
        for e in events.Tensors("optimizer/train/learning_rate")
    ]
    assert rates[-1] == np.float32(1e-5)


def test_a_changed_seed_is_refused_in_one_line(tmp_path):
    x, y = regression_data(32)
    make(tmp_path, hparams={"seed": 1}).fit((x, y), steps=2, batch_size=16)
    with pytest.raises(ValueError) as raised:
        make(tmp_path, hparams={"seed": 2})
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert "`seed` changed from 1 to 2" in message and "give `seed` 1 again" in message


def test_batches_of_another_size_start_the_data_from_its_beginning(tmp_path, caplog):
    x, y = regression_data(64)
    make(tmp_path).fit(shuffled(x, y), steps=3)  # batches of 16
    resumed = make(tmp_path)
    smaller = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(64, seed=5, reshuffle_each_iteration=True)
        .batch(8, drop_remainder=True)
    )
    with caplog.at_level(logging.WARNING):
        resumed.fit(smaller, steps=2)  # today: a 74-line IteratorGetNext traceback
    assert resumed.step == 5
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "the training batches changed" in warnings and "from its beginning" in warnings


# ------------------------------------------------------------------------------------------
# Saving.


def test_a_data_position_that_cannot_be_saved_is_dropped_once_with_a_warning(tmp_path, caplog):
    x, y = regression_data(64)
    doubled = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(16)
        .map(lambda a, b: (tf.py_function(lambda v: v * 1.0, [a], tf.float32), b))
    )
    doubled = doubled.map(lambda a, b: (tf.ensure_shape(a, [None, 4]), b))
    t = make(tmp_path, checkpoint_every=2)
    with caplog.at_level(logging.WARNING):
        t.fit(doubled, steps=6)  # today: "PyFunc is stateful" at the first save, none written
    assert checkpoint_steps(tmp_path) == [2, 4, 6]
    keys = tf.train.load_checkpoint(str(tmp_path / "ckpt-6")).get_variable_to_shape_map()
    assert not any(k.startswith("data/") for k in keys)
    warnings = [
        r.getMessage() for r in caplog.records if "position cannot be saved" in r.getMessage()
    ]
    assert len(warnings) == 1 and "stateful" in warnings[0]


FULL_DISK = """
import resource, signal, sys
import keras
sys.path.insert(0, {tests!r})
from helpers import penalised_model, regression_data
from termwise import losses
from termwise.trainer import Trainer

keras.utils.set_random_seed(3)
x, y = regression_data(64)
t = Trainer(penalised_model(), keras.optimizers.Adam(1e-2), loss=losses.mean_squared_error,
            checkpoint_dir={directory!r}, progress=False)
t.fit((x, y), steps=1, batch_size=16)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # the disk is "full" from now on
t.fit((x, y), steps=1, batch_size=16)
"""


def test_a_full_disk_is_not_blamed_on_the_data_position(tmp_path):
    program = FULL_DISK.format(tests=os.path.dirname(__file__), directory=str(tmp_path / "c"))
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "File too large" in out.stderr, out.stderr[-3000:]
    # today: "Saving the data position failed (...); saving without it."
    assert "data position failed" not in out.stderr, out.stderr[-3000:]
    assert "position cannot be saved" not in out.stderr, out.stderr[-3000:]
    assert checkpoint_steps(tmp_path / "c") == [1]
    assert not [n for n in os.listdir(tmp_path / "c") if n.endswith("_temp")]


def test_unfinished_saves_are_removed_at_start_but_not_under_another_live_writer(tmp_path):
    x, y = regression_data(32)
    make(tmp_path).fit((x, y), steps=2, batch_size=16)
    stale = tmp_path / "ckpt-3_temp"
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_bytes(b"\0" * 10)
    # Another live process holds the directory: its save in progress is left alone.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": other.pid, "host": socket.gethostname(), "start": None, "since": None}
        (tmp_path / ".termwise.lock").write_text(json.dumps(owner))
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {other.pid} on host"):
            make(tmp_path)
        assert stale.is_dir()
    finally:
        other.kill()
        other.wait()
    # Its owner is gone: the lock is taken over, and what the killed save left is removed.
    resumed = make(tmp_path)
    assert resumed.step == 2 and not stale.exists()


# ------------------------------------------------------------------------------------------
# TensorBoard after a resume: one value per step.


def plugin_events(directory):
    """The run as TensorBoard's Python data provider loads it (`--load_fast=false`)."""
    events = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_a_resume_shows_one_value_per_step_in_tensorboard(tmp_path):
    x, y = regression_data(64)
    logs, checkpoints = tmp_path / "logs", tmp_path / "checkpoints"

    def run():
        return make(checkpoints, log_dir=str(logs), log_every=5, checkpoint_every=10)

    run().fit(shuffled(x, y), steps=17)  # logs 5, 10, 15, 17; saves 10, 17
    for name in os.listdir(checkpoints):  # as if it had been killed before saving at 17
        if name.startswith("ckpt-17."):
            os.remove(checkpoints / name)
    # A rerun is a later process: its event file's name (seconds, host, pid, a counter) sorts
    # after the first's. In one process within one second the counter decides, and it is not
    # zero-padded ("...10.v2" before "...9.v2"), so the test waits into the next second.
    time.sleep(1.1)
    resumed = run()
    assert resumed.step == 10
    resumed.fit(shuffled(x, y), until_step=20)  # logs 15 again, then 20
    events = plugin_events(logs)
    for tag in ("total/train", "loss/loss", "weight/sparsity"):
        assert [e.step for e in events.Tensors(tag)] == [5, 10, 15, 20], tag
    # TensorBoard's default loader, the Rust data server, reads the same.
    assert rust_scalar_steps(logs, "total/train") == [5, 10, 15, 20]


def rust_scalar_steps(logdir, tag, timeout=90):
    """The steps of one scalar tag of run "." as TensorBoard's Rust data server serves them."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            f"--logdir={logdir}",
            f"--port={port}",
            "--host=127.0.0.1",
            "--load_fast=true",
            "--reload_interval=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag={urllib.parse.quote(tag)}"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.load(response)
                if points:
                    return [int(step) for _, step, _ in points]
            except (OSError, ValueError):
                pass
            if server.poll() is not None:
                raise AssertionError(server.stderr.read().decode()[-2000:])
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard served no {tag!r} in {timeout} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
