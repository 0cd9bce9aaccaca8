"""Weights as pure functions of the step, evaluated inside the compiled step.

A schedule is a callable `step -> float32 scalar tensor` (Optax's shape of a schedule). The step
is the global step *before* the update it weighs: the first update uses `schedule(0)`. Every
schedule here is built from TensorFlow ops on the step, so a changing weight never retraces the
step and works under `jit_compile`. Each carries `spec`, the string that `parse` turns back into
it, which is what TensorBoard's hparams plugin shows.

Accepted strings (`parse`), numbers in any float notation:

    constant:V
    linear:START:END:STEPS[:BEGIN]
    cosine:START:END:STEPS[:BEGIN]
    exponential:START:RATE:STEPS
    piecewise:V0:B1:V1[:B2:V2 ...]
    logistic:END:MIDPOINT:STEEPNESS
    cyclical:LOW:HIGH:PERIOD[:RATIO[:CYCLES]]

A bare number ("0.5") is `constant:0.5`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "cyclical",
    "exponential",
    "linear",
    "logistic",
    "parse",
    "piecewise",
    "FORMS",
]

FORMS = (
    "constant:V",
    "linear:START:END:STEPS[:BEGIN]",
    "cosine:START:END:STEPS[:BEGIN]",
    "exponential:START:RATE:STEPS",
    "piecewise:V0:B1:V1[:B2:V2 ...]",
    "logistic:END:MIDPOINT:STEEPNESS",
    "cyclical:LOW:HIGH:PERIOD[:RATIO[:CYCLES]]",
)


class Schedule:
    """A weight as a function of the step, with the spec string that rebuilds it.

    Args:
        fn: maps a float32 scalar step tensor to a scalar tensor.
        spec: the `parse` string of this schedule.
    """

    def __init__(self, fn: Callable[[tf.Tensor], tf.Tensor], spec: str):
        self._fn = fn
        self.spec = spec

    def __call__(self, step) -> tf.Tensor:
        step = tf.cast(tf.convert_to_tensor(step), tf.float32)
        return tf.cast(self._fn(step), tf.float32)

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"


def _number(value) -> str:
    return f"{value:g}"


def _check_steps(name: str, steps) -> None:
    if not isinstance(steps, (int, float)) or steps <= 0:
        raise ValueError(f"`{name}` ({steps!r}) must be a positive number of steps.")


def _progress(step: tf.Tensor, steps: float, begin: float) -> tf.Tensor:
    """Fraction of [begin, begin + steps] elapsed, clipped to [0, 1]."""
    return tf.clip_by_value((step - begin) / float(steps), 0.0, 1.0)


def constant(value: float) -> Schedule:
    """w(t) = value.

    Raises:
        ValueError: for a value that is NaN or infinite (every loss it weighs would be NaN).
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"constant({value!r}): a weight must be a finite number.")
    return Schedule(lambda step: tf.constant(value), f"constant:{_number(value)}")


def linear(start: float, end: float, steps: float, begin: float = 0) -> Schedule:
    """Linear ramp: w(t) = start + (end - start) * clip((t - begin) / steps, 0, 1).

    The KL warm-up of Bowman et al. (2016), "Generating Sentences from a Continuous Space", in its
    linear form: `linear(0, 1, 5000)`.
    """
    _check_steps("steps", steps)
    spec = f"linear:{_number(start)}:{_number(end)}:{_number(steps)}"
    if begin:
        spec += f":{_number(begin)}"
    return Schedule(lambda step: start + (end - start) * _progress(step, steps, begin), spec)


def cosine(start: float, end: float, steps: float, begin: float = 0) -> Schedule:
    """Half-cosine from start to end (Loshchilov & Hutter 2017, SGDR, one cycle).

    w(t) = end + (start - end) * (1 + cos(pi * p)) / 2,  p = clip((t - begin) / steps, 0, 1).
    """
    _check_steps("steps", steps)
    spec = f"cosine:{_number(start)}:{_number(end)}:{_number(steps)}"
    if begin:
        spec += f":{_number(begin)}"

    def fn(step):
        p = _progress(step, steps, begin)
        return end + (start - end) * 0.5 * (1.0 + tf.cos(math.pi * p))

    return Schedule(fn, spec)


def exponential(start: float, rate: float, steps: float) -> Schedule:
    """Exponential decay (or growth): w(t) = start * rate ** (t / steps)."""
    _check_steps("steps", steps)
    if rate <= 0:
        raise ValueError(f"`rate` ({rate!r}) must be positive.")
    spec = f"exponential:{_number(start)}:{_number(rate)}:{_number(steps)}"
    log_rate = math.log(rate)
    return Schedule(lambda step: start * tf.exp(log_rate * step / float(steps)), spec)


def piecewise(values: Sequence[float], boundaries: Sequence[float]) -> Schedule:
    """Piecewise constant: values[0] before boundaries[0], values[i] from boundaries[i - 1] on.

    w(t) = values[k] where k = #{i : t >= boundaries[i]}.

    Raises:
        ValueError: unless there is one more value than boundaries, and the boundaries increase.
    """
    values, boundaries = [float(v) for v in values], [float(b) for b in boundaries]
    if len(values) != len(boundaries) + 1 or not boundaries:
        raise ValueError(
            f"`values` ({values}) must have exactly one more entry than `boundaries` "
            f"({boundaries}), and there must be at least one boundary."
        )
    if any(b <= a for a, b in itertools.pairwise(boundaries)):
        raise ValueError(f"`boundaries` ({boundaries}) must be strictly increasing.")
    parts = [_number(values[0])]
    for b, v in zip(boundaries, values[1:], strict=True):
        parts += [_number(b), _number(v)]
    jumps = [b - a for a, b in itertools.pairwise(values)]

    def fn(step):
        out = tf.constant(values[0])
        for boundary, jump in zip(boundaries, jumps, strict=True):
            out += jump * tf.cast(step >= boundary, tf.float32)
        return out

    return Schedule(fn, "piecewise:" + ":".join(parts))


def logistic(end: float, midpoint: float, steepness: float) -> Schedule:
    """Logistic warm-up of Bowman et al. (2016): w(t) = end / (1 + exp(-k (t - midpoint))).

    Args:
        end: the weight it tends to.
        midpoint: the step at which it reaches end / 2.
        steepness: k > 0; it rises from 12% to 88% of `end` within 4 / k steps of the midpoint.
    """
    if steepness <= 0:
        raise ValueError(f"`steepness` ({steepness!r}) must be positive.")
    spec = f"logistic:{_number(end)}:{_number(midpoint)}:{_number(steepness)}"
    return Schedule(lambda step: end * tf.sigmoid(steepness * (step - midpoint)), spec)


def cyclical(
    low: float, high: float, period: float, ratio: float = 0.5, cycles: int | None = None
) -> Schedule:
    """Cyclical annealing of Fu et al. (2019), "Cyclical Annealing Schedule", NAACL.

    Training of T steps is split into M cycles of `period` = T / M steps. Within a cycle the
    weight rises linearly from `low` to `high` over the first `ratio` (R) of the cycle, then
    holds `high`::

        tau(t) = (t mod period) / period
        w(t)   = low + (high - low) * min(1, tau / R)

    Args:
        low, high: the weight at the start of each cycle, and its plateau.
        period: steps per cycle (T / M).
        ratio: R in (0, 1], the fraction of each cycle spent rising.
        cycles: M; after M cycles the weight stays at `high`. None repeats forever.
    """
    _check_steps("period", period)
    if not 0 < ratio <= 1:
        raise ValueError(f"`ratio` ({ratio!r}) must be in (0, 1].")
    if cycles is not None and (not float(cycles).is_integer() or cycles <= 0):
        raise ValueError(f"`cycles` ({cycles!r}) must be a positive integer or None.")
    spec = f"cyclical:{_number(low)}:{_number(high)}:{_number(period)}:{_number(ratio)}"
    if cycles is not None:
        spec += f":{int(cycles)}"

    def fn(step):
        tau = tf.math.floormod(step, float(period)) / float(period)
        rise = tf.minimum(1.0, tau / ratio)
        if cycles is not None:
            rise = tf.where(step >= float(period) * cycles, 1.0, rise)
        return low + (high - low) * rise

    return Schedule(fn, spec)


# name: (builder, fewest numbers, most numbers)
_BUILDERS = {
    "constant": (constant, 1, 1),
    "linear": (linear, 3, 4),
    "cosine": (cosine, 3, 4),
    "exponential": (exponential, 3, 3),
    "logistic": (logistic, 3, 3),
    "cyclical": (cyclical, 3, 5),
}


def parse(spec: str | float) -> Schedule:
    """Builds a schedule from its string form, such as "linear:0:1:5000" (see `FORMS`).

    Raises:
        ValueError: naming the string and listing the accepted forms.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec):
            raise ValueError(f"Schedule {spec!r} is not a finite number: a weight must be finite.")
        return constant(spec)
    if not isinstance(spec, str):
        raise ValueError(f"A schedule must be a string such as 'linear:0:1:5000', got {spec!r}.")
    help_text = "accepted forms: " + ", ".join(FORMS)
    name, *fields = spec.strip().split(":")
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        raise ValueError(
            f"Schedule {spec!r} has a field that is not a number; {help_text}."
        ) from None
    for field in fields or [name]:
        try:
            value = float(field)
        except ValueError:
            continue
        if not math.isfinite(value):  # a NaN or Inf weight makes every step's loss NaN
            raise ValueError(
                f"Schedule {spec!r} has a value that is not finite ({field}): schedules take "
                f"finite numbers; {help_text}."
            )
    if not fields:
        try:
            return constant(float(name))
        except ValueError:
            pass
    try:
        if name == "piecewise":
            if len(numbers) < 3 or len(numbers) % 2 == 0:
                raise ValueError("piecewise needs V0:B1:V1[:B2:V2 ...]")
            return piecewise(numbers[0::2], numbers[1::2])
        if name not in _BUILDERS:
            raise ValueError(f"unknown schedule {name!r}")
        builder, least, most = _BUILDERS[name]
        if not least <= len(numbers) <= most:
            raise ValueError(f"{name} takes {least} to {most} numbers, got {len(numbers)}")
        return builder(*numbers)
    except ValueError as error:
        raise ValueError(f"Schedule {spec!r}: {error}; {help_text}.") from None
