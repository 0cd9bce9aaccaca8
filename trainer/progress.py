"""Progress reporting: a bar on an interactive terminal, absl log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import keras
from absl import logging

# Prefixes shown in the bar and the log lines (the rest stay in TensorBoard).
_SHOWN = ("loss/", "total/", "eval/")


def _shown(logs: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in logs.items() if k.startswith(_SHOWN)}


class Progress:
    """Reports training progress.

    Args:
        total: the global step at which this `fit` ends.
        start: the global step at which it starts.
        interactive: draw a bar (True), write log lines (False), or decide from whether
            standard output is a terminal (None).
        min_interval: seconds between bar refreshes.
    """

    def __init__(
        self, total: int, start: int, interactive: bool | None = None, min_interval: float = 0.5
    ):
        if interactive is None:
            interactive = sys.stdout.isatty()
        self.interactive = interactive
        self.total = total
        self.start = start
        self.min_interval = min_interval
        self._last_time = time.perf_counter()
        self._last_step = start
        self._bar = (
            keras.utils.Progbar(total - start, stateful_metrics=None) if interactive else None
        )

    def due(self) -> bool:
        """True when the bar is due for a refresh (always False without a bar)."""
        return self._bar is not None and time.perf_counter() - self._last_time >= self.min_interval

    def update(self, step: int, logs: Mapping[str, float], final: bool = False) -> None:
        """Shows the state at global `step`."""
        now = time.perf_counter()
        shown = _shown(logs)
        if self._bar is not None:
            self._bar.stateful_metrics.update(shown)  # show current values, not averages
            self._bar.update(step - self.start, values=list(shown.items()), finalize=final)
        else:
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            parts = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            logging.info("step %d/%d (%.1f steps/s) %s", step, self.total, rate, parts)
        self._last_time = now
        self._last_step = step
