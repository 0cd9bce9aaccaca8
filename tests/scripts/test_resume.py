"""A rerun resumes exactly: 20 steps straight against 10 then a rerun to 20, bit for bit.

Through the real scripts as subprocesses, with `--deterministic --seed=7 --log_every=10
--checkpoint_every=10`. Compared with `np.array_equal`: every variable of the final checkpoint
(weights, optimizer slots, balancer state, random state, step, data position; read with
`tf.train.load_checkpoint`, every key) and every logged scalar at every step, in every run of
the log directory (read back with TensorBoard's loader, which applies the restart event).

The data is the digits as an .npz without labels: the scripts then train no FID classifier.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from script_checks import run_script
from sklearn.datasets import load_digits
from tensorflow.core.protobuf import trackable_object_graph_pb2

from termwise.models import data as data_lib
from termwise.trainer import data as positions
from termwise.trainer.summaries import read_events

COMMON = ("--deterministic", "--seed=7", "--log_every=10", "--checkpoint_every=10")
COMMON += ("--validation_every=10", "--grad_log_every=10", "--steps_per_execution=5")
# Tags that measure time, not training.
TIMING = ("perf/",)

CASES = {
    "vae": ("train_vae", ()),
    "vae_gradnorm": ("train_vae", ("--balancer=gradnorm",)),
    "gan": ("train_gan", ("--batch_size=64", "--width=8", "--generator_norm=batch")),
}


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=(load_digits().images / 16.0).astype("float32"))
    return str(path)


def checkpoint_values(log_dir):
    """The newest checkpoint's prefix and every key's value, as numpy (the object graph without
    the variables' creation names, which are cosmetic; the data position, a variant, apart)."""
    prefix = tf.train.latest_checkpoint(os.path.join(log_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    values = {}
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype == tf.variant:
            values[key] = "variant"
        elif key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            # The object graph: which key belongs to which object (compared as the keys), in
            # the order the objects were created and with their creation names: cosmetic.
            graph = trackable_object_graph_pb2.TrackableObjectGraph()
            graph.ParseFromString(reader.get_tensor(key))
            values[key] = sorted(a.checkpoint_key for n in graph.nodes for a in n.attributes)
        else:
            values[key] = reader.get_tensor(key)
    return prefix, values


def next_batches(prefix, dataset, batch_size, count=30):
    """The `count` training batches that follow the data position saved at `prefix`: the
    scripts' own pipeline (models.data.batches), repeated with a symbolic position as the
    Trainer repeats it, restored from the checkpoint."""
    split = data_lib.load_images(dataset, seed=7)
    pipeline = data_lib.batches(split.x_train, batch_size, shuffle=True, seed=7).repeat()
    iterator = iter(positions.with_symbolic_position(pipeline))
    tf.train.Checkpoint(data=iterator).read(prefix).expect_partial()
    return np.stack([next(iterator).numpy() for _ in range(count)])


def scalars(log_dir):
    """{(run, tag): {step: sorted distinct values}} of every scalar of every run in log_dir."""
    found = {}
    for folder, _, files in os.walk(log_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        run = os.path.relpath(folder, log_dir)
        events = read_events(folder)
        for tag in events.Tags()["tensors"]:
            if tag.startswith(TIMING):
                continue
            for event in events.Tensors(tag):
                value = tf.make_ndarray(event.tensor_proto)
                if value.shape != () or value.dtype.kind != "f":
                    continue
                found.setdefault((run, tag), {}).setdefault(event.step, set()).add(value.item())
    return found


_RUNS = {}


def resumed(case, tmp_path_factory, digits_npz):
    """Runs `case` 20 steps straight and 10 then 10 (once per module); returns both dirs."""
    if case in _RUNS:
        return _RUNS[case]
    script, extra = CASES[case]
    root = tmp_path_factory.mktemp(case)
    straight, split = root / "straight", root / "split"
    args = (*COMMON, f"--dataset={digits_npz}", *extra)
    runs = run_script(
        script,
        [*args, "--steps=20", f"--log_dir={straight}"],
        [*args, "--steps=10", f"--log_dir={split}"],
    )
    for out in runs:
        assert out.returncode == 0, (out.args, out.stderr[-3000:])
    (again,) = run_script(script, [*args, "--steps=20", f"--log_dir={split}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restored" in again.stderr and "ckpt-10" in again.stderr, again.stderr[-3000:]
    _RUNS[case] = straight, split
    return straight, split


@pytest.mark.parametrize("case", list(CASES))
def test_ten_then_ten_is_twenty_straight_bit_for_bit(case, tmp_path_factory, digits_npz):
    straight, split = resumed(case, tmp_path_factory, digits_npz)

    prefix_a, want = checkpoint_values(straight)
    prefix_b, got = checkpoint_values(split)
    assert os.path.basename(prefix_a) == os.path.basename(prefix_b) == "ckpt-20"
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not np.array_equal(want[k], got[k])]
    assert not differ, differ
    # The checkpoint holds what must match: optimizer slots, random state, balancer state.
    keys = " ".join(want)
    assert "optimizer" in keys and "seed" in keys.lower(), sorted(want)
    if case == "vae_gradnorm":
        assert "balancer" in keys, sorted(want)
    want_scalars, got_scalars = scalars(straight), scalars(split)
    assert any(tag.startswith("total/") for _, tag in want_scalars), sorted(want_scalars)
    assert set(want_scalars) <= set(got_scalars), set(want_scalars) - set(got_scalars)
    for key, got_series in got_scalars.items():
        want_series = want_scalars.get(key, {})
        # The first run's own end-of-run evaluation at step 10 is the only thing the straight
        # run does not log (it ends at 20); the restart event dropped nothing else.
        extra = {step: v for step, v in got_series.items() if step not in want_series}
        assert set(extra) <= {10}, (key, extra)
        for step, want_values in want_series.items():
            if step == 10:  # the same, and maybe the end-of-run value (the GAN's averaged weights)
                assert want_values <= got_series[step], (key, want_series, got_series)
            else:
                assert got_series[step] == want_values, (key, want_series, got_series)


@pytest.mark.parametrize("case", ["vae"])
def test_the_data_position_continues_past_the_pass(case, tmp_path_factory, digits_npz):
    straight, split = resumed(case, tmp_path_factory, digits_npz)
    prefix_a, want = checkpoint_values(straight)
    prefix_b, _ = checkpoint_values(split)
    keras.utils.set_random_seed(7)  # the scripts' global seed: the shuffle's seed pair
    # The data position: both continue with the same batches (past the end of a pass, 23 steps).
    batch_size = 64
    assert any(isinstance(v, str) and v == "variant" for v in want.values())  # a data position
    following = next_batches(prefix_a, digits_npz, batch_size)
    # The position is read (ckpt-10's batches are others) ...
    earlier = next_batches(str(straight / "checkpoints" / "ckpt-10"), digits_npz, batch_size)
    assert np.array_equal(following[:10], earlier[10:20])
    resumed_following = next_batches(prefix_b, digits_npz, batch_size)
    np.testing.assert_array_equal(following[:3], resumed_following[:3])  # to the pass's end
    np.testing.assert_array_equal(following, resumed_following)  # and past it
