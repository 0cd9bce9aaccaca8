"""scripts/train_lstm_kl.py end to end on tiny settings, resume, --help and one-line errors."""

import keras
import numpy as np
from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)

from termwise.models import lstm

TINY = ("--units=4", "--window=12", "--horizon=3", "--steps_per_execution=3", "--batch_size=16")


def test_trains_then_resumes_to_the_total(tmp_path):
    (out,) = run_script("train_lstm_kl", ["--steps=3", f"--log_dir={tmp_path}", *TINY])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out forecast MSE" in out.stdout and "vs persistence" in out.stdout
    assert "ratio" in out.stdout
    path = tmp_path / lstm.MODEL_FILES["forecaster"]
    assert f"forecaster: {path}" in out.stdout, out.stdout
    forecaster = keras.models.load_model(path)
    history = np.random.default_rng(0).normal(size=(3, 12, 1)).astype("float32")
    assert forecaster(history).shape == (3, 1)  # --window=12
    assert [layer.name for layer in forecaster.layers if layer.losses] == ["kl"]
    (again,) = run_script("train_lstm_kl", ["--steps=6", f"--log_dir={tmp_path}", *TINY])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Restored" in again.stderr and "step 6/6" in again.stdout


BAD_FLAGS = {  # flag: what its one-line error says
    "--steps=-5": "--steps (-5)",
    "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
    "--kl_target=gaussian:-1": "--kl_target ('gaussian:-1')",
}


def test_bad_flags_are_one_line_errors_and_help_lists_every_flag(tmp_path):
    errors, help_out = run_bad_flags_and_help("train_lstm_kl", BAD_FLAGS, tmp_path, TINY)
    for expected, out, log_dir in errors:
        assert_one_line_error(out, expected, log_dir)
    assert_help_lists(
        help_out,
        ("--units", "--window", "--horizon", "--column", "--kl_target"),
        default_text=(
            "(default: 'gaussian:0.5')",  # --kl_target
            "(default: \"['kl=0.01']\")",  # --weights
        ),
    )
