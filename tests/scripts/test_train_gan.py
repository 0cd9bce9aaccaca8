"""scripts/train_gan.py end to end: a few steps, samples.png, --help and one-line flag errors."""

import os
import re

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)

from termwise.models import data, gan
from termwise.models import images as images_lib
from termwise.trainer import summaries


def test_trains_a_few_steps_and_writes_samples(tmp_path):
    """The defaults, and beside them (at once) WGAN-GP with 5 critic updates per step."""
    log_dir, critic_dir = tmp_path / "default", tmp_path / "critic"
    out, critic = run_script(
        "train_gan",
        ["--steps=3", f"--log_dir={log_dir}", "--steps_per_execution=2", "--sample_every=2"],
        ["--loss=wgan_gp", "--r1_gamma=0", "--n_critic=5", "--steps=3", f"--log_dir={critic_dir}"],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out at step 3: d_adversarial" in out.stdout
    for term in ("r1", "g_adversarial", "feature_matching"):
        assert f" {term} " in out.stdout
    assert (log_dir / "samples.png").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    assert (log_dir / "checkpoints").is_dir()
    # The FID at every sample step and at the end, with its floor and the classifier's accuracy.
    score = re.search(r"^FID (\d+\.\d+) \(floor (\d+\.\d+)\): 1527 samples", out.stdout, re.M)
    assert score and float(score[1]) > float(score[2]) > 0, out.stdout
    assert re.search(r"classifier of held-out accuracy 0\.9[5-9]", out.stdout), out.stdout
    events = summaries.read_events(str(log_dir))
    fids = summaries.scalar_series(events, "eval/fid")
    assert [step for step, _ in fids] == [2, 3]
    assert f"FID {fids[-1][1]:.3f} (floor {score[2]})" in out.stdout  # the last one printed
    floors = summaries.scalar_series(events, "eval/fid_floor")
    assert [step for step, _ in floors] == [2, 3] and floors[0][1] == floors[1][1]
    assert (log_dir / "fid_classifier.keras").is_file()
    assert (log_dir / "fid_classifier.json").is_file()
    for name in ("generator", "discriminator"):
        assert (log_dir / f"{name}.keras").is_file()
        assert f"{name}: {log_dir / f'{name}.keras'}" in out.stdout
    # --n_critic=5: the critic's optimizer advances 5 iterations per step, the generator's 1.
    assert critic.returncode == 0, critic.stderr[-2000:]
    assert "held-out at step 3: d_adversarial" in critic.stdout
    assert " gradient_penalty " in critic.stdout and " r1 " not in critic.stdout
    checkpoint = tf.train.load_checkpoint(str(critic_dir / "checkpoints"))
    iterations = "optimizer_{}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    assert checkpoint.get_tensor(iterations.format("discriminator")) == 15
    assert checkpoint.get_tensor(iterations.format("generator")) == 3


BAD_FLAGS = {  # flag: what its one-line error says
    "--steps=-5": "--steps (-5) must be a positive integer",
    "--weights=nosuch=1": "--weights names terms that do not exist: ['nosuch']",
    "--weights=r1=linear:0:1": "--weights r1=linear:0:1",
    "--n_critic=0": "--n_critic (0) must be a positive integer",
}
GAN_FLAGS = (
    "--loss",
    "--latent_dim",
    "--width",
    "--generator_norm",
    "--r1_gamma",
    "--gp_weight",
    "--feature_matching",
    "--drift",
    "--discriminator_learning_rate",
    "--ema_momentum",
    "--n_critic",
    "--sample_every",
)


def test_bad_flags_are_one_line_errors_and_help_lists_every_flag(tmp_path):
    errors, help_out = run_bad_flags_and_help("train_gan", BAD_FLAGS, tmp_path)
    for expected, out, log_dir in errors:
        assert_one_line_error(out, expected, log_dir)
    assert_help_lists(
        help_out,
        GAN_FLAGS,
        default_text=(
            "(default: 'nonsaturating')",  # --loss
            "(default: '0.1')",  # --r1_gamma
        ),
    )


def _checkpoint_generator(checkpoint_path, generator, averaged):
    """The generator's weights in a checkpoint: the raw ones (its optimizer's tracked copies) or
    the moving averages, found by building the same Adam(use_ema) on the same variables and
    reading where its averages sit in `optimizer.variables` (Keras's own order)."""
    reader = tf.train.load_checkpoint(checkpoint_path)
    key = "optimizer_generator/{}/{}/.ATTRIBUTES/VARIABLE_VALUE"
    if not averaged:
        return [
            reader.get_tensor(key.format("_trainable_variables", i))
            for i in range(len(generator.trainable_variables))
        ]
    optimizer = gan.gan_optimizer(1e-3, ema_momentum=0.5)
    optimizer.build(generator.trainable_variables)
    where = {id(v): i for i, v in enumerate(optimizer.variables)}
    return [
        reader.get_tensor(key.format("_variables", where[id(average)]))
        for average in optimizer._model_variables_moving_average
    ]


def _with_weights(generator, weights):
    for variable, value in zip(generator.trainable_variables, weights, strict=True):
        variable.assign(value)
    return np.asarray(generator(LATENTS, training=False))


LATENTS = gan.fixed_latents(32, seed=0)  # the sample grid's latents at --seed=0, --latent_dim=32


def test_a_split_run_resumes_exactly_and_its_files_hold_the_averaged_generator(tmp_path):
    """--deterministic --n_critic=2: 4 steps straight and 2 + 2 across two runs leave the same
    checkpoint, bit for bit (weights, both optimizers, the averages, the noise). generator.keras
    (reloaded here, in another process than the run's) holds the checkpoint's averaged weights,
    not the raw ones, and samples.png and the last TensorBoard `images/samples` are its samples'
    grid."""
    split = data.load_images("digits", seed=0)
    dataset = tmp_path / "digits.npz"
    np.savez(dataset, x=split.x_train[:400])  # no labels: no FID classifier to train
    common = [
        f"--dataset={dataset}",
        "--deterministic",
        "--n_critic=2",
        "--batch_size=32",
        "--width=8",
        "--ema_momentum=0.9",  # far enough from the raw weights after 4 steps to tell apart
        "--sample_every=2",
        "--steps_per_execution=1",
    ]
    straight, split_dir = tmp_path / "straight", tmp_path / "split"
    outs = run_script(
        "train_gan",
        [*common, "--steps=4", f"--log_dir={straight}"],
        [*common, "--steps=2", f"--log_dir={split_dir}"],
    )
    (resumed,) = run_script("train_gan", [*common, "--steps=4", f"--log_dir={split_dir}"])
    for out in (*outs, resumed):
        assert out.returncode == 0, (out.args[2:], out.stderr[-2000:])
    assert "FID: not measured" in resumed.stdout

    paths = [tf.train.latest_checkpoint(str(d / "checkpoints")) for d in (straight, split_dir)]
    assert [os.path.basename(p) for p in paths] == ["ckpt-4", "ckpt-4"]
    readers = [tf.train.load_checkpoint(p) for p in paths]
    keys = sorted(readers[0].get_variable_to_shape_map())
    assert keys == sorted(readers[1].get_variable_to_shape_map())
    dtypes = readers[0].get_variable_to_dtype_map()
    for key in keys:  # all but the object graph and the data iterator's (variant) state
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH" and dtypes[key] != tf.variant:
            a, b = (np.asarray(r.get_tensor(key)) for r in readers)
            assert a.dtype == b.dtype and np.array_equal(a, b), key
    iterations = "optimizer_{}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    assert readers[1].get_tensor(iterations.format("discriminator")) == 8
    assert readers[1].get_tensor(iterations.format("generator")) == 4

    for run_dir, path in zip((straight, split_dir), paths, strict=True):
        loaded = keras.models.load_model(str(run_dir / gan.GENERATOR_FILE))
        saved = [np.asarray(v) for v in loaded.trainable_variables]
        averages = _checkpoint_generator(path, loaded, averaged=True)
        raw = _checkpoint_generator(path, loaded, averaged=False)
        assert all(np.array_equal(a, b) for a, b in zip(saved, averages, strict=True))
        assert not any(np.array_equal(a, b) for a, b in zip(saved, raw, strict=True))
        samples = np.asarray(loaded(LATENTS, training=False))
        raw_samples = _with_weights(loaded, raw)
        assert np.array_equal(samples, _with_weights(loaded, averages))

        def grid(images):
            return images_lib.grid(images, columns=8, scale=4)

        def png_pixels(images):  # save_png's 8 bits
            return (np.clip(grid(images), 0, 1) * 255).round().astype(np.uint8)[..., 0]

        def board_pixels(images):  # tf.summary.image's 8 bits (x * 255.5, truncated)
            return tf.image.convert_image_dtype(grid(images), tf.uint8, saturate=True)[..., 0]

        assert not np.array_equal(png_pixels(samples), png_pixels(raw_samples))
        png = np.asarray(Image.open(run_dir / "samples.png"))
        assert np.array_equal(png, png_pixels(samples))
        events = summaries.read_events(str(run_dir)).Tensors("images/samples")
        assert [e.step for e in events] == [2, 4]
        encoded = tf.make_ndarray(events[-1].tensor_proto)[2]  # width, height, then the PNG
        board = tf.io.decode_png(encoded).numpy()[..., 0]
        assert np.array_equal(board, board_pixels(samples))
        assert not np.array_equal(board, board_pixels(raw_samples))
