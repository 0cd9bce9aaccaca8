"""Bad input: one test per row of the table in BUILD.md ("Bad input").

Through the API, a `ValueError` whose first line says what is wrong, raised before any update
and not wrapped in autograph's traceback text. Through the scripts (real subprocesses, run side
by side), one line on stderr, exit 2, nothing written to --log_dir.
"""

import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "trainer"))
from helpers import linear_model, regression_data, weights_of  # noqa: E402
from script_checks import run_script  # noqa: E402

from termwise import losses  # noqa: E402
from termwise.models.config import ConfigError, check_tf_config  # noqa: E402
from termwise.trainer import NonFiniteLossError, Trainer  # noqa: E402


def trainer(**kwargs):
    kwargs.setdefault("loss", losses.mean_squared_error)
    return Trainer(linear_model(), keras.optimizers.SGD(0.1), progress=False, **kwargs)


def assert_clean_value_error(call, first_line, trainer_=None):
    """`call()` raises a ValueError whose first line matches `first_line`, with no autograph
    text; a given Trainer took no step and changed no weight."""
    before = weights_of(trainer_.model) if trainer_ is not None else None
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert re.search(first_line, message.splitlines()[0]), message
    for wrapped in ("in user code", 'File "', "autograph", "Traceback"):
        assert wrapped not in message, message
    if trainer_ is not None:
        assert trainer_.step == 0
        for a, b in zip(before, weights_of(trainer_.model), strict=True):
            np.testing.assert_array_equal(a, b)
    return message


X, Y = regression_data(64, features=2)


# --- API rows ---------------------------------------------------------------------------


def test_api_x_alone_where_x_y_is_expected():
    t = trainer()
    assert_clean_value_error(lambda: t.fit(X, steps=1, batch_size=16), r"batch|\(x, y\)", t)


def test_api_a_dict_batch_where_x_y_is_expected():
    t = trainer()
    data = {"x": X, "y": Y}
    assert_clean_value_error(lambda: t.fit(data, steps=1, batch_size=16), r"batch|dict", t)


def test_api_labels_n_against_predictions_n_1():
    # Keras's rule, not an error: [n] labels are aligned in rank with [n, 1] predictions
    # (`squeeze_or_expand_to_same_rank`), never broadcast into an [n, n] term (the old 139
    # against 4.3). The value and one update equal those of [n, 1] labels bit for bit.
    flat, column = trainer(), trainer()
    assert Y.shape == (64, 1)
    value = flat.evaluate((X, Y[:, 0]))["loss"]
    assert value == column.evaluate((X, Y))["loss"]
    pred = column.model.predict(X, verbose=0)
    broadcast = float(np.mean(np.square(pred - Y[:, 0][None, :])))  # the [n, n] mistake
    assert np.isclose(value, float(np.mean(np.square(pred - Y))), rtol=1e-6)
    assert not np.isclose(value, broadcast, rtol=1e-3)
    batches = lambda y: tf.data.Dataset.from_tensor_slices((X, y)).batch(16)  # noqa: E731
    flat.fit(batches(Y[:, 0]), steps=1)
    column.fit(batches(Y), steps=1)
    for a, b in zip(weights_of(flat.model), weights_of(column.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_api_a_per_example_term_whose_leading_axis_is_not_the_batch():
    def pairs(y, p):  # [8, 2] for a batch of 16: the leading axis is not the batch
        return tf.reshape(tf.square(p - y), [-1, 2])

    t = trainer(loss=pairs)
    assert_clean_value_error(lambda: t.fit((X, Y), steps=1, batch_size=16), r"leading|batch", t)


def test_api_an_empty_dataset():
    t = trainer()
    assert_clean_value_error(
        lambda: t.fit((X[:0], Y[:0]), steps=1, batch_size=16), r"holds no batch", t
    )


def test_api_fewer_examples_than_one_batch():
    t = trainer()
    data = tf.data.Dataset.from_tensor_slices((X[:5], Y[:5])).batch(16, drop_remainder=True)
    assert_clean_value_error(lambda: t.fit(data, steps=1), r"holds no batch", t)


def test_api_a_weight_schedule_that_yields_nan():
    assert_clean_value_error(lambda: trainer(weights={"loss": "constant:nan"}), r"weights")


def test_api_sample_weights_of_the_wrong_shape():
    t = trainer()
    weights = np.ones((64, 3), "float32")
    assert_clean_value_error(
        lambda: t.fit((X, Y, weights), steps=1, batch_size=16), r"sample.weight", t
    )


def test_api_a_file_where_the_checkpoint_directory_should_be(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    assert_clean_value_error(
        lambda: trainer(checkpoint_dir=str(tmp_path / "checkpoints")), r"checkpoint_dir.*is a file"
    )
    assert (tmp_path / "checkpoints").read_text() == "not a directory"


def test_api_an_unwritable_log_dir():
    t = trainer(log_dir="/proc/termwise-run")  # not creatable, even by root
    assert_clean_value_error(lambda: t.fit((X, Y), steps=1, batch_size=16), r"log_dir", t)


class NaNWhen(Trainer):
    """Its `loss` term is NaN while `self.bad` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = tf.Variable(False)

    def compute_terms(self, batch, training):
        x, y = batch
        mse = losses.mean_squared_error(y, self.model(x, training=training))
        return {"loss": tf.where(self.bad, np.nan, 0.0) + mse}


def test_api_a_nonfinite_loss_error_is_not_sticky():
    t = NaNWhen(linear_model(), keras.optimizers.SGD(0.01), progress=False)
    t.bad.assign(True)
    with pytest.raises(NonFiniteLossError):
        t.fit((X, Y), steps=2, batch_size=16)
    assert t.step == 0
    t.bad.assign(False)
    history = t.fit((X, Y), steps=2, batch_size=16)
    assert t.step == 2 and np.isfinite(history.last["loss/loss"])


# --- TF_CONFIG (unit rows of check_tf_config; the scripts' rows are below) ---------------

CLUSTER = {"worker": ["localhost:2001", "localhost:2002"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"TF_CONFIG is not JSON"),
        ('{"cluster": {"worker": ["localhost:2001"]}}', r"TF_CONFIG has no `task`"),
        (
            '{"cluster": ' + str(CLUSTER).replace("'", '"') + ', "task": {"type": "worker", '
            '"index": 2}}',
            r"TF_CONFIG task index 2 is out of range",
        ),
        (
            '{"cluster": ' + str(CLUSTER).replace("'", '"') + ', "task": {"type": "chief", '
            '"index": 0}}',
            r"TF_CONFIG task type 'chief' is not a job of its cluster",
        ),
        ("{}", r"TF_CONFIG has no `cluster`"),
        ('{"task": {"type": "worker", "index": 0}}', r"TF_CONFIG has no `cluster`"),
        ("", r"needs the TF_CONFIG environment variable"),
    ],
)
def test_malformed_tf_config_is_one_line_naming_it(text, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_tf_config(text)
    assert len(str(caught.value).splitlines()) == 1


def test_a_valid_tf_config_passes():
    text = '{"cluster": {"worker": ["localhost:2001"]}, "task": {"type": "worker", "index": 0}}'
    assert check_tf_config(text)["task"]["index"] == 0


# --- script rows: one line on stderr, exit 2, nothing written to --log_dir ---------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    images = (load_digits().images / 16.0).astype("float32")
    nan, inf = images.copy(), images.copy()
    nan[3, 2, 2], inf[5, 1, 1] = np.nan, np.inf
    np.savez(root / "nan.npz", x=nan)
    np.savez(root / "inf.npz", x=inf)
    (root / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "file_log_dir").mkdir()
    (root / "file_log_dir" / "checkpoints").write_text("not a directory")
    return root


def test_script_rows(files, tmp_path):
    rows = {  # name: (flags, what the one line says, env)
        "nan_pixels": (
            [f"--dataset={files / 'nan.npz'}"],
            r"nan\.npz: expected finite pixel values, found 1 NaN or Inf",
            None,
        ),
        "inf_pixels": (
            [f"--dataset={files / 'inf.npz'}"],
            r"inf\.npz: expected finite pixel values, found 1 NaN or Inf",
            None,
        ),
        "random_bytes": ([f"--dataset={files / 'random.npz'}"], r"not a readable \.npz", None),
        "free_bits": (["--free_bits=-1"], r"--free_bits", None),
        "batch_size": (["--batch_size=5000"], r"--batch_size \(5000\) is larger", None),
        "constant_nan": (["--weights=kl=constant:nan"], r"--weights", None),
        "tf_config_json": (["--strategy=multi_worker"], r"TF_CONFIG is not JSON", "{oops"),
        "read_only_log_dir": ([], r"--log_dir", None),
        "file_for_checkpoints": ([], r"checkpoint.*is a file", None),
    }
    log_dirs = {name: tmp_path / name for name in rows}
    log_dirs["read_only_log_dir"] = "/proc/termwise-run"
    log_dirs["file_for_checkpoints"] = files / "file_log_dir"
    before = sorted(os.listdir(files / "file_log_dir"))
    names = list(rows)
    outs = []
    # The TF_CONFIG row needs its own environment: it runs after the rest.
    plain = [n for n in names if rows[n][2] is None]
    outs = dict(
        zip(
            plain,
            run_script(
                "train_vae",
                *([*rows[n][0], "--steps=2", f"--log_dir={log_dirs[n]}"] for n in plain),
            ),
            strict=True,
        )
    )
    for name in names:
        if rows[name][2] is not None:
            os.environ["TF_CONFIG"] = rows[name][2]
            try:
                (outs[name],) = run_script(
                    "train_vae", [*rows[name][0], "--steps=2", f"--log_dir={log_dirs[name]}"]
                )
            finally:
                del os.environ["TF_CONFIG"]
    wrong = []
    for name in names:
        out = outs[name]
        lines = out.stderr.strip().splitlines()
        if out.returncode != 2 or len(lines) != 1:
            wrong.append((name, out.returncode, out.stderr[-1500:]))
        elif not re.search(rows[name][1], lines[0]) or "allow_pickle" in lines[0]:
            wrong.append((name, lines[0]))
        elif name == "file_for_checkpoints":
            if sorted(os.listdir(files / "file_log_dir")) != before:
                wrong.append((name, "wrote", os.listdir(files / "file_log_dir")))
        elif name != "read_only_log_dir" and os.path.exists(log_dirs[name]):
            wrong.append((name, "wrote", os.listdir(log_dirs[name])))
    assert not wrong, wrong
