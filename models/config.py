"""What every reference job shares: its run options, their checks, and the run's set-up.

A script turns its flags into a `RunConfig` and calls one job
(`termwise.models.vae.train_and_evaluate`, ...). The job checks the config before any training;
a bad value is a `ConfigError` whose message names the flag, which the scripts print as one
line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import keras
import tensorflow as tf

from termwise.trainer import balancers, schedules

STRATEGIES = ("default", "mirrored", "multi_worker")

# Trainer arguments that are also flags: an error that names one names the flag.
_FLAG_NAMED = (
    "weights",
    "balancer",
    "log_every",
    "grad_log_every",
    "checkpoint_every",
    "steps_per_execution",
    "jit_compile",
    "batch_size",
    "steps",
    "validation_every",
)


# The Trainer's names for what the scripts call by a flag (the run directory holds the
# checkpoints: `<log_dir>/checkpoints`), longest first.
_RENAMED = (
    ("another `checkpoint_dir`", "another --log_dir"),
    ("`checkpoint_dir`", "--log_dir's checkpoint directory"),
    ("`log_dir`", "--log_dir"),
    ("`init_from`", "--init_from"),
    ("`seed`", "--seed"),
    ("`learning_rate`", "--learning_rate"),
)


class ConfigError(ValueError):
    """A bad option or input, found before any training: one line, naming the flag."""


def flag_message(error: BaseException | str) -> str:
    """An error's first line, with the Trainer's argument names as the scripts' flags."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = message or type(error).__name__
    for old, new in _RENAMED:
        message = message.replace(old, new)
    for name in _FLAG_NAMED:
        message = message.replace(f"`{name}`", f"--{name}")
    return message


@contextlib.contextmanager
def config_errors():
    """Turns the `ValueError`s raised inside into `ConfigError`s that name flags.

    Use it around a job's set-up (data, model, Trainer, `Trainer.build`), never around training,
    so that only errors in what the user gave become one-line messages.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(flag_message(error)) from error


def parse_weights(values: Iterable[str] | None) -> dict[str, str]:
    """Parses `--weights` values: `term=schedule`, repeated or comma-separated.

    Example: ["kl=cyclical:0:1:2000:0.5", "sparsity=0.1,regularization=linear:0:1:500"].

    Returns:
        Term name to schedule string (each checked with `termwise.schedules.parse`).

    Raises:
        ConfigError: naming --weights and the offending item.
    """
    weights: dict[str, str] = {}
    for value in values or ():
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, spec = item.partition("=")
            name, spec = name.strip(), spec.strip()
            if not sep or not name or not spec:
                raise ConfigError(
                    f"--weights item {item!r} must be TERM=SCHEDULE, e.g. kl=linear:0:1:2000."
                )
            if name in weights:
                raise ConfigError(f"--weights gives term {name!r} twice.")
            try:
                schedules.parse(spec)
            except ValueError as error:
                raise ConfigError(f"--weights {name}={spec}: {error}") from None
            weights[name] = spec
    return weights


@dataclasses.dataclass
class RunConfig:
    """The options every reference job shares (the scripts' common flags).

    Attributes mirror the flags of the same names; see `scripts/common.py` for their help.
    """

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    log_dir: str = "runs/run"
    seed: int = 0
    deterministic: bool = False
    dataset: str = "digits"
    weights: Mapping[str, str] = dataclasses.field(default_factory=dict)
    balancer: str | None = None
    log_every: int = 100
    grad_log_every: int = 100
    checkpoint_every: int = 1000
    strategy: str = "default"
    steps_per_execution: int = 10
    jit_compile: bool = False
    mixed_precision: bool = False
    progress: bool | None = None
    validation_every: int = 0
    init_from: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "steps_per_execution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name} ({value!r}) must be a positive integer.")
        for name in ("log_every", "grad_log_every", "checkpoint_every", "validation_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"--{name} ({value!r}) must be a non-negative integer (0 turns it off)."
                )
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate ({self.learning_rate!r}) must be positive.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"--strategy ({self.strategy!r}) must be one of {', '.join(STRATEGIES)}."
            )
        if not self.log_dir:
            raise ConfigError("--log_dir must not be empty.")
        if not isinstance(self.weights, Mapping):
            self.weights = parse_weights(self.weights)
        try:
            balancers.parse(self.balancer)
        except ValueError as error:
            raise ConfigError(f"--balancer: {error}") from None

    @property
    def checkpoint_dir(self) -> str:
        """Checkpoints live in the run directory, so rerunning a command resumes it."""
        return os.path.join(self.log_dir, "checkpoints")

    # The options that shape a run's results; the Trainer records the others it applies
    # (`optimizer`, `learning_rate`, `weights`, `balancer`, ...: `Trainer._hparam_values`), and
    # cadences and paths (log_every, log_dir, ...) are not hyperparameters.
    HPARAMS = (
        "steps",
        "batch_size",
        "seed",
        "deterministic",
        "dataset",
        "strategy",
        "mixed_precision",
    )

    def hparams(self) -> dict[str, object]:
        """The options for TensorBoard's HParams dashboard, each given once (see `HPARAMS`)."""
        return {k: getattr(self, k) for k in self.HPARAMS}

    def validation(self, data) -> dict:
        """`fit`'s validation arguments: `data` every `validation_every` steps (0: none)."""
        if not self.validation_every:
            return {}
        return {"validation_data": data, "validation_every": self.validation_every}


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy named by --strategy.

    * default: no distribution (one device).
    * mirrored: `MirroredStrategy` over every local GPU (or the CPU).
    * multi_worker: `MultiWorkerMirroredStrategy`; each worker's TF_CONFIG names the cluster.

    Raises:
        ConfigError: for an unknown name, or multi_worker without a valid TF_CONFIG
            (`check_tf_config`).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"--strategy ({name!r}) must be one of {', '.join(STRATEGIES)}.")


MULTI_WORKER_TASKS = ("chief", "worker")


def check_tf_config(text: str | None) -> dict:
    """Checks the TF_CONFIG of a `MultiWorkerMirroredStrategy` worker, before any work.

    TF_CONFIG is JSON: `{"cluster": {"chief": ["host:port"], "worker": ["host:port", ...]},
    "task": {"type": "worker", "index": 0}}`. Without a cluster, TensorFlow runs each worker
    as a lone chief (every worker writing the same run directory); a malformed one fails deep
    inside TensorFlow. Both are refused here.

    Returns:
        The parsed TF_CONFIG.

    Raises:
        ConfigError: one line naming TF_CONFIG and what is wrong.
    """
    see = "see the README's 'Scaling out' section"
    if not text or not text.strip():
        raise ConfigError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable (the cluster "
            f"and this worker's task); {see}."
        )
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"TF_CONFIG is not JSON ({error}); {see}.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object, got {type(config).__name__}; {see}.")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(
            'TF_CONFIG has no `cluster` (job name to its "host:port" addresses): without one '
            f"every worker would train alone, writing the same run directory; {see}."
        )
    for job, addresses in cluster.items():
        if job not in MULTI_WORKER_TASKS:
            raise ConfigError(
                f"TF_CONFIG cluster job {job!r} is not one of {', '.join(MULTI_WORKER_TASKS)} "
                "(what MultiWorkerMirroredStrategy runs)."
            )
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)
        ):
            raise ConfigError(
                f'TF_CONFIG cluster job {job!r} must list "host:port" addresses, got {addresses!r}.'
            )
    if "chief" in cluster and len(cluster["chief"]) != 1:
        raise ConfigError(
            f"TF_CONFIG cluster has {len(cluster['chief'])} chief addresses; at most one chief."
        )
    everyone = [a for addresses in cluster.values() for a in addresses]
    if len(set(everyone)) != len(everyone):
        raise ConfigError(f"TF_CONFIG cluster lists an address twice: {everyone}.")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(
            f"TF_CONFIG has no `task` with a `type` and an `index` (this worker's place in the "
            f"cluster), got {task!r}; {see}."
        )
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise ConfigError(
            f"TF_CONFIG task type {kind!r} is not a job of its cluster ({', '.join(cluster)})."
        )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(
            f"TF_CONFIG task index {index!r} is out of range: cluster job {kind!r} has "
            f"{len(cluster[kind])} address(es), indices 0 to {len(cluster[kind]) - 1}."
        )
    return config


def set_up(config: RunConfig) -> tf.distribute.Strategy:
    """Seeds, determinism and precision for a run; returns its strategy.

    `--deterministic` makes TensorFlow's ops deterministic (same seed, same numbers, at some
    cost in speed). `--mixed_precision` computes in float16 on a GPU (bfloat16 on a CPU) and
    keeps variables and losses in float32.
    """
    if config.strategy == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))  # before anything starts TensorFlow
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        keras.mixed_precision.set_global_policy(policy)
    return make_strategy(config.strategy)


def make_optimizer(config: RunConfig, learning_rate: float | None = None):
    """Adam at --learning_rate, wrapped in a loss-scale optimizer under float16."""
    optimizer = keras.optimizers.Adam(learning_rate or config.learning_rate)
    if keras.mixed_precision.global_policy().compute_dtype == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def trainer_options(config: RunConfig, strategy: tf.distribute.Strategy, **extra) -> dict:
    """The Trainer keyword arguments a RunConfig sets (pass the job's own as `extra`).

    `hparams` in `extra` are added to the config's own; any other key replaces the config's.
    """
    options = dict(
        weights=dict(config.weights),
        log_dir=config.log_dir,
        log_every=config.log_every,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        init_from=config.init_from or None,
        strategy=strategy,
        steps_per_execution=config.steps_per_execution,
        jit_compile=config.jit_compile,
        progress=config.progress,
        hparams=config.hparams(),
        balancer=config.balancer,
        grad_log_every=config.grad_log_every,
    )
    options["hparams"].update(extra.pop("hparams", {}))
    options.update(extra)
    return options


def check_known(flag: str, value: str, allowed: Sequence[str]) -> str:
    """Returns `value` if allowed, else a ConfigError naming the flag and the choices."""
    if value not in allowed:
        raise ConfigError(f"--{flag} ({value!r}) must be one of {', '.join(allowed)}.")
    return value
