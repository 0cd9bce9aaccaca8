"""The install: one top-level import package, `termwise`, that research code cannot shadow.

The wheel is built from a copy of this checkout and installed into a folder of its own, so the
tests exercise what `pip install .` puts into site-packages, not the source tree.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_SKIPPED = ("build", "dist", "runs", "*.egg-info", "__pycache__", ".*")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds the project's wheel from a copy of the checkout; returns its path."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_SKIPPED))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (work / "dist").glob("termwise-*.whl")
    return path


def test_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(
            next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        ).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"termwise"}, tops
    assert top_level.split() == ["termwise"]
    # Every module of the three folders is inside the package (a subpackage missing from
    # setup.cfg's list would be left out of the wheel silently).
    for folder in ("trainer", "losses", "models"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__pycache__" in directory:
                continue
            for file in files:
                if file.endswith(".py"):
                    relative = os.path.relpath(os.path.join(directory, file), ROOT)
                    assert f"termwise/{relative}" in names, relative


LAB_FILES = {
    # A research repository's own modules, named as Termwise's folders are.
    "trainer.py": "raise ImportError('the lab trainer.py was imported')\n",
    "models.py": "raise ImportError('the lab models.py was imported')\n",
    "losses.py": textwrap.dedent(
        """
        import tensorflow as tf

        def mean_squared_error(y_true, y_pred):  # a batch mean: not what Termwise's returns
            return tf.reduce_mean(tf.square(y_true - y_pred))
        """
    ),
}

PROBE = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np

    import losses as lab_losses
    import termwise as tw
    from termwise.models import vae

    assert tw.losses is not lab_losses and tw.losses.mean_squared_error is not (
        lab_losses.mean_squared_error)
    x = np.ones((6, 2), "float32")
    y = np.zeros((6, 1), "float32")
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(inputs))
    trainer = tw.Trainer(model, keras.optimizers.SGD(0.0), loss=tw.losses.mean_squared_error,
                         progress=False)
    per_example = tw.losses.mean_squared_error(y, model(x))
    built = vae.build_vae((8, 8, 1), latent_dim=2)
    print(json.dumps({
        "termwise": tw.__file__,
        "per_example_shape": list(per_example.shape),
        "loss": trainer.evaluate((x, y))["loss"],
        "vae_outputs": list(built[0].output.shape),
        "everyday": sorted(n for n in ("Trainer", "schedules", "balancers", "losses")
                           if hasattr(tw, n)),
    }))
    """
)


def test_imports_from_a_directory_with_its_own_models_losses_and_trainer(wheel, tmp_path):
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lab = tmp_path / "lab"
    lab.mkdir()
    for name, text in LAB_FILES.items():
        (lab / name).write_text(text)
    (lab / "probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "probe.py"],
        cwd=lab,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["termwise"].startswith(str(site)), result["termwise"]
    assert result["per_example_shape"] == [6]  # Termwise's own per-example MSE
    assert result["loss"] == pytest.approx(4.0)  # (1 + 1 - 0)^2 with the kernel of ones
    assert result["vae_outputs"] == [None, 8, 8, 1]
    assert result["everyday"] == ["Trainer", "balancers", "losses", "schedules"]
