"""Keras callbacks in `Trainer.fit`, and the `History` it returns.

`fit(..., callbacks=[...])` drives them through `keras.callbacks.CallbackList`, as
`keras.Model.fit` does:

* `on_train_begin` / `on_train_end` around the whole `fit`;
* `on_epoch_begin` / `on_epoch_end`: an epoch is one pass over the data when its length is
  known, else `validation_every` steps (else the whole `fit`); epoch numbers count from the
  global step, so a resumed run continues them;
* `on_train_batch_end(batch, logs)` at the end of each compiled call, with its last step's
  values (a call runs several steps; `batch` is the index in the epoch of that last step);
* `model.stop_training = True` (set by `EarlyStopping`, `TerminateOnNaN`, ...) ends `fit` after
  the call in flight: the final boundary still logs and saves.

What a callback can monitor: every key of the logs, `loss/<term>`, `weight/<term>`,
`weighted/<term>`, `share/<term>`, `total/<phase>`, the metrics, `optimizer/<phase>/
learning_rate`, `perf/...`, after a validation `eval/<term>` and `eval/total`, and on
diagnostic steps `grad_norm/<term>`, `grad_cosine/<term>`, ...; plus Keras's own names for a
single-phase trainer: `loss` (its total) and `val_loss` (`eval/total`), so `EarlyStopping()`
and `ReduceLROnPlateau()` work with their defaults. At an epoch's end the per-step values are
their means over the epoch, as Keras reports them; `eval/...` are the epoch end's validation.

The model the callbacks see (`callback.model`) is the Trainer's model (for a dict of models, a
view that gets and sets all their weights); its `optimizer` is the single phase's optimizer,
so `ReduceLROnPlateau` changes the learning rate the step uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from termwise.trainer.loop import Action, LoopState


class History(keras.callbacks.History):
    """Every value `fit` logged, at every step it logged it.

    Attributes:
        history: key -> list of values, in the order logged.
        steps: key -> the global steps of those values.
        last: the latest value of every key (what `fit` returned before it returned a History).
    """

    def __init__(self):
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}
        self.last: dict[str, float] = {}

    def record(self, step: int, logs: Mapping[str, float]) -> None:
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
            self.steps.setdefault(key, []).append(int(step))
            self.last[key] = float(value)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)  # values are recorded at logged steps, not per epoch


class _ModelView:
    """What `callback.model` is: the Trainer's model(s), with `stop_training` and `optimizer`."""

    def __init__(self, trainer):
        self._trainer = trainer
        self.stop_training = False

    @property
    def _single(self):
        models = self._trainer._models
        return next(iter(models.values())) if len(models) == 1 else None

    @property
    def optimizer(self):
        phases = list(self._trainer.phases.values())
        return phases[0].optimizer if len(phases) == 1 else None

    def get_weights(self):
        return [w for m in self._trainer._models.values() for w in m.get_weights()]

    def set_weights(self, weights):
        weights = list(weights)
        for model in self._trainer._models.values():
            count = len(model.weights)
            model.set_weights(weights[:count])
            weights = weights[count:]

    def __getattr__(self, name):
        single = self._single
        if single is None:
            raise AttributeError(
                f"A callback asked for model.{name}, but this Trainer has several models "
                f"({sorted(self._trainer._models)}); only get_weights, set_weights, "
                "optimizer (one phase) and stop_training are shared."
            )
        return getattr(single, name)


class KerasCallbacks(Action):
    """Drives a `keras.callbacks.CallbackList` from the loop.

    Args:
        trainer: the Trainer.
        callbacks: Keras callbacks.
        steps_per_epoch: steps in an epoch (None: the whole fit is one epoch).
        history: the History `fit` returns (given the model, not driven per epoch here).
    """

    def __init__(
        self,
        trainer,
        callbacks: Sequence[keras.callbacks.Callback],
        steps_per_epoch: int | None,
        history: History,
    ):
        self.trainer = trainer
        self.model = _ModelView(trainer)
        self.steps_per_epoch = steps_per_epoch
        self.every = steps_per_epoch or 0
        self.list = keras.callbacks.CallbackList(
            list(callbacks), add_history=False, add_progbar=False, model=self.model
        )
        history.set_model(self.model)
        self._active = bool(self.list.callbacks)
        self._epoch = 0

    def _logs(self, loop_logs: Mapping[str, float]) -> dict[str, float]:
        logs = dict(loop_logs)
        if len(self.trainer.phases) == 1:
            (phase,) = self.trainer.phases
            if f"total/{phase}" in logs:
                logs.setdefault("loss", logs[f"total/{phase}"])
            if "eval/total" in logs:
                logs.setdefault("val_loss", logs["eval/total"])
        return logs

    def _epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else 0

    def begin(self, loop: LoopState) -> None:
        self.model.stop_training = False
        self.trainer._window.reset_epoch()
        self.list.on_train_begin()
        self._epoch = self._epoch_of(loop.start)
        self.list.on_epoch_begin(self._epoch)

    def after_call(self, loop: LoopState) -> None:
        if not self._active:
            return
        logs = self._logs({**loop.logs, **self.trainer._window.last_values()})
        start = self._epoch * self.steps_per_epoch if self.steps_per_epoch else loop.start
        self.list.on_train_batch_end(max(loop.step - start - 1, 0), logs)
        if self.model.stop_training:
            loop.request_stop("a callback set model.stop_training")

    def at_boundary(self, loop: LoopState) -> None:
        epoch = self.trainer._window.epoch_means()  # Keras's running means over the epoch
        self.trainer._window.reset_epoch()
        self.list.on_epoch_end(self._epoch, self._logs({**loop.logs, **epoch}))
        if self.model.stop_training:
            loop.request_stop("a callback set model.stop_training")
        if not loop.final:
            self._epoch = self._epoch_of(loop.step)
            self.list.on_epoch_begin(self._epoch)

    def end(self, loop: LoopState) -> None:
        self.trainer._finalize_averages()  # as keras.Model.fit does, before on_train_end
        self.list.on_train_end(self._logs(loop.logs))
