"""Argument checks shared by the Trainer and the scripts.

Each check raises `ValueError` naming the argument, the value received and what is allowed, in
the form Model Garden uses: "`steps_per_execution` (0) must be a positive integer."
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """Returns `value` if it is an integer > 0, else raises `ValueError`."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"`{name}` ({value!r}) must be a positive integer.")
    return int(value)


def non_negative_int(name: str, value, *, zero_means: str = "") -> int:
    """Returns `value` if it is an integer >= 0, else raises `ValueError`."""
    if not _is_int(value) or value < 0:
        hint = f" (0 {zero_means})" if zero_means else ""
        raise ValueError(f"`{name}` ({value!r}) must be a non-negative integer{hint}.")
    return int(value)


def one_of(name: str, value, allowed: Iterable):
    """Returns `value` if it is one of `allowed`, else raises `ValueError`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}` ({value!r}) must be one of {', '.join(map(repr, allowed))}.")
    return value


def boolean(name: str, value) -> bool:
    """Returns `value` if it is a bool, else raises `ValueError`."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` ({value!r}) must be True or False.")
    return value
