"""TensorBoard tags, read back from the event files with tensorboard's EventAccumulator."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import penalised_model, regression_data
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

import termwise
from termwise import losses
from termwise.trainer import Trainer, summaries
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
        assert {f"loss/{term}", f"weight/{term}", f"weighted/{term}", f"share/{term}"} <= tags
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


def test_each_term_has_its_own_run_with_the_flat_values(tmp_path):
    x, y = regression_data(64)
    t = Trainer(
        penalised_model(),
        keras.optimizers.Adam(1e-3),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        log_every=2,
        grad_log_every=3,
        progress=False,
    )
    t.fit((x, y), steps=6, batch_size=16)
    flat = read_events(tmp_path)
    runs = sorted(os.listdir(tmp_path / "terms"))
    assert runs == ["loss", "regularization", "sparsity"]
    for term in runs:
        own = read_events(tmp_path / "terms" / term)
        assert sorted(own.Tags()["tensors"]) == sorted(
            f"by_term/train/{q}" for q in summaries.PER_TERM
        )
        for quantity in summaries.PER_TERM:  # the same events, bit for bit
            mine = series(own, f"by_term/train/{quantity}")
            assert mine == series(flat, f"{quantity}/{term}"), (term, quantity)
        assert [s for s, _ in series(own, "by_term/train/grad_share")] == [3, 6]
    # The shares of the total add up to 1 at each logged step; so do those of the update.
    for family in ("share", "grad_share"):
        sums = np.sum([[v for _, v in series(flat, f"{family}/{n}")] for n in runs], axis=0)
        np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    # The flat run holds no by_term tags, and the term runs nothing else.
    assert not [tag for tag in flat.Tags()["tensors"] if tag.startswith("by_term/")]


def test_term_run_directories():
    assert summaries.term_run("kl") == os.path.join("terms", "kl")
    assert summaries.term_run("enc_a/kl") == os.path.join("terms", "enc_a", "kl")
    assert summaries.term_run("../x") == os.path.join("terms", "_", "x")


def layout_of(events) -> dict[str, list[str]]:
    layout = layout_pb2.Layout()
    proto = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout.ParseFromString(tf.make_ndarray(proto).item())
    return {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}


def session_hparams(events) -> dict:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return dict(data.session_start_info.hparams.items())


def experiment_of(events):
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


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
        hparams_metrics=["eval/extra"],
    )
    t.fit((x, y), steps=2)
    events = read_events(tmp_path)
    charts = layout_of(events)
    # One chart per quantity and phase, selecting the term runs' tags: a line per term.
    assert charts["train: values, unweighted"] == [r"^by_term/train/loss$"]
    assert charts["train: share of the total: weighted / total"] == [r"^by_term/train/share$"]
    assert charts["train: share of the update (diagnostic steps)"] == [
        r"^by_term/train/grad_share$"
    ]
    hparams = session_hparams(events)
    assert hparams["weights"].string_value == "sparsity=cosine:1:0:100"
    assert hparams["balancer"].string_value == "none"  # always there, so no run drops out
    assert hparams["optimizer"].string_value == "SGD"
    assert hparams["learning_rate"].number_value == pytest.approx(0.01)
    assert hparams["seed"].number_value == 7
    assert not [name for name in hparams if "/" in name]  # no name looks like a tag
    experiment = experiment_of(events)
    assert sorted(h.name for h in experiment.hparam_infos) == sorted(hparams)
    metrics = [(m.name.tag, m.name.group) for m in experiment.metric_infos]
    assert metrics == [
        ("eval/loss", ""),
        ("eval/sparsity", ""),
        ("eval/regularization", ""),
        ("eval/total", ""),
        ("total/train", ""),
        ("eval/extra", ""),
    ]


def test_layout_groups_a_gans_charts_by_phase():
    phases = ["discriminator", "generator"]
    layout = summaries.layout_proto(phases)
    assert [c.title for c in layout.category[:2]] == [f"terms of phase {p}" for p in phases]
    for category, phase in zip(layout.category[:2], phases, strict=True):
        for chart in category.chart:  # one quantity of this phase's terms, none of the other's
            (regex,) = chart.multiline.tag
            for p in phases:
                tags = [f"by_term/{p}/{q}" for q in summaries.PER_TERM]
                assert sum(bool(re.search(regex, t)) for t in tags) == (p == phase), regex


def test_run_summary_text(tmp_path):
    x, y = regression_data(32)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        weights={"sparsity": "linear:0:1:10"},
        balancer="ema",
        log_dir=str(tmp_path),
        progress=False,
    )
    t.fit((x, y), steps=2, batch_size=16)
    (event,) = read_events(tmp_path).Tensors("run/summary")
    text = tf.make_ndarray(event.tensor_proto).item().decode()
    assert f"Termwise {termwise.__version__}" in text
    assert f"TensorFlow {tf.__version__}" in text and f"Keras {keras.__version__}" in text
    assert "**command**" in text
    rows = [line for line in text.splitlines() if line.startswith("| train |")]
    assert [row.split("|")[3].strip() for row in rows] == ["loss", "sparsity", "regularization"]
    assert rows[1].split("|")[4].strip() == "linear:0:1:10"
    assert rows[0].split("|")[5].strip() == t.balancers["train"].spec


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


# ---------------------------------------------------------------------------------------------
# Diagnostic images and their numbers, against closed-form gradients.


def two_paths():
    """pred = a(x) + b(x), two Dense(1) layers with fixed weights; the model also returns a(x)."""
    inputs = keras.Input((2,))
    a = keras.layers.Dense(
        1, name="a", kernel_initializer=keras.initializers.Constant(0.5), bias_initializer="ones"
    )(inputs)
    b = keras.layers.Dense(
        1, name="b", kernel_initializer=keras.initializers.Constant(-1.0), bias_initializer="zeros"
    )(inputs)
    return keras.Model(inputs, [keras.layers.Add()([a, b]), a])


class TwoTerms(Trainer):
    def compute_terms(self, batch, training):
        x, y = batch
        pred, a = self.model(x, training=training)
        return {"fit": tf.square(pred[:, 0] - y), "pull": tf.square(a[:, 0] - 3.0)}


def closed_form_gradients(x, y, pull_weight):
    """[2, 6] gradients (a.kernel, a.bias, b.kernel, b.bias) of fit and pull_weight * pull."""
    x = x.astype(np.float64)
    n = len(x)
    a = x @ [0.5, 0.5] + 1.0
    b = x @ [-1.0, -1.0]
    r = a + b - y  # d fit / d pred, halved
    q = a - 3.0
    fit = np.concatenate([2 / n * x.T @ r, [2 / n * r.sum()], 2 / n * x.T @ r, [2 / n * r.sum()]])
    pull = pull_weight * np.concatenate([2 / n * x.T @ q, [2 / n * q.sum()], np.zeros(3)])
    return np.stack([fit, pull])


def test_heatmaps_pairwise_cosines_and_layer_shares_match_closed_form(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 2)).astype("float32")
    y = rng.normal(size=16).astype("float32")
    t = TwoTerms(
        two_paths(),
        keras.optimizers.SGD(0.01),
        weights={"pull": 0.5},
        log_dir=str(tmp_path),
        grad_log_every=1,
        progress=False,
    )
    t.fit((x, y), steps=1, batch_size=16)  # the diagnostic step at the initial weights
    g = closed_form_gradients(x, y, 0.5)
    events = read_events(tmp_path)
    cosine = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
    ((step, value),) = series(events, "grad_cosine/fit~pull")
    assert step == 1 and value == pytest.approx(cosine, rel=1e-5)
    # Layer shares: |g_t,layer| / sum_t |g_t,layer|, layers a then b.
    norms = np.array([[np.linalg.norm(gt[:3]), np.linalg.norm(gt[3:])] for gt in g])
    (event,) = events.Tensors("term_layer_share/train")
    shares = tf.make_ndarray(event.tensor_proto)
    np.testing.assert_allclose(shares, norms / norms.sum(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(shares[:, 1], [1.0, 0.0])  # pull does not reach layer b
    labels = json.loads(events.SummaryMetadata("term_layer_share/train").summary_description)
    assert labels == {"terms": ["fit", "pull"], "layers": ["a", "b"]}
    (event,) = events.Tensors("grad_layer_norms/train")
    np.testing.assert_allclose(tf.make_ndarray(event.tensor_proto), norms, rtol=1e-5)
    for tag in ("images/grad_cosine/train", "images/term_layer_share/train"):
        (event,) = events.Tensors(tag)
        width, height = (int(v) for v in tf.make_ndarray(event.tensor_proto)[:2])
        assert width >= 300 and height >= 150, tag


def test_heatmap_image_draws_names_values_and_a_colour_bar():
    matrix = np.array([[np.nan, -0.5], [-0.5, np.nan]])
    image = summaries.heatmap_image(matrix, ["a", "b"], ["a", "b"], title="t", missing="")
    plain = summaries.heatmap_image(matrix, ["", ""], ["", ""], missing="")
    assert image.dtype == np.uint8 and image.shape[1] >= 300
    # -0.5 is a mid blue; the colour bar runs from red (+1) at the top to blue (-1).
    blue = summaries._colour(-0.5, -1.0, 1.0, summaries._DIVERGING)
    assert (np.abs(image.astype(int) - blue).sum(axis=-1) == 0).sum() > 2 * 40 * 20
    assert not np.array_equal(image[:, : plain.shape[1]], plain[: image.shape[0]])  # the text


def test_heatmap_title_is_not_cut_at_the_right_edge():
    # The layer-share title ends in the step; it was cut ("step 100" of step 1000).
    title = "generator: share of each layer's gradient norm, step 1000"
    image = summaries.heatmap_image(np.eye(2), ["a", "b"], ["c", "d"], title=title)
    ink = np.flatnonzero((image[:40].min(axis=-1) < 128).any(axis=0))  # the title's rows
    title_width = summaries._font(13).getbbox(title)[2]
    assert image.shape[1] > title_width and ink.max() < image.shape[1] - 4


def test_heatmaps_drawn_on_a_cached_frame_are_those_drawn_on_a_fresh_one():
    """The labels and colour bar are drawn once per layout and copied: drawing a map must not
    change the frame the next one is drawn on, and a map drawn after others (the cache holding
    their frames) must be the one drawn first, pixel for pixel."""
    rng = np.random.default_rng(0)
    rows, columns = ["encoder/dense", "decoder/dense_1", "out"], ["reconstruction", "kl"]
    maps = [rng.uniform(-1.2, 1.2, (3, 2)) for _ in range(2)] + [rng.uniform(0, 1, (2, 2))]
    maps[1][0, 1] = np.nan
    layouts = [
        (maps[0], rows, columns, {"title": "train: step 100"}),
        (maps[1], rows, columns, {"title": "train: step 200", "missing": ""}),
        (maps[2], columns, columns, {"low": 0.0, "diverging": False}),
        (maps[0], rows, columns, {"title": "a title wider than the grid and its colour bar " * 2}),
    ]
    summaries._heatmap_frame.cache_clear()
    fresh = []
    for matrix, r, c, options in layouts:
        fresh.append(summaries.heatmap_image(matrix, r, c, **options))
        summaries._heatmap_frame.cache_clear()
    for _ in range(2):  # every frame cached after the first pass
        for (matrix, r, c, options), expected in zip(layouts, fresh, strict=True):
            assert np.array_equal(summaries.heatmap_image(matrix, r, c, **options), expected)
    assert summaries._heatmap_frame.cache_info().hits >= len(layouts)
    # The cells show the values: the same layout with other values is another image.
    other = summaries.heatmap_image(maps[1], rows, columns, title="train: step 100")
    assert not np.array_equal(fresh[0], other)


def test_stamped_text_is_what_image_draw_text_draws():
    """A cell's text and a title are pasted through cached masks (`_stamp`, `_stamp_title`):
    on any background, in any ink, they must be `ImageDraw.text`'s pixels, and a title's size
    its whole text's, titles whose step changes included."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(3)
    font = summaries._font(13)
    texts = [f"{v:+.2f}" for v in rng.uniform(-1, 1, 20)] + ["n/a", "0.00", "reconstruction"]
    titles = [f"{p}: share of each layer's gradient norm, step {s}"
              for p in ("train", "generator", "d") for s in (0, 7, 100, 123456)]  # fmt: skip
    titles += ["kl: gradient cosines, step 1e3", "one", "a title that ends in a space "]
    for text in texts + titles:
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 256, 3)) if text in texts else (0, 0, 0)
        xy = (int(rng.integers(0, 20)), int(rng.integers(0, 12)))
        expected = Image.new("RGB", (420, 40), background)
        ImageDraw.Draw(expected).text(xy, text, fill=ink, font=font)
        ours = Image.new("RGB", (420, 40), background)
        for _ in range(2):  # the second time from the cache
            if text in texts:
                summaries._stamp(ours, xy, text, ink)
            else:
                summaries._stamp_title(ours, xy, text)
                assert summaries._title_extent(text) == summaries._extent(text), text
            assert np.array_equal(np.asarray(ours), np.asarray(expected)), text
            ours = Image.new("RGB", (420, 40), background)
    assert summaries._text_mask.cache_info().hits > 0


def _raw_events(directory):
    """Every summary value of a run's event files: (step, tag, metadata, tensor) as bytes."""
    from tensorboard.backend.event_processing import event_file_loader

    found = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith("events"):
            continue
        for event in event_file_loader.RawEventFileLoader(path).Load():
            from tensorboard.compat.proto import event_pb2

            event = event_pb2.Event.FromString(event)
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                found.append((event.step, value.tag, value.metadata.SerializeToString(),
                              tensor.dtype.str, tensor.shape, tensor.tobytes()))  # fmt: skip
    return sorted(found)


def test_events_are_those_tf_summary_ops_write(tmp_path):
    """The writer builds each event itself and appends it with one op (`_write_summary`): the
    events must hold what `tf.summary.scalar`, `tf.summary.write` and the custom-scalar layout
    write through TensorFlow's own summary ops: the same steps, tags, metadata and tensors."""
    from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

    norms = np.array([[0.3, 2.0, 1e-8], [1.7, 0.0, 1 / 3]])
    scalars = {"loss/a": 0.25, "loss/b": 1 / 3, "total/train": float("nan")}
    ours = summaries.SummaryWriter(str(tmp_path / "ours"), {"train": ["a", "b"]})
    ours.scalars(7, scalars)
    ours.layer_norms("train", ["a", "b"], ["l1", "l2", "l3"], norms, 9)
    ours.flush()

    theirs = tf.summary.create_file_writer(str(tmp_path / "theirs"))
    labels = json.dumps({"terms": ["a", "b"], "layers": ["l1", "l2", "l3"]})
    metadata = tf.compat.v1.SummaryMetadata(
        summary_description=labels,
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
            plugin_name="termwise_matrix", content=labels.encode()
        ),
    )
    with theirs.as_default():
        layout = custom_scalar_summary.pb(summaries.layout_proto(["train"]))
        tf.summary.experimental.write_raw_pb(layout.SerializeToString(), step=0)
        for tag, value in scalars.items():
            tf.summary.scalar(tag, value, step=7)
        for tag, value in (("term_layer_share/train", summaries.layer_shares(norms)),
                           ("grad_layer_norms/train", norms)):  # fmt: skip
            tf.summary.write(tag, tf.constant(value, tf.float32), step=9, metadata=metadata)
    theirs.flush()
    written = [e for e in _raw_events(tmp_path / "ours") if not e[1].startswith("images/")]
    assert written == _raw_events(tmp_path / "theirs")
    tags = {"loss/a", "grad_layer_norms/train", "custom_scalars__config__"}
    assert {e[1] for e in written} >= tags


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_decodes_to_the_pixels_it_encodes(channels):
    """`_png` writes the PNG format itself (no filter, zlib): Pillow's and TensorFlow's decoders
    must read back the same pixels, for every channel count, flat regions and noise alike."""
    from PIL import Image

    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (37, 23, channels)).astype(np.uint8)
    image[5:30, 2:20] = rng.integers(0, 256, channels)  # a run of one colour, as in a heatmap
    encoded = summaries._png(image)
    assert np.array_equal(tf.io.decode_png(encoded).numpy(), image)
    import io

    decoded = np.asarray(Image.open(io.BytesIO(encoded)))
    assert np.array_equal(decoded.reshape(image.shape), image)


def test_scalar_events_hold_the_tensor_tf_summary_scalar_writes():
    """Each scalar's tensor is built directly (not through `make_tensor_proto`): its bytes must
    be those of the float32 scalar tensor, rounding, overflow, NaN and -0.0 included."""
    from tensorboard.util import tensor_util

    for value in (0.5, 1 / 3, 1e-3, -2.7e38, 3.5e38, float("nan"), float("inf"), -0.0, 1e-46, 7):
        ours = summaries._float32_scalar(value).SerializeToString()
        with np.errstate(over="ignore"):  # 3.5e38 is beyond float32: inf, as the proto's
            theirs = tensor_util.make_tensor_proto(np.float32(value))
        assert ours == theirs.SerializeToString()


def test_layer_shares_sum_to_one_per_layer():
    norms = np.array([[3.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
    shares = summaries.layer_shares(norms)
    np.testing.assert_array_equal(shares[:, 0], [0.75, 0.25])
    assert np.isnan(shares[:, 1]).all()  # no gradient in that layer
    np.testing.assert_array_equal(shares[:, 2], [0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# Warnings, metrics and histograms.


def text_events(events, tag):
    return [(e.step, tf.make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(tag)]


def test_dominance_warning_is_written_as_text(tmp_path):
    x, y = regression_data(64)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        log_every=3,
        grad_log_every=2,
        progress=False,
    )
    t.fit((x, y), steps=6, batch_size=16)
    written = text_events(read_events(tmp_path), "warnings/dominance")
    assert written and written[0][0] == 6  # after 3 diagnostic steps in a row
    assert "'loss' dominates 'regularization'" in written[0][1]


class Fragile(Trainer):
    """A term that is NaN on batches whose first feature is above 1.5."""

    def compute_terms(self, batch, training):
        x, y = batch
        pred = self.model(x, training=training)
        bad = tf.reduce_any(x[:, 0] > 1.5)
        mse = tf.reduce_mean(tf.square(pred - y), axis=-1)
        return {"mse": tf.where(bad, tf.fill(tf.shape(mse), np.nan), mse)}


def test_skipped_steps_are_written_as_text(tmp_path):
    x, y = regression_data(64)
    x[:, 0] = np.clip(x[:, 0], -1.0, 1.0)
    x[8:16, 0] = 2.0  # the second batch of 8 of every pass
    t = Fragile(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        log_dir=str(tmp_path),
        log_every=4,
        on_nonfinite="skip",
        progress=False,
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 8 batches a pass
    t.fit(dataset, steps=8)
    assert t.skipped_steps == 1
    ((step, text),) = text_events(read_events(tmp_path), "warnings/nonfinite")
    assert step == 4 and text.startswith("1 step(s) after step 0 up to step 4 were skipped")


class WithMetric(Trainer):
    def compute_terms(self, batch, training):
        x, y = batch
        pred = self.model(x, training=training)
        self.add_metric("mean_abs_error", tf.reduce_mean(tf.abs(pred - y), axis=-1))
        return {"mse": tf.reduce_mean(tf.square(pred - y), axis=-1)}


def test_metrics_are_written_under_metric(tmp_path):
    x, y = regression_data(32)
    t = WithMetric(
        penalised_model(regularize=False), keras.optimizers.SGD(0.01), log_dir=str(tmp_path)
    )
    history = t.fit((x, y), steps=2, batch_size=16, validation_data=(x, y))
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    assert {"metric/mean_abs_error", "eval/mean_abs_error"} <= tags
    assert "mean_abs_error" not in tags
    assert "mean_abs_error" in history.history  # the History keeps Keras's names
    metrics = [m.name.tag for m in experiment_of(events).metric_infos]
    assert "eval/mean_abs_error" in metrics


def test_histograms_of_weights_and_term_gradients(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 2)).astype("float32")
    y = rng.normal(size=16).astype("float32")
    t = TwoTerms(
        two_paths(),
        keras.optimizers.SGD(0.0),  # the weights stay the initial ones
        log_dir=str(tmp_path),
        grad_log_every=1,
        histogram_every=2,
        progress=False,
    )
    t.fit((x, y), steps=2, batch_size=16)
    g = closed_form_gradients(x, y, 1.0)
    events = read_events(tmp_path)
    for i, term in enumerate(("fit", "pull")):
        (event,) = events.Tensors(f"histograms/grad/{term}")
        assert event.step == 2
        buckets = tf.make_ndarray(event.tensor_proto)  # [k, 3]: left, right, count
        assert buckets[:, 2].sum() == 6
        assert buckets[0, 0] == pytest.approx(g[i].min(), rel=1e-5, abs=1e-6)
        assert buckets[-1, 1] == pytest.approx(g[i].max(), rel=1e-5, abs=1e-6)
    (event,) = events.Tensors("histograms/weights/a/kernel")
    assert tf.make_ndarray(event.tensor_proto)[:, 2].sum() == 2


def test_histogram_every_must_be_a_multiple_of_grad_log_every():
    with pytest.raises(ValueError, match=r"^`histogram_every` \(3\) must be a multiple"):
        Trainer(penalised_model(), keras.optimizers.SGD(0.01), grad_log_every=2, histogram_every=3)
    with pytest.raises(ValueError, match=r"^`hparams_metrics` \('eval/x'\)"):
        Trainer(penalised_model(), keras.optimizers.SGD(0.01), hparams_metrics="eval/x")


def test_heatmaps_drawn_in_the_background_are_all_written_in_order_and_errors_surface(
    tmp_path, monkeypatch
):
    """The heatmaps are drawn on a background thread: after `flush` every one is in the event
    file at its step, and a drawing that fails is raised by `flush`, not lost."""
    writer = summaries.SummaryWriter(str(tmp_path / "ok"))
    for step in range(1, 6):
        writer.cosine_matrix("train", ["a", "b"], [[1.0, -0.5 + step / 10], [0.0, 1.0]], step)
    writer.flush()
    events = read_events(str(tmp_path / "ok"))
    assert [e.step for e in events.Tensors("images/grad_cosine/train")] == [1, 2, 3, 4, 5]
    cosines = series(events, "grad_cosine/a~b")
    assert [s for s, _ in cosines] == [1, 2, 3, 4, 5]
    assert np.allclose([v for _, v in cosines], [-0.4, -0.3, -0.2, -0.1, 0.0])

    def broken(*args, **kwargs):
        raise RuntimeError("no font")

    monkeypatch.setattr(summaries, "_draw", broken)
    failing = summaries.SummaryWriter(str(tmp_path / "broken"))
    failing.cosine_matrix("train", ["a", "b"], np.eye(2), 1)
    with pytest.raises(RuntimeError, match="no font"):
        failing.flush()


def test_every_write_runs_off_the_calling_thread_in_order_with_the_values_given(
    tmp_path, monkeypatch
):
    """Scalars, text and tensors were written by eager summary ops in the training loop's
    thread (15 to 20 ms per logged step of a VAE): they go to the writing thread, in order, and
    a value changed after the call is not what is written."""
    import threading

    threads = set()
    import_event = summaries._import_event

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return import_event(*args, **kwargs)

    monkeypatch.setattr(summaries, "_import_event", recording)
    writer = summaries.SummaryWriter(str(tmp_path), {"train": ["a"]})
    values = {"loss/a": 1.0}
    for step in range(1, 4):
        values["loss/a"] = float(step)
        writer.scalars(step, values)
        writer.text("note", f"step {step}", step)
    values["loss/a"] = -1.0  # after the calls: not written
    writer.flush()
    assert threads and all(name.startswith("termwise-summaries") for name in threads), threads
    events = read_events(str(tmp_path))
    assert series(events, "loss/a") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    notes = [(e.step, tf.make_ndarray(e.tensor_proto).item()) for e in events.Tensors("note")]
    assert notes == [(1, b"step 1"), (2, b"step 2"), (3, b"step 3")]
    term = read_events(str(tmp_path / summaries.term_run("a")))
    assert [v for _, v in series(term, "by_term/train/loss")] == [1.0, 2.0, 3.0]


def test_held_writes_wait_for_release_and_a_flush_writes_them_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(summaries, "HOLD_SECONDS", 60.0)
    writer = summaries.SummaryWriter(str(tmp_path))
    writer.scalars(1, {"loss/a": 1.0})
    writer.hold()
    writer.scalars(2, {"loss/a": 2.0})
    writer._pending[0].result(timeout=30)  # submitted before the hold: written
    assert not writer._pending[-1].done()
    writer.release()
    writer._pending[-1].result(timeout=30)
    writer.hold()
    writer.scalars(3, {"loss/a": 3.0})
    writer.flush()  # held: the flush lets it run, and does not wait 60 s
    assert series(read_events(str(tmp_path)), "loss/a") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    writer.close()


def test_a_fits_writes_run_during_its_calls_not_during_the_host_work_between(tmp_path, monkeypatch):
    # A write begun during the loop's host work between two calls took the GIL from it: 1 to
    # 2 ms more per 100 VAE steps. The writes submitted at a boundary now run during the next
    # call; those of the last boundary, when the fit flushes.
    import threading
    import time

    calling = threading.Event()
    original_concrete = Trainer._concrete

    def concrete(self, iterator, diagnostic):
        function = original_concrete(self, iterator, diagnostic)

        def call(*args):
            calling.set()
            try:
                time.sleep(0.2)  # a long call: the writes of the boundary before fit in it
                return function(*args)
            finally:
                calling.clear()

        return call

    monkeypatch.setattr(Trainer, "_concrete", concrete)
    runs = []  # (the step when submitted, whether a call was running when it began)
    original_submit = summaries.SummaryWriter._submit

    def submit(self, write):
        step = trainer.step

        def recorded():
            runs.append((step, calling.is_set()))
            write()

        original_submit(self, recorded)

    monkeypatch.setattr(summaries.SummaryWriter, "_submit", submit)
    x, y = regression_data(64)
    trainer = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        log_every=5,
        grad_log_every=5,
        progress=False,
        steps_per_execution=5,
    )
    trainer.fit((x, y), steps=30, batch_size=16)
    between = [in_call for step, in_call in runs if 0 < step < 30]
    assert len(between) >= 5 * 2 and all(between), str([r for r in runs if not r[1]])
    steps = [s for s, _ in series(read_events(str(tmp_path)), "total/train")]
    assert steps == [5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize(
    "images",
    [
        np.random.default_rng(0).random((2, 5, 7, 3)),  # floats in [0, 1]
        np.random.default_rng(1).normal(0.5, 1.0, (1, 4, 6, 1)),  # floats beyond: clipped
        np.random.default_rng(2).integers(0, 256, (3, 6, 5, 4)).astype(np.uint8),
    ],
)
def test_images_decode_to_what_tf_summary_image_writes(tmp_path, images):
    """The images are PNG-encoded by `summaries._png` and written as a raw summary: the events
    must hold what `tf.summary.image` writes (its metadata, width and height, the same pixels)."""
    ours = summaries.SummaryWriter(str(tmp_path / "ours"))
    ours.images("x", images, step=2, max_outputs=2)
    ours.flush()
    theirs = tf.summary.create_file_writer(str(tmp_path / "theirs"))
    with theirs.as_default(step=2):
        tf.summary.image("images/x", images, max_outputs=2)
    theirs.flush()
    (a,) = read_events(str(tmp_path / "ours")).Tensors("images/x")
    (b,) = read_events(str(tmp_path / "theirs")).Tensors("images/x")
    a, b = tf.make_ndarray(a.tensor_proto), tf.make_ndarray(b.tensor_proto)
    assert a.shape == b.shape and list(a[:2]) == list(b[:2])  # the count, width, height
    for ours_png, theirs_png in zip(a[2:], b[2:], strict=True):
        assert np.array_equal(tf.io.decode_png(ours_png), tf.io.decode_png(theirs_png))
    metadata = read_events(str(tmp_path / "ours")).SummaryMetadata("images/x")
    assert metadata.plugin_data.plugin_name == "images"
