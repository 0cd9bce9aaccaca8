"""TensorBoard tags, read back from the event files with tensorboard's EventAccumulator."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import penalised_model, regression_data
from tensorboard.plugins.custom_scalar import layout_pb2

from termwise import losses
from termwise.trainer import Trainer
from termwise.trainer.summaries import read_events
from termwise.trainer.summaries import scalar_series as series


def test_tags_steps_and_values(tmp_path):
    x, y = regression_data(64)
    t = Trainer(
        penalised_model(),
        keras.optimizers.Adam(1e-3),
        loss=losses.mean_squared_error,
        weights={"sparsity": "linear:0:1:10"},
        log_dir=str(tmp_path),
        log_every=4,
        steps_per_execution=3,
        progress=False,
    )
    logs = t.fit((x, y), steps=10, batch_size=16, validation_data=(x, y)).last
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    for term in ("loss", "sparsity", "regularization"):
        assert {f"loss/{term}", f"weight/{term}", f"weighted/{term}"} <= tags
    assert {
        "total/train",
        "optimizer/train/learning_rate",
        "perf/steps_per_sec",
        "perf/examples_per_sec",
        "eval/loss",
        "eval/total",
    } <= tags
    # Logged every 4 steps, exactly, although a compiled call runs 3; the last step too.
    assert [s for s, _ in series(events, "loss/loss")] == [4, 8, 10]
    # A logged weight is the mean over the steps since the last logged step of the weights
    # applied: the update from s-1 to s uses schedule(s - 1) = (s - 1) / 10.
    assert [v for _, v in series(events, "weight/sparsity")] == pytest.approx([0.15, 0.55, 0.85])
    assert series(events, "loss/loss")[-1][1] == pytest.approx(logs["loss/loss"])
    assert series(events, "optimizer/train/learning_rate")[0][1] == pytest.approx(1e-3)
    # Validation ran at the end of each pass (every 4 steps) and at the last step.
    assert [s for s, _ in series(events, "eval/loss")] == [4, 8, 10]


def test_custom_scalar_layout_and_hparams(tmp_path):
    x, y = regression_data(32)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        weights={"sparsity": "cosine:1:0:100"},
        log_dir=str(tmp_path),
        progress=False,
        hparams={"seed": 7},
    )
    t.fit((x, y), steps=2)
    events = read_events(tmp_path)
    tags = events.Tags()["tensors"]
    assert "custom_scalars__config__" in tags
    layout = layout_pb2.Layout()
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout.ParseFromString(tf.make_ndarray(proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["values: loss/<term>"] == [r"loss/.*"]
    assert charts["weights: weight/<term>"] == [r"weight/.*"]
    plugins = events.PluginTagToContent("hparams")
    session = plugins["_hparams_/session_start_info"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(session)
    hparams = {k: v for k, v in data.session_start_info.hparams.items()}
    assert hparams["weight/sparsity"].string_value == "cosine:1:0:100"
    assert hparams["seed"].number_value == 7
    assert hparams["steps_per_execution"].number_value == 10


def test_log_every_zero_logs_only_the_last_step(tmp_path):
    x, y = regression_data(32)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        log_every=0,
        progress=False,
    )
    t.fit((x, y), steps=5, batch_size=8)
    assert [s for s, _ in series(read_events(tmp_path), "total/train")] == [5]


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    # Printed, not absl INFO lines, which a default absl set-up outside the scripts hides.
    x, y = regression_data(32)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_every=2,
        progress=False,
    )
    t.fit((x, y), steps=4, batch_size=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps/s" in line]
    assert len(lines) == 2 and lines[-1].startswith("step 4/4") and "loss/sparsity=" in lines[-1]


def test_images_are_written_under_images(tmp_path):
    x, y = regression_data(8)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        progress=False,
    )
    t.writer.images("samples", np.random.rand(2, 8, 8, 1), step=3)
    t.writer.flush()
    assert "images/samples" in read_events(tmp_path).Tags()["tensors"]
