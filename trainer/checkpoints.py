"""Checkpoints: every piece of training state, saved every N steps, restored on start.

The state is whatever the Trainer tracks: its models, optimizers, the global step, balancer
state, counters, and the training data iterator (where the dataset allows it), so that rerunning
the same command after a preemption resumes exactly where the last checkpoint left it.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging


class Checkpoints:
    """A `tf.train.CheckpointManager` over a `tf.train.Checkpoint` of named trackables.

    In a multi-worker cluster every worker must take part in each save (the variables are
    synchronised by collective ops), but one writes: the others save into a scratch directory
    of their own, `<directory>/.worker-<id>`, and delete it at once, as TensorFlow's
    multi-worker guide does. Every worker restores from `directory` (a shared file system).

    Args:
        directory: where checkpoints go.
        max_to_keep: how many of the latest to keep.
        writer: whether this process writes (False on multi-worker workers but the chief).
        worker: this worker's index, naming its scratch directory.
        **trackables: what to save (models, optimizers, variables).
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int,
        *,
        writer: bool = True,
        worker: int = 0,
        **trackables,
    ):
        self.directory = directory
        self._writer = writer
        self._save_dir = directory if writer else os.path.join(directory, f".worker-{worker}")
        self._checkpoint = tf.train.Checkpoint(**trackables)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self._save_dir, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> str | None:
        """Path of the latest checkpoint in `directory`, or None."""
        return tf.train.latest_checkpoint(self.directory)

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
        path = self._manager.save(checkpoint_number=step)
        if not self._writer:
            tf.io.gfile.rmtree(self._save_dir)
        return path
