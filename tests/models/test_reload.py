"""The reference models round-trip through `.keras` files: saved here, loaded in a fresh process
that imports only `termwise`, with the same outputs, add_loss values and random streams."""

import os
import subprocess
import sys

import keras
import numpy as np

from termwise.models import cnn, gan, lstm, vae
from termwise.trainer import LossRecorder

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Loads every saved model in a process whose only Termwise import is `termwise` (which imports
# the reference models' modules, so that their layers are registered), calls each on its inputs
# under a LossRecorder, and writes its outputs, its add_loss values, and the next draws of its
# seed generators. It also lists the classes that `import termwise` alone registered.
LOAD = r"""
import importlib, inspect, pkgutil, sys
import numpy as np
import keras
import termwise
from termwise.trainer import LossRecorder

registered = {k: v for k, v in keras.saving.get_custom_objects().items()}
for path in sys.argv[1:]:
    inputs = np.load(path + ".inputs.npy")
    model = keras.models.load_model(path)
    training = path.endswith("vae.keras")  # the VAE's free bits act in training only
    with LossRecorder() as recorder:
        outputs = keras.tree.flatten(model(inputs, training=training))
    arrays = {f"output/{i}": np.asarray(o) for i, o in enumerate(outputs)}
    arrays.update({f"loss/{k}": np.asarray(v) for k, v in recorder.terms().items()})
    if hasattr(model, "sample_latents"):
        arrays["latents"] = model.sample_latents(3).numpy()
    arrays["class"] = np.asarray(f"{type(model).__module__}.{type(model).__name__}")
    np.savez(path + ".loaded.npz", **arrays)

# Every layer or model class the packages define, by the name `import termwise` registered.
import termwise.models
unregistered = []
for package in (termwise.models, termwise.losses):
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, keras.layers.Layer)):
                continue
            if obj.__module__ != module.__name__:
                continue
            key = f"termwise>{name}"
            if key not in registered or keras.saving.get_custom_objects().get(key) is not obj:
                unregistered.append(f"{module.__name__}.{name}")
print("unregistered:", ",".join(unregistered))
"""


def _fresh_process(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", LOAD, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def _models():
    """Each reference model, with its inputs and a random stream already advanced."""
    rng = np.random.default_rng(0)
    images = rng.random((5, 8, 8, 1)).astype("float32")
    history = rng.normal(size=(5, 12, 1)).astype("float32")
    latents = rng.normal(size=(5, 3)).astype("float32")
    autoencoder, encoder, decoder = vae.build_vae((8, 8, 1), latent_dim=3, free_bits=0.2, seed=4)
    autoencoder(images)  # the sample layer's seed generator moves past its initial state
    classifier = cnn.build_cnn((8, 8, 1), num_classes=4)
    penalized, _ = cnn.add_penalties(classifier, ("conv1", "conv2"), diversity_layer="features")
    generator, discriminator = gan.build_gan((8, 8, 1), latent_dim=3, width=4, drift=0.01, seed=5)
    generator.sample_latents(2)
    return {
        "vae": (autoencoder, images),
        "encoder": (encoder, images),
        "decoder": (decoder, latents),
        "forecaster": (lstm.build_lstm(12, units=4), history),
        "forecaster_bernoulli": (
            lstm.build_lstm(12, units=4, kl_target="bernoulli:0.3", name="bernoulli"),
            history,
        ),
        "classifier": (classifier, images),
        "penalized": (penalized, images),
        "generator": (generator, latents),
        "discriminator": (discriminator, images),
    }


def test_reference_models_reload_after_import_termwise_with_the_same_outputs(tmp_path):
    expected = {}
    for name, (model, inputs) in _models().items():
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        np.save(path + ".inputs.npy", inputs)
        with LossRecorder() as recorder:  # after saving: the stream the file holds goes on
            outputs = keras.tree.flatten(model(inputs, training=name == "vae"))
        arrays = {f"output/{i}": np.asarray(o) for i, o in enumerate(outputs)}
        arrays.update({f"loss/{k}": np.asarray(v) for k, v in recorder.terms().items()})
        if name == "generator":
            arrays["latents"] = model.sample_latents(3).numpy()
        expected[path] = (type(model), arrays)

    done = _fresh_process(*expected, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unregistered: \n" in done.stdout, done.stdout[-2000:]
    terms = {}
    for path, (cls, arrays) in expected.items():
        with np.load(path + ".loaded.npz") as loaded:
            assert str(loaded["class"]) == f"{cls.__module__}.{cls.__name__}"
            assert sorted(loaded.files) == sorted([*arrays, "class"]), path
            for key, value in arrays.items():
                np.testing.assert_allclose(loaded[key], value, rtol=1e-6, err_msg=f"{path} {key}")
        terms[os.path.basename(path)] = sorted(k for k in arrays if k.startswith("loss/"))
    assert terms["vae.keras"] == ["loss/kl"]
    assert terms["forecaster.keras"] == terms["forecaster_bernoulli.keras"] == ["loss/kl"]
    assert terms["penalized.keras"] == [
        "loss/diversity_features",
        "loss/sparsity_conv1",
        "loss/sparsity_conv2",
    ]
    assert terms["discriminator.keras"] == ["loss/drift"]
    assert terms["classifier.keras"] == terms["generator.keras"] == []
