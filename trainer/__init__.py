"""Termwise's training loop: a Trainer whose loss terms are named, weighted and logged.

Public surface:
    Trainer: the training loop; subclass it and override `compute_terms`.
    NonFiniteLossError: raised when a term becomes NaN or Inf with `on_nonfinite="raise"`.
    History: what `Trainer.fit` returns (a `keras.callbacks.History` of every logged value).
    LossRecorder: records `add_loss` values by layer (what the Trainer uses each step).
    schedules: weights as functions of the step (`schedules.parse("linear:0:1:5000")`).
    balancers: loss balancers (`balancers.PCGrad()`, `balancers.parse("gradnorm:1.5")`).
    gradients: the per-term gradient engine (Gramian statistics, the dominance warning).
"""

from termwise.trainer import balancers, gradients, schedules
from termwise.trainer.callbacks import History
from termwise.trainer.errors import NonFiniteLossError
from termwise.trainer.terms import LossRecorder
from termwise.trainer.trainer import Trainer

__all__ = [
    "History",
    "LossRecorder",
    "NonFiniteLossError",
    "Trainer",
    "balancers",
    "gradients",
    "schedules",
]
