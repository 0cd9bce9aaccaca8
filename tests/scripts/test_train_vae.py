"""scripts/train_vae.py end to end: a few steps, resume, --help and one-line flag errors."""

from script_checks import (
    assert_help_lists,
    assert_one_line_error,
    run_bad_flags_and_help,
    run_script,
)


def test_trains_then_resumes_to_the_total(tmp_path):
    (out,) = run_script(
        "train_vae", ["--steps=4", f"--log_dir={tmp_path}", "--steps_per_execution=2"]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out negative ELBO" in out.stdout
    assert f"tensorboard --logdir {tmp_path}" in out.stdout
    assert (tmp_path / "samples.png").exists()
    (again,) = run_script(
        "train_vae", ["--steps=6", f"--log_dir={tmp_path}", "--steps_per_execution=2"]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Restored" in again.stderr and "step 6/6" in again.stdout


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
