"""Checkpoints: every piece of training state, saved every N steps, restored on start.

The state is whatever the Trainer tracks: its models, optimizers, the global step, balancer
state, counters, and the training data iterator (where the dataset allows it), so that rerunning
the same command after a preemption resumes exactly where the last checkpoint left it.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging


class Checkpoints:
    """A `tf.train.CheckpointManager` over a `tf.train.Checkpoint` of named trackables.

    Args:
        directory: where checkpoints go.
        max_to_keep: how many of the latest to keep.
        **trackables: what to save (models, optimizers, variables).
    """

    def __init__(self, directory: str, max_to_keep: int, **trackables):
        self.directory = directory
        self._checkpoint = tf.train.Checkpoint(**trackables)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, directory, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> str | None:
        """Path of the latest checkpoint, or None."""
        return self._manager.latest_checkpoint

    def restore(self) -> str | None:
        """Restores the latest checkpoint, if any; returns its path."""
        path = self.latest
        if path:
            self._checkpoint.restore(path).expect_partial()
            logging.info("Restored %s", path)
        return path

    def restore_extra(self, **trackables) -> None:
        """Restores trackables created after `restore` (a data iterator) from the latest."""
        path = self.latest
        if path:
            tf.train.Checkpoint(**trackables).read(path).expect_partial()

    def save(self, step: int, **extra) -> str:
        """Saves a checkpoint numbered `step`, with extra trackables (a data iterator)."""
        for name, trackable in extra.items():
            setattr(self._checkpoint, name, trackable)
        return self._manager.save(checkpoint_number=step)
