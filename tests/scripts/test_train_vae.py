"""scripts/train_vae.py end to end: a few steps, resume, --help and one-line flag errors."""

import re

import keras
import numpy as np
from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)

from termwise.models import vae


def test_trains_then_resumes_to_the_total(tmp_path):
    (out,) = run_script(
        "train_vae", ["--steps=4", f"--log_dir={tmp_path}", "--steps_per_execution=2"]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out negative ELBO" in out.stdout
    score = re.search(
        r"^FID (\d+\.\d+) \(floor (\d+\.\d+)\): 1527 samples from the prior", out.stdout, re.M
    )
    assert score and float(score[1]) > float(score[2]) > 0, out.stdout
    assert (tmp_path / "fid_classifier.json").is_file()
    assert f"tensorboard --logdir {tmp_path}" in out.stdout
    assert (tmp_path / "samples.png").exists()
    assert_models_reload(out, tmp_path)
    (again,) = run_script(
        "train_vae", ["--steps=6", f"--log_dir={tmp_path}", "--steps_per_execution=2"]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Restored" in again.stderr and "step 6/6" in again.stdout
    assert "FID classifier loaded" in again.stderr  # the rerun does not retrain it


def assert_models_reload(out, log_dir):
    """vae.keras, encoder.keras and decoder.keras: printed, and one trained VAE when reloaded."""
    models = {}
    for name, file in vae.MODEL_FILES.items():
        assert f"{name}: {log_dir / file}" in out.stdout, out.stdout
        models[name] = keras.models.load_model(log_dir / file)
    for part in ("encoder", "decoder"):  # the VAE's parts are the trained encoder and decoder
        for a, b in zip(models["vae"].get_layer(part).weights, models[part].weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    z = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
    assert models["decoder"](z).shape == (3, 8, 8, 1)  # digits: 8x8 images, --latent_dim 16


BAD_FLAGS = {  # flag: what its one-line error says
    "--steps=-5": "--steps",
    "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
    "--weights=kl=linear:0:1": "--weights kl=linear:0:1",
    "--strategy=tpu": "--strategy",
    "--balancer=magic": "--balancer: Balancer 'magic': unknown balancer",
    "--dataset=/no/such.npz": "/no/such.npz",
}


def test_bad_flags_are_one_line_errors_and_help_lists_every_flag(tmp_path):
    errors, help_out = run_bad_flags_and_help("train_vae", BAD_FLAGS, tmp_path)
    for expected, out, log_dir in errors:
        assert_one_line_error(out, expected, log_dir)
    assert_help_lists(
        help_out, ("--latent_dim", "--free_bits", "--beta"), default_text="(default: '5000')"
    )
