"""Errors as the user should read them: one first line, not through autograph's wrapping.

TensorFlow rewrites an exception raised while a `tf.function` is traced: its message becomes
"in user code:" followed by 10 to 20 lines of frames, and only then the original text. A check of
the user's input (a term of the wrong shape, a `weights` key naming no term) raised during the
trace reaches the user that way. `clean_errors()` wraps the Trainer's traces and compiled calls
and re-raises the original exception, whose first line says what is wrong.

A check that can only run in the graph (the batch size of a per-example term whose shape is not
static) fails as `tf.errors.InvalidArgumentError` with a message that starts with `MARKER`;
`clean_errors()` turns it into a `ValueError` with that message's first line.
"""

from __future__ import annotations

import contextlib
import re

import tensorflow as tf

# Messages of the Trainer's in-graph checks start with this (tf.debugging.assert_* messages).
MARKER = "termwise: "  # also `terms.ASSERTION_PREFIX`


def first_line(error: BaseException) -> str:
    """An error's first line without TensorFlow's `{{function_node ...}}` and `[Op:...]`."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\].*$", "", text)


class NonFiniteLossError(FloatingPointError):
    """A loss term (or a phase's gradient) became NaN or Inf; no update from it was applied."""


def original(error: BaseException) -> BaseException:
    """The exception autograph wrapped, or `error` itself when it is not a wrapper.

    Autograph raises a new exception of the same type whose message starts with "in user
    code:", with the original as its context; the original (which may itself have been
    raised from another error) is returned.
    """
    while (
        getattr(error, "ag_error_metadata", None) is not None
        and str(error).startswith("in user code:")
        and type(error.__context__) is type(error)
    ):
        error = error.__context__
    return error


def graph_check_message(error: tf.errors.OpError) -> str | None:
    """The first line of a failed Termwise graph check's message (without `MARKER`), or None."""
    text = error.message or ""
    start = text.find(MARKER)
    if start < 0:
        return None
    return text[start + len(MARKER) :].splitlines()[0].strip()


@contextlib.contextmanager
def clean_errors():
    """Re-raises autograph-wrapped exceptions as their originals, and graph checks as ValueError."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        from termwise.trainer import terms  # the leading-axis check gives its numbers too

        lead = terms.lead_error(error)
        if lead is not None:
            raise lead from None
        message = graph_check_message(error)
        if message is None:
            raise
        raise ValueError(message) from None
    except Exception as error:  # noqa: BLE001 - re-raised unchanged unless autograph wrapped it
        inner = original(error)
        if inner is error:
            raise
        raise inner.with_traceback(inner.__traceback__) from None
