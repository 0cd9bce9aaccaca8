"""TensorBoard output: scalars by tag, the custom-scalars layout, hparams and images.

The tags are a contract (see DESIGN.md): `loss/<term>`, `weight/<term>`, `weighted/<term>`,
`total/<phase>`, `grad_norm/<term>`, `grad_cosine/<term>`, `grad_conflict/<phase>`,
`optimizer/<phase>/learning_rate`, `perf/...`, `eval/<term>`, and the image
`images/grad_cosine/<phase>` (the pairwise cosines of a phase's term gradients). Everything
here runs outside the compiled step, on Python floats or eager tensors, so the step knows
nothing of files (the Orbit split).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hparams_api

# (category, chart title, tag regex): one multi-line chart per family.
LAYOUT = (
    ("terms", "values: loss/<term>", r"loss/.*"),
    ("terms", "weights: weight/<term>", r"weight/.*"),
    ("terms", "weighted values: weighted/<term>", r"weighted/.*"),
    ("terms", "totals: total/<phase>", r"total/.*"),
    ("gradients", "gradient norms: grad_norm/<term>", r"grad_norm/.*"),
    ("gradients", "cosine to the total gradient: grad_cosine/<term>", r"grad_cosine/.*"),
    ("gradients", "conflicting pairs: grad_conflict/<phase>", r"grad_conflict/.*"),
    ("evaluation", "eval/<term>", r"eval/.*"),
)


def layout_proto() -> layout_pb2.Layout:
    """The custom-scalars layout: one multi-line chart per tag family."""
    categories: dict[str, list] = {}
    for category, title, regex in LAYOUT:
        chart = layout_pb2.Chart(
            title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex])
        )
        categories.setdefault(category, []).append(chart)
    return layout_pb2.Layout(
        category=[layout_pb2.Category(title=t, chart=c) for t, c in categories.items()]
    )


def cosine_image(matrix, cell: int = 16) -> np.ndarray:
    """An RGB image ([T*cell, T*cell, 3], in [0, 1]) of a T x T cosine matrix.

    Each cell is one pair of terms: red for +1, white for 0, blue for -1 (row i, column j is
    the cosine between terms i and j, in the order of the phase's term names).
    """
    m = np.clip(np.nan_to_num(np.asarray(matrix, dtype=np.float32)), -1.0, 1.0)
    positive, negative = np.maximum(m, 0.0), np.maximum(-m, 0.0)
    image = np.stack([1.0 - negative, 1.0 - positive - negative, 1.0 - positive], axis=-1)
    image = np.repeat(np.repeat(image, cell, axis=0), cell, axis=1)
    return np.clip(image, 0.0, 1.0)


class SummaryWriter:
    """Writes the Trainer's TensorBoard events into one run directory."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = tf.summary.create_file_writer(log_dir)
        self._layout_written = False

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes each value under its tag at `step`."""
        with self._writer.as_default(step=step):
            if not self._layout_written:
                tf.summary.experimental.write_raw_pb(
                    custom_scalar_summary.pb(layout_proto()).SerializeToString(), step=0
                )
                self._layout_written = True
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def hparams(self, values: Mapping[str, object]) -> None:
        """Records the run's options for the hparams plugin (bool, int, float or str)."""
        clean = {}
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                clean[key] = value
            elif value is not None:
                clean[key] = str(value)
        with self._writer.as_default():
            hparams_api.hparams(clean)

    def images(self, tag: str, images, step: int, max_outputs: int = 16) -> None:
        """Writes a batch of images ([n, h, w, c] floats in [0, 1]) under `images/<tag>`."""
        images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
        with self._writer.as_default(step=step):
            tf.summary.image(f"images/{tag}", images, max_outputs=max_outputs)

    def image(self, tag: str, image, step: int) -> None:
        """Writes one image ([h, w, c] floats in [0, 1]) under `images/<tag>`."""
        self.images(tag, np.asarray(image)[None], step, max_outputs=1)

    def cosine_matrix(self, phase: str, matrix, step: int) -> None:
        """Writes a phase's pairwise gradient cosines as a heatmap, `images/grad_cosine/<phase>`."""
        self.image(f"grad_cosine/{phase}", cosine_image(matrix), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_events(log_dir: str) -> EventAccumulator:
    """Loads every event of a run directory (the reader's default keeps only 10 per tag).

    TF2 writes scalars as tensor events: `Tags()["tensors"]` lists every tag, and
    `scalar_series` decodes one.
    """
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """The (step, value) pairs of one scalar tag, in the order written."""
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
