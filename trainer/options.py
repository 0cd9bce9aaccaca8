"""The Trainer's arguments: their checks, and the phases they describe.

Each check raises `ValueError` naming the argument, the value received and what is allowed,
before anything is built (Sonnet's habit): "`optimizer['gen']` (None) must be a
keras.optimizers.Optimizer."
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from termwise.trainer import balancers as balancers_lib
from termwise.trainer import outputs as outputs_lib
from termwise.trainer import schedules

DEFAULT_PHASE = "train"
ON_NONFINITE = ("raise", "skip")

Weight = float | schedules.Schedule | Callable[[tf.Tensor], tf.Tensor] | str
BalancerArg = (
    balancers_lib.Balancer | str | Mapping[str, balancers_lib.Balancer | str | None] | None
)


@dataclasses.dataclass
class Phase:
    """One optimisation phase: its name, its optimizer, and (once built) its variables."""

    name: str
    optimizer: keras.optimizers.Optimizer
    variables: list = dataclasses.field(default_factory=list)


def as_weight(name: str, value) -> Callable[[tf.Tensor], tf.Tensor]:
    """Turns a weight given by the user into a function of the step."""
    if isinstance(value, str):
        try:
            return schedules.parse(value)
        except ValueError as error:
            raise ValueError(f"`weights[{name!r}]`: {error}") from None
    if isinstance(value, bool) or not (
        isinstance(value, (int, float, np.floating, np.integer)) or callable(value)
    ):
        raise ValueError(
            f"`weights[{name!r}]` ({value!r}) must be a number, a schedule (a callable of the "
            f"step, see termwise.schedules) or a schedule string such as 'linear:0:1:5000'."
        )
    if callable(value):
        return value
    return schedules.constant(float(value))


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster (0 when there is none)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", None) or 0)


def check_models(model) -> dict[str, keras.Model]:
    models = dict(model) if isinstance(model, Mapping) else {"": model}
    if not models:
        raise ValueError("`model` is an empty dict; give at least one Keras model.")
    for key, value in models.items():
        if not isinstance(value, keras.layers.Layer):
            where = f"`model[{key!r}]`" if key else "`model`"
            raise ValueError(f"{where} ({value!r}) must be a Keras model or layer.")
    return {(k or "main"): v for k, v in models.items()}


def make_phases(optimizer) -> dict[str, Phase]:
    if isinstance(optimizer, Mapping):
        if not optimizer:
            raise ValueError("`optimizer` is an empty dict; give one optimizer per phase.")
        items = list(optimizer.items())
    else:
        items = [(DEFAULT_PHASE, optimizer)]
    for name, opt in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Phase names (the keys of `optimizer`) must be strings: {name!r}.")
        if not isinstance(opt, keras.optimizers.Optimizer):
            where = "`optimizer`" if name == DEFAULT_PHASE else f"`optimizer[{name!r}]`"
            raise ValueError(f"{where} ({opt!r}) must be a keras.optimizers.Optimizer.")
    return {name: Phase(name, opt) for name, opt in items}


def check_loss(loss, model=None):
    """Checks `loss` (`termwise.trainer.outputs.check_loss`) and returns it.

    Args:
        loss: the Trainer's `loss` argument.
        model: the Trainer's model: when it is a built functional model, the keys and lists of
            `loss` are checked against its outputs too (otherwise when the step is traced).

    Raises:
        ValueError: naming the entry of `loss` and what is allowed, or a key naming no output
            (listing the outputs).
    """
    loss = outputs_lib.check_loss(loss)
    if model is not None and not isinstance(model, Mapping):
        outputs_lib.check_outputs(loss, model)
    return loss


def check_balancers(balancer, phases) -> dict[str, balancers_lib.Balancer]:
    if balancer is None:
        return {}
    if isinstance(balancer, Mapping):
        unknown = sorted(set(balancer) - set(phases))
        if unknown:
            raise ValueError(
                f"`balancer` names phases that do not exist: {unknown}; phases: {list(phases)}."
            )
        items = list(balancer.items())
    else:  # a string makes one balancer per phase; an object has only one phase's state
        items = [(name, balancer) for name in phases]
        if len(items) > 1 and not isinstance(balancer, str):
            raise ValueError(
                f"`balancer` ({balancer!r}): with several phases ({list(phases)}) give a "
                "string (one balancer per phase) or a dict of balancers keyed by phase name."
            )
    out, seen = {}, set()
    for name, value in items:
        where = "`balancer`" if not isinstance(balancer, Mapping) else f"`balancer[{name!r}]`"
        if isinstance(value, str):
            try:
                value = balancers_lib.parse(value)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if value is None:
            continue
        if not isinstance(value, balancers_lib.Balancer):
            raise ValueError(
                f"{where} ({value!r}) must be a termwise.balancers.Balancer, a balancer "
                "string such as 'pcgrad' or 'gradnorm:1.5', or None."
            )
        if id(value) in seen:
            raise ValueError(f"{where}: one balancer object serves only one phase.")
        seen.add(id(value))
        out[name] = value
    return out


def check_phase_steps(phase_steps, phases) -> dict[str, int]:
    """`phase_steps`: phase name to runs per step (a positive integer); {} when None."""
    if phase_steps is None:
        return {}
    if not isinstance(phase_steps, Mapping):
        raise ValueError(
            f"`phase_steps` ({phase_steps!r}) must be a dict of phase name to runs per step, "
            'e.g. {"critic": 5}.'
        )
    unknown = sorted(set(phase_steps) - set(phases))
    if unknown:
        raise ValueError(
            f"`phase_steps` names phases that do not exist: {unknown}; phases: {list(phases)}."
        )
    out = {}
    for name, runs in phase_steps.items():
        if isinstance(runs, bool) or not isinstance(runs, int) or runs <= 0:
            raise ValueError(f"`phase_steps[{name!r}]` ({runs!r}) must be a positive integer.")
        out[name] = runs
    return out
