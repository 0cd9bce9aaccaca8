"""scripts/train_cnn_sparsity.py end to end on tiny settings, --help and one-line errors."""

import keras
import numpy as np
from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)

from termwise.models import cnn


def test_trains_with_penalties_on_named_layers(tmp_path):
    (out,) = run_script(
        "train_cnn_sparsity",
        [
            "--steps=3",
            f"--log_dir={tmp_path}",
            "--steps_per_execution=3",
            "--batch_size=16",
            "--sparsity_layers=conv2,features",
            "--diversity_layer=logits",
        ],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out accuracy:" in out.stdout
    assert "below 1e-3: conv2 " in out.stdout and "features " in out.stdout
    assert (tmp_path / "checkpoints").exists()
    models = {}
    for name, file in cnn.MODEL_FILES.items():
        assert f"{name}: {tmp_path / file}" in out.stdout, out.stdout
        models[name] = keras.models.load_model(tmp_path / file)
    images = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    logits, *activations = models["penalized"](images)
    np.testing.assert_allclose(models["classifier"](images), logits, rtol=1e-6)  # one network
    assert logits.shape == (3, 10) and len(activations) == 2  # --sparsity_layers=conv2,features
    penalties = {layer.name for layer in models["penalized"].layers if layer.losses}
    assert penalties == {"sparsity_conv2", "sparsity_features", "diversity_logits"}


BAD_FLAGS = {  # flag: what its one-line error says
    "--steps=-5": "--steps (-5)",
    "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
    "--sparsity_layers=conv1,nosuch": "--sparsity_layers: 'nosuch' is not a layer",
}


def test_bad_flags_are_one_line_errors_and_help_lists_every_flag(tmp_path):
    errors, help_out = run_bad_flags_and_help("train_cnn_sparsity", BAD_FLAGS, tmp_path)
    for expected, out, log_dir in errors:
        assert_one_line_error(out, expected, log_dir)
    assert_help_lists(
        help_out,
        ("--sparsity_layers", "--sparsity_weight", "--diversity_layer", "--diversity_weight"),
        default_text=(
            "(default: 'conv1,conv2')",  # --sparsity_layers
            "(default: '2000')",  # --steps
        ),
    )
