"""The outer loop: compiled calls between boundaries, and the actions run at each boundary.

Orbit's split: an inner `run(num_steps)` (the compiled call, `trainer.step`) and a thin
controller that decides how far each call runs and, at each boundary, calls a list of actions
(TensorBoard scalars, diagnostics, validation, Keras callbacks, checkpoints, progress, the
preemption check). Each action is one small class (`trainer.actions`, `trainer.callbacks`,
`trainer.preemption`); adding one never touches the others.

A call runs at most `max_call` steps and always stops at the next multiple of every action's
cadence (and at the end), so where a call ends never changes what is logged or saved.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence


@dataclasses.dataclass
class LoopState:
    """What the actions see: where the loop is and what the last call returned.

    Attributes:
        start: the global step at which this `fit` began.
        end: the global step at which it ends unless stopped.
        step: the global step after the last call.
        outputs: the last call's outputs (a diagnostic call's gradient tags and matrices).
        diagnostic: whether the last call ended with a diagnostic step.
        logs: the latest values of everything logged so far in this `fit` (floats), which the
            actions add to and read (callbacks, progress, the returned History).
        final: whether this is the last boundary of the `fit` (its end, or a stop).
        stop_reason: why the loop stops early (a signal, a callback), or None.
        call_seconds: wall time of the last call.
    """

    start: int
    end: int
    step: int
    outputs: Mapping = dataclasses.field(default_factory=dict)
    diagnostic: bool = False
    logs: dict = dataclasses.field(default_factory=dict)
    final: bool = False
    stop_reason: str | None = None
    call_seconds: float = 0.0

    def request_stop(self, reason: str) -> None:
        """Ends the loop at the current step (the actions still run their final boundary)."""
        if self.stop_reason is None:
            self.stop_reason = reason


class Action:
    """Something the loop does: at the start, after every call, at boundaries, at the end.

    Attributes:
        every: the action runs `at_boundary` when the step is a multiple of this, and always at
            the final boundary; 0 runs it only at the final one. Its multiples end calls.
    """

    every: int = 0

    def begin(self, loop: LoopState) -> None:
        """Before the first call."""

    def after_call(self, loop: LoopState) -> None:
        """After every compiled call, before the boundary actions."""

    def at_boundary(self, loop: LoopState) -> None:
        """When `loop.step` is a multiple of `every`, or `loop.final`."""

    def end(self, loop: LoopState) -> None:
        """After the final boundary (also when the loop stops early)."""

    def due(self, loop: LoopState) -> bool:
        return loop.final or bool(self.every and loop.step % self.every == 0)


class CallSizer:
    """How many steps the next call runs: a fixed number, or grown until a call takes a while.

    With `fixed` None ("auto"), the first call runs one step and each next call runs twice as
    many as the last while calls stay shorter than `target_seconds` (up to `most`): on a small
    model the Python round trip per call costs as much as a step, so long calls run at the
    folded loop's speed, and a large model's calls stay short enough for a responsive bar and a
    prompt stop. Calls always end at boundaries, so this changes speed only.
    """

    def __init__(self, fixed: int | None, target_seconds: float = 0.2, most: int = 1000):
        self.fixed = fixed
        self.target_seconds = target_seconds
        self.most = most
        self._next = 1 if fixed is None else fixed

    def next(self) -> int:
        return self._next

    def observe(self, steps: int, seconds: float) -> None:
        if self.fixed is None and steps >= self._next and seconds < self.target_seconds:
            self._next = min(self._next * 2, self.most)


class Controller:
    """Runs compiled calls from `start` to `end`, calling the actions at each boundary.

    Args:
        run: `run(num_steps, diagnostic) -> outputs`, the compiled call; `outputs["step"]` is the
            global step after it (a call can end early: training halted, or a stop), and
            `outputs["seconds"]`, if there, the call's own time (else the time `run` took).
        actions: in the order they run at a boundary.
        start, end: global steps.
        sizer: the number of steps per call.
        diagnostic_every: the calls that end on a multiple of this end with a diagnostic step
            (0: none).
    """

    def __init__(
        self,
        run: Callable[[int, bool], Mapping],
        actions: Sequence[Action],
        *,
        start: int,
        end: int,
        sizer: CallSizer,
        diagnostic_every: int = 0,
    ):
        self._run = run
        self.actions = list(actions)
        self.sizer = sizer
        self.diagnostic_every = diagnostic_every
        self.state = LoopState(start=start, end=end, step=start)

    def _next_stop(self, step: int) -> int:
        cadences = [a.every for a in self.actions if a.every] + [self.diagnostic_every]
        boundaries = [(step // c + 1) * c for c in cadences if c]
        return min([self.state.end, *boundaries])

    def run(self) -> LoopState:
        state = self.state
        for action in self.actions:
            action.begin(state)
        while state.step < state.end and state.stop_reason is None:
            count = min(self.sizer.next(), self._next_stop(state.step) - state.step)
            target = state.step + count
            diagnostic = bool(self.diagnostic_every) and target % self.diagnostic_every == 0
            began = time.perf_counter()
            outputs = self._run(count, diagnostic)
            # The call's own time where the run says it (work done beside the call excluded).
            state.call_seconds = float(outputs.get("seconds", time.perf_counter() - began))
            reached = int(outputs["step"])
            self.sizer.observe(reached - state.step, state.call_seconds)
            state.step, state.outputs = reached, outputs
            state.diagnostic = diagnostic and reached == target
            if reached < target:
                state.request_stop(str(outputs.get("stop", "stopped")))
            for action in self.actions:
                action.after_call(state)
            state.final = state.step >= state.end or state.stop_reason is not None
            self._boundary(state)
        if not state.final:  # stopped before any call (a stop requested in `begin`)
            state.final = True
            self._boundary(state)
        for action in self.actions:
            action.end(state)
        return state

    def _boundary(self, state: LoopState) -> None:
        """Runs the due actions; a stop requested by one makes this the final boundary, and the
        actions not yet run at this step run as at any final boundary (the last step is logged
        and saved)."""
        ran = set()
        for index, action in enumerate(self.actions):
            if not state.final and state.stop_reason is not None:
                state.final = True
            if action.due(state):
                action.at_boundary(state)
                ran.add(index)
        if state.stop_reason is not None:
            state.final = True
            for index, action in enumerate(self.actions):
                if index not in ran and action.due(state):
                    action.at_boundary(state)
