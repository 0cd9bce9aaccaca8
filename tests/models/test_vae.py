"""The VAE's terms, its KL layer against the closed form, and its job on tiny settings."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise import losses
from termwise.models import vae
from termwise.models.config import ConfigError, RunConfig
from termwise.trainer.summaries import read_events, scalar_series


def test_kl_layer_adds_the_closed_form_kl_and_free_bits_in_training():
    mean = np.array([[0.5, -1.0], [0.0, 0.2]], "float32")
    log_var = np.array([[0.1, -0.3], [0.0, 0.4]], "float32")
    per_dim = 0.5 * (np.exp(log_var) + mean**2 - 1 - log_var)
    layer = vae.GaussianKL(free_bits=0.0)
    layer([mean, log_var])
    np.testing.assert_allclose(layer.losses[0], per_dim.sum(1), rtol=1e-6)
    floored = vae.GaussianKL(free_bits=0.3)
    floored([mean, log_var], training=True)
    expected = np.maximum(per_dim.mean(0), 0.3).sum()
    assert float(floored.losses[0]) == pytest.approx(expected, rel=1e-6)
    floored([mean, log_var], training=False)  # evaluation reports the true KL
    np.testing.assert_allclose(floored.losses[0], per_dim.sum(1), rtol=1e-6)


def test_terms_are_reconstruction_and_kl():
    model, encoder, decoder = vae.build_vae((8, 8, 1), latent_dim=3, seed=0)
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    t = vae.VAETrainer(model, keras.optimizers.Adam(1e-3), progress=False)
    assert t.build(x) == {"train": ("reconstruction", "kl")}
    result = t.evaluate(x, batch_size=4)
    mean, log_var = encoder(x)
    assert result["kl"] == pytest.approx(float(tf.reduce_mean(losses.gaussian_kl(mean, log_var))))


def test_mixed_precision_keeps_the_terms_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, _, _ = vae.build_vae((8, 8, 1), latent_dim=3, seed=0)
        x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
        t = vae.VAETrainer(model, keras.optimizers.Adam(1e-3), progress=False)
        logs = t.fit(x, steps=2, batch_size=4).last
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("sample").compute_dtype == "bfloat16"
    assert np.isfinite(logs["loss/reconstruction"]) and np.isfinite(logs["loss/kl"])


def test_convolutional_for_28x28():
    model, _, decoder = vae.build_vae((28, 28, 1), latent_dim=2)
    assert any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in decoder.layers)
    assert model.output_shape == (None, 28, 28, 1)


def test_job_trains_evaluates_and_writes_images(tmp_path):
    config = RunConfig(
        steps=20,
        batch_size=32,
        log_dir=str(tmp_path),
        log_every=10,
        steps_per_execution=5,
        progress=False,
        weights=["kl=linear:0:1:10"],
    )
    results = vae.train_and_evaluate(config, latent_dim=2, beta=2.0)
    assert results["negative_elbo"] == pytest.approx(results["reconstruction"] + results["kl"])
    # Digits have 64 pixels: the NLL of a barely trained model is well below 64 log 2.
    assert 0 < results["reconstruction"] < 64 * np.log(2)
    assert os.path.getsize(tmp_path / "samples.png") > 0
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    assert {
        "eval/negative_elbo",
        "eval/kl",
        "images/samples",
        "images/reconstructions",
        "loss/kl",
        "weight/kl",
    } <= tags
    # beta multiplies the scheduled weight: at the last logged step (20), 2 * schedule(19) = 2.
    weights = [v for _, v in scalar_series(events, "weight/kl")]
    assert weights[-1] == pytest.approx(2.0)


def test_job_rejects_unknown_weight_terms_before_training(tmp_path):
    config = RunConfig(steps=5, log_dir=str(tmp_path), weights=["klx=1"], progress=False)
    with pytest.raises(ConfigError, match=r"--weights names terms that do not exist: \['klx'\]"):
        vae.train_and_evaluate(config)
    assert not (tmp_path / "checkpoints").exists()
