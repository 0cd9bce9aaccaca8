"""scripts/train_gan.py end to end: a few steps, samples.png, --help and one-line flag errors."""

import os
import re

import tensorflow as tf
from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)

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
