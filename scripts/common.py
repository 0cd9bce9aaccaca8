"""The flags every Termwise script shares, and the way a script runs its one job.

A script defines its own flags, calls `define_flags(...)` with its defaults, adopts these
flags with `flags.adopt_module_key_flags(common)` (so `--help` lists them) and ends with
`run(job)`. A bad flag value, a bad
`--weights` item or an unreadable `--dataset` is one line on stderr naming the flag, exit
status 2, before any training. So are a `--log_dir` that another run holds or that cannot be
written, checkpoints in it that cannot be restored (none intact, or of another program: start
elsewhere, or from their weights with `--init_from`), a changed `--seed` on a resume, a
malformed `TF_CONFIG`, and training data that holds no batch.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silences file descriptor 2 while TensorFlow loads.

    TensorFlow's native code logs CUDA probing on CPU-only machines to stderr before its
    logger is set up, whatever TF_CPP_MIN_LOG_LEVEL says; the scripts' errors must be one
    line. Python-level errors are still raised (and printed) after the descriptor is back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with _quiet_native_stderr():
    import tensorflow as tf

    # Finds the devices (and prints their native log lines) here, without starting the eager
    # context: MultiWorkerMirroredStrategy must configure collective ops before it starts.
    tf.config.list_physical_devices()

from termwise.models.config import STRATEGIES, ConfigError, RunConfig, flag_message  # noqa: E402
from termwise.models.data import DatasetError  # noqa: E402
from termwise.trainer import balancers  # noqa: E402
from termwise.trainer.checkpoints import CheckpointError  # noqa: E402
from termwise.trainer.lock import RunDirectoryError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    log_dir: str,
    dataset: str,
    weights: str = "",
    log_every: int = 100,
    steps_per_execution: int = 10,
    validation_every: int | None = None,
) -> None:
    """Defines the common flags with this script's defaults.

    `validation_every` defaults to a tenth of `steps`, so that a default run's held-out curves
    have ten points beside the training ones.
    """
    flags.DEFINE_integer("steps", steps, "Total training steps (a rerun resumes up to this).")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size.")
    flags.DEFINE_float("learning_rate", learning_rate, "Adam learning rate.")
    # absl.logging defines --log_dir (for log files we never write): give it our meaning.
    FLAGS.set_default("log_dir", log_dir)
    FLAGS["log_dir"].help = "Run directory: TensorBoard events, checkpoints, images."
    flags.declare_key_flag("log_dir")
    flags.DEFINE_integer("seed", 0, "Random seed (model, data order, sampling).")
    flags.DEFINE_boolean("deterministic", False, "Deterministic TensorFlow ops (slower).")
    flags.DEFINE_string(
        "dataset", dataset, "Data: a built-in name, or a path (see the script's docstring)."
    )
    flags.DEFINE_multi_string(
        "weights",
        [weights] if weights else [],
        "Term weights, TERM=SCHEDULE, repeatable or comma-separated, e.g. "
        "kl=cyclical:0:1:2000:0.5. Schedules: constant:V, linear:START:END:STEPS[:BEGIN], "
        "cosine:..., exponential:START:RATE:STEPS, piecewise:V0:B1:V1..., "
        "logistic:END:MIDPOINT:STEEPNESS, cyclical:LOW:HIGH:PERIOD[:RATIO[:CYCLES]].",
    )
    flags.DEFINE_string(
        "balancer", None, "Loss balancer, one of: " + ", ".join(balancers.FORMS) + "."
    )
    flags.DEFINE_integer("log_every", log_every, "Steps between TensorBoard scalars (0: off).")
    flags.DEFINE_integer(
        "grad_log_every", 100, "Steps between per-term gradient diagnostics (0: off)."
    )
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (0: at the end).")
    flags.DEFINE_string(
        "init_from",
        None,
        "Start a new run from the model weights of a checkpoint (a .../ckpt-N prefix or a "
        "directory of them; those matching by place and shape), at step 0. A --log_dir that "
        "holds checkpoints resumes instead.",
    )
    flags.DEFINE_integer(
        "validation_every",
        max(steps // 10, 1) if validation_every is None else validation_every,
        "Steps between evaluations of the held-out split, logged as eval/... (0: only at the end).",
    )
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy.")
    flags.DEFINE_integer(
        "steps_per_execution", steps_per_execution, "Steps per compiled call (speed)."
    )
    flags.DEFINE_boolean("jit_compile", False, "Compile the step with XLA.")
    flags.DEFINE_boolean(
        "mixed_precision", False, "float16 (GPU) or bfloat16 (CPU) compute, float32 variables."
    )


def config_from_flags() -> RunConfig:
    """The RunConfig the common flags describe (checked: a bad value is a ConfigError)."""
    return RunConfig(
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        log_dir=FLAGS.log_dir,
        seed=FLAGS.seed,
        deterministic=FLAGS.deterministic,
        dataset=FLAGS.dataset,
        weights=list(FLAGS.weights),
        balancer=FLAGS.balancer,
        log_every=FLAGS.log_every,
        grad_log_every=FLAGS.grad_log_every,
        checkpoint_every=FLAGS.checkpoint_every,
        strategy=FLAGS.strategy,
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile,
        mixed_precision=FLAGS.mixed_precision,
        validation_every=FLAGS.validation_every,
        init_from=FLAGS.init_from,
    )


def _fail(message: str) -> None:
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as error:
        _fail(str(error))
    except SystemExit as done:  # absl exits 1 after printing --help; asking for help is no error
        sys.exit(0 if {"--help", "-h", "--helpshort", "--helpfull"} & set(argv) else done.code)


def run(job) -> None:
    """Runs `job()` as the program: one-line errors for bad input, absl logging to stderr."""

    def main(argv):
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
        logging.set_verbosity(logging.INFO)
        try:
            job()
        except ConfigError as error:
            _fail(str(error))
        except (CheckpointError, RunDirectoryError, DatasetError) as error:
            # Found before the first step too: a run directory in use or unusable, checkpoints
            # that cannot be restored, training data that holds no batch.
            _fail(flag_message(error))

    app.run(main, flags_parser=_parse_flags)
