"""The actions `Trainer.fit` runs at the loop's boundaries (see `trainer.loop`).

* `Diagnose`: on diagnostic steps, the gradient tags, the cosine heatmap, the layer shares and
  the dominance warning.
* `LogScalars`: at logged steps, the means of the per-step values since the last logged step,
  the shares of the total, the learning rates and the speed; to TensorBoard and the History.
* `Validate`: evaluates the validation data.
* `SaveCheckpoints`: saves a checkpoint.
* `ShowProgress`: a bar on a terminal, else one line per logged step.

Each reads the Trainer through a few public or documented hooks and the `LoopState`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import numpy as np

from termwise.trainer.loop import Action, LoopState
from termwise.trainer.step import (
    COSINE_MATRIX,
    EXAMPLES,
    GRADIENT_TAGS,
    GRADIENT_VALUES,
    LAYER_NORMS,
)


class Diagnose(Action):
    """Writes a diagnostic step's gradient tags and images; checks for dominance."""

    def __init__(self, trainer, every: int, history):
        self.trainer = trainer
        self.every = every
        self.history = history

    def due(self, loop: LoopState) -> bool:
        return loop.diagnostic

    def at_boundary(self, loop: LoopState) -> None:
        trainer = self.trainer
        outputs = loop.outputs
        scalars = {k: float(v) for k, v in outputs.items() if k.startswith(GRADIENT_TAGS)}
        matrices = _by_phase(outputs, COSINE_MATRIX)
        layer_norms = _by_phase(outputs, LAYER_NORMS)
        gradients = _by_phase(outputs, GRADIENT_VALUES)  # by term: with histogram_every only
        messages = []
        if trainer._dominance is not None:
            for phase, names in trainer.term_names.items():
                norms = {n: scalars[f"grad_norm/{n}"] for n in names}
                weights = {n: loop.logs.get(f"weight/{n}", 1.0) for n in names}
                messages += trainer._dominance.update(phase, norms, weights, loop.step)
        loop.logs.update(scalars)
        trainer._write_diagnostics(
            loop.step, scalars, matrices, layer_norms, gradients or None, messages
        )
        self.history.record(loop.step, scalars)


def _by_phase(outputs: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """The outputs `<prefix>/<phase>` as arrays, keyed by phase."""
    return {
        k.split("/", 1)[1]: np.asarray(v) for k, v in outputs.items() if k.startswith(prefix + "/")
    }


class LogScalars(Action):
    """At logged steps: the window's means, shares of the total, learning rates, speed."""

    def __init__(self, trainer, every: int, history):
        self.trainer = trainer
        self.every = every
        self.history = history
        self._last_time = time.perf_counter()
        self._last_step = 0
        self._skipped = 0

    def begin(self, loop: LoopState) -> None:
        self._last_time, self._last_step = time.perf_counter(), loop.start
        self._skipped = self.trainer.skipped_steps

    def at_boundary(self, loop: LoopState) -> None:
        trainer = self.trainer
        logs = trainer._window.means()
        trainer._window.reset()
        if not logs and loop.step == self._last_step:
            return
        examples = logs.pop(EXAMPLES, 0.0)  # per step
        for phase, names in trainer.term_names.items():
            total = logs.get(f"total/{phase}")
            for name in names:
                if total is not None and f"weighted/{name}" in logs:
                    logs[f"share/{name}"] = _ratio(logs[f"weighted/{name}"], total)
        logs.update(trainer._optimizer_logs())
        now = time.perf_counter()
        rate = (loop.step - self._last_step) / max(now - self._last_time, 1e-9)
        logs["perf/steps_per_sec"] = rate
        logs["perf/examples_per_sec"] = rate * examples
        skipped = 0
        if trainer.on_nonfinite == "skip":
            skipped = trainer.skipped_steps
            logs["nonfinite/skipped"] = float(skipped)
        loop.logs.update(logs)
        trainer._write(loop.step, logs)
        if skipped > self._skipped and trainer.writer is not None:
            trainer.writer.text(
                "warnings/nonfinite",
                f"{skipped - self._skipped} step(s) after step {self._last_step} up to step "
                f"{loop.step} were skipped: a term, a weight or the gradient was NaN or Inf "
                f"(on_nonfinite='skip'); {skipped} skipped in all.",
                loop.step,
            )
        self._skipped = skipped
        self._last_time, self._last_step = now, loop.step
        self.history.record(loop.step, logs)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


class Validate(Action):
    """Evaluates `data` and adds `eval/<name>` to the logs (and the History)."""

    def __init__(self, trainer, every: int, data, history):
        self.trainer = trainer
        self.every = every
        self.data = data
        self.history = history

    def at_boundary(self, loop: LoopState) -> None:
        results = self.trainer.evaluate(self.data)
        values = {f"eval/{k}": v for k, v in results.items()}
        loop.logs.update(values)
        self.history.record(loop.step, values)


class SaveCheckpoints(Action):
    """Saves a checkpoint every `every` steps and at the end."""

    def __init__(self, trainer, every: int):
        self.trainer = trainer
        self.every = every

    def at_boundary(self, loop: LoopState) -> None:
        self.trainer.save()


class ShowProgress(Action):
    """A progress bar on a terminal; else one line per logged step on standard output.

    Args:
        interactive: draw a bar (True), print lines (False), or decide from whether standard
            output is a terminal (None).
        every: the logged steps (the lines' cadence).
    """

    SHOWN = ("loss/", "total/", "eval/")

    def __init__(self, every: int, interactive: bool | None, min_interval: float = 0.5):
        if interactive is None:
            interactive = sys.stdout.isatty()
        self.interactive = interactive
        self.every = every
        self.min_interval = min_interval
        self._bar = None
        self._last_time = 0.0
        self._last_step = 0

    def _shown(self, logs: Mapping[str, float]) -> dict[str, float]:
        return {k: v for k, v in logs.items() if k.startswith(self.SHOWN)}

    def begin(self, loop: LoopState) -> None:
        self._last_time, self._last_step = time.perf_counter(), loop.start
        if self.interactive:
            import keras

            self._bar = keras.utils.Progbar(loop.end - loop.start, stateful_metrics=None)

    def after_call(self, loop: LoopState) -> None:
        if self._bar is not None and time.perf_counter() - self._last_time >= self.min_interval:
            self._show(loop, final=False)

    def at_boundary(self, loop: LoopState) -> None:
        if self._bar is None or loop.final:
            self._show(loop, final=loop.final)

    def _show(self, loop: LoopState, final: bool) -> None:
        now = time.perf_counter()
        shown = self._shown(loop.logs)
        if self._bar is not None:
            self._bar.stateful_metrics.update(shown)  # show current values, not averages
            self._bar.update(loop.step - loop.start, values=list(shown.items()), finalize=final)
        else:
            rate = (loop.step - self._last_step) / max(now - self._last_time, 1e-9)
            parts = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"step {loop.step}/{loop.end} ({rate:.1f} steps/s) {parts}".rstrip(), flush=True)
        self._last_time, self._last_step = now, loop.step
