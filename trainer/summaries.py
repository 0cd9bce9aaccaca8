"""TensorBoard output: scalars by tag and by term, the layouts, hparams, text and images.

The tags are a contract (see DESIGN.md and the README's tag table). In the run directory
itself: `loss/<term>`, `weight/<term>`, `weighted/<term>`, `share/<term>`, `total/<phase>`,
`grad_norm/<term>`, `grad_cosine/<term>`, `grad_share/<term>`, `grad_cosine/<a>~<b>`,
`grad_conflict/<phase>`, `metric/<name>`, `optimizer/<phase>/learning_rate`, `perf/...`,
`eval/<name>`, the images `images/grad_cosine/<phase>` and `images/term_layer_share/<phase>`,
and the text `run/summary` and `warnings/...`.

Each term also has its own run, `<log_dir>/terms/<term>/`, as Keras writes `train/` and
`validation/`: there the same quantities are `by_term/<phase>/<quantity>` (`loss`, `weight`,
`weighted`, `share`, `grad_norm`, `grad_cosine`, `grad_share`). TensorBoard colours and names
lines by run, so each of those charts has one coloured line per term, named in the legend; the
`by_term` group sorts first in Time Series, which opens its first two groups.

Everything here runs outside the compiled step, on Python floats or eager tensors, so the step
knows nothing of files (the Orbit split).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import (
    event_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util

__all__ = [
    "BY_TERM",
    "FAMILIES",
    "PER_TERM",
    "SummaryWriter",
    "TERMS_DIR",
    "heatmap_image",
    "layer_shares",
    "layout_proto",
    "metric_tag",
    "read_events",
    "run_summary",
    "scalar_series",
    "term_run",
]

# The per-term quantities: a flat tag `<quantity>/<term>` in the run directory is also written
# as `by_term/<phase>/<quantity>` in the term's own run.
PER_TERM = ("loss", "weight", "weighted", "share", "grad_norm", "grad_cosine", "grad_share")
BY_TERM = "by_term"  # the tag group of the per-term runs ("b" sorts before "eval", "loss", ...)
TERMS_DIR = "terms"  # <log_dir>/terms/<term>/: one run per term

# The tag families the Trainer writes; any other logged name is an `add_metric` value, written
# as `metric/<name>` so that metrics form one group beside (not among) the terms' families.
FAMILIES = (
    *(f"{q}/" for q in PER_TERM),
    "total/",
    "grad_conflict/",
    "metric/",
    "optimizer/",
    "perf/",
    "eval/",
    "nonfinite/",
)


def metric_tag(name: str) -> str:
    """The tag of a logged value: its own name in a known family, else `metric/<name>`."""
    return name if name.startswith(FAMILIES) else f"metric/{name}"


def run_summary(
    *,
    command: Sequence[str],
    versions: Mapping[str, str],
    phases: Mapping[str, Sequence[tuple[str, str]]],
    balancers: Mapping[str, str],
    options: Mapping[str, object],
) -> str:
    """The markdown of the `run/summary` text: what ran, with what, in which versions.

    Args:
        command: the command line (`sys.argv`).
        versions: package name to version.
        phases: phase name to its (term, weight) pairs, in the order they are summed.
        balancers: phase name to its balancer ("none" when it has none).
        options: the run's hyperparameters.
    """
    import shlex

    lines = [f"**command**: `{shlex.join(command) or '(none)'}`", ""]
    lines.append("**versions**: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines += ["", "| phase | # | term | weight | balancer |", "|---|---|---|---|---|"]
    for phase, terms in phases.items():
        for i, (term, weight) in enumerate(terms):
            balancer = balancers.get(phase, "none") if i == 0 else ""
            lines.append(
                f"| {phase} | {i + 1} | {_markdown_escape(term)} | {_markdown_escape(weight)} | "
                f"{_markdown_escape(balancer)} |"
            )
    lines += ["", "| option | value |", "|---|---|"]
    lines += [f"| {_markdown_escape(k)} | {_markdown_escape(v)} |" for k, v in options.items()]
    return "\n".join(lines)


# (chart title, quantity) of each phase's category in the custom-scalars layout.
_TERM_CHARTS = (
    ("share of the total: weighted / total", "share"),
    ("share of the update (diagnostic steps)", "grad_share"),
    ("values, unweighted", "loss"),
    ("weights (schedule x balancer)", "weight"),
    ("weighted values", "weighted"),
    ("gradient norms of the weighted terms", "grad_norm"),
    ("cosine to the update", "grad_cosine"),
)


def term_run(term: str) -> str:
    """The run directory of a term, relative to the log directory (`terms/<term>`).

    A `/` in a term's name (`enc_a/kl`) nests the directory; `.` and `..` parts become `_`.
    """
    parts = [p if p not in ("", ".", "..") else "_" for p in term.split("/")]
    return os.path.join(TERMS_DIR, *parts)


def layout_proto(phases: Sequence[str] = ("train",)) -> layout_pb2.Layout:
    """The custom-scalars layout: per phase, one chart per quantity with a line per term.

    Each chart selects `by_term/<phase>/<quantity>`, which only the term runs hold, so its lines
    are the terms, coloured and named by their runs. A last category holds the phase totals,
    the conflicting pairs, the pairwise cosines and the evaluations.
    """
    categories = []
    for phase in phases:
        charts = [
            layout_pb2.Chart(
                title=f"{phase}: {title}",
                multiline=layout_pb2.MultilineChartContent(
                    tag=[rf"^{BY_TERM}/{re.escape(phase)}/{quantity}$"]
                ),
            )
            for title, quantity in _TERM_CHARTS
        ]
        categories.append(layout_pb2.Category(title=f"terms of phase {phase}", chart=charts))
    overall = [
        ("totals: total/<phase>", r"^total/"),
        ("evaluation: eval/<name>", r"^eval/"),
        ("conflicting pairs: grad_conflict/<phase>", r"^grad_conflict/"),
        ("pairwise gradient cosines: grad_cosine/<a>~<b>", r"^grad_cosine/.*~"),
        ("metrics: metric/<name>", r"^metric/"),
    ]
    charts = [
        layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))
        for title, regex in overall
    ]
    categories.append(layout_pb2.Category(title="phases and evaluation", chart=charts))
    return layout_pb2.Layout(category=categories)


# ---------------------------------------------------------------------------------------------
# Heatmaps, drawn with Pillow.

_DIVERGING = ((0.02, 0.19, 0.38), (0.26, 0.58, 0.76), (0.97, 0.97, 0.97), (0.84, 0.38, 0.30),
              (0.40, 0.0, 0.12))  # fmt: skip
_SEQUENTIAL = ((0.97, 0.98, 1.0), (0.62, 0.79, 0.88), (0.26, 0.57, 0.78), (0.03, 0.19, 0.42))


def _colour(value: float, low: float, high: float, stops) -> tuple[int, int, int]:
    """The colour of `value` on a piecewise-linear scale through `stops` from low to high."""
    t = 0.0 if high == low else (min(max(value, low), high) - low) / (high - low)
    position = t * (len(stops) - 1)
    i = min(int(position), len(stops) - 2)
    f = position - i
    return tuple(
        int(round(255 * (a + f * (b - a)))) for a, b in zip(stops[i], stops[i + 1], strict=True)
    )


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _text_box(text: str, font_size: int) -> tuple[int, int, int, int]:
    """The bounding box of `text` drawn at (0, 0) in the default font (measuring took a third
    of a heatmap's drawing, and the labels repeat at every diagnostic step)."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font(font_size))


def heatmap_image(
    matrix,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str = "",
    low: float = -1.0,
    high: float = 1.0,
    diverging: bool = True,
    min_width: int = 320,
    missing: str = "n/a",
) -> np.ndarray:
    """Draws a labelled heatmap: names on both axes, the value in each cell, a colour bar.

    What does not depend on the values or the title (the labels, the colour bar and its
    ticks) is drawn once per layout and copied (`_heatmap_frame`): it was two thirds of a
    drawing, repeated at every diagnostic step.

    Args:
        matrix: [len(rows), len(columns)] values; NaN cells are grey and show `missing`.
        rows, columns: the axis labels (column labels are written vertically).
        title: a line above the map.
        low, high: the ends of the colour scale (values beyond are clipped to its colours).
        diverging: blue through white to red (a signed quantity), else white to blue.
        min_width: the image is at least this many pixels wide.
        missing: the text of NaN cells.

    Returns:
        A uint8 RGB image [height, width, 3].
    """
    from PIL import ImageDraw

    values = np.asarray(matrix, dtype=np.float64).reshape(len(rows), len(columns))
    stops = _DIVERGING if diverging else _SEQUENTIAL
    title_size = _title_extent(title) if title else None
    frame, (left, top, cell_w, cell_h) = _heatmap_frame(
        tuple(rows), tuple(columns), title_size, low, high, diverging, min_width
    )
    image = frame.copy()
    draw = ImageDraw.Draw(image)
    if title:
        _stamp_title(image, (_PAD, _PAD), title)
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = values[i, j]
            x0, y0 = left + j * cell_w, top + i * cell_h
            if math.isfinite(value):
                fill = _colour(value, low, high, stops)
                text = f"{value:+.2f}" if diverging else f"{value:.2f}"
            else:
                fill, text = (225, 225, 225), missing
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=fill,
                           outline=(255, 255, 255))  # fmt: skip
            luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
            ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
            tw, th = _extent(text)
            _stamp(image, (x0 + (cell_w - tw) // 2, y0 + (cell_h - th) // 2 - 2), text, ink)
    return np.asarray(image, dtype=np.uint8)


_PAD = 8  # the heatmap's margin between its parts


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, font_size: int):
    """`text` rendered once in the default font: its coverage mask (an "L" image) and the
    mask's offset from the point the text is drawn at."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = _text_box(text, font_size)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=_font(font_size))
    return mask, (left, top)


def _stamp(image, xy: tuple[int, int], text: str, ink, font_size: int = 13) -> None:
    """Draws `text` at the integer point `xy` as `ImageDraw.text` does, pixel for pixel, by
    pasting `ink` through its cached mask: rendering the glyphs was half of a heatmap's
    drawing, and a cell's text (two decimals) repeats from one diagnostic step to the next."""
    if not text:
        return
    mask, (dx, dy) = _text_mask(text, font_size)
    image.paste(ink, (xy[0] + dx, xy[1] + dy), mask)


@functools.lru_cache(maxsize=256)
def _advance(text: str, font_size: int) -> float:
    return _font(font_size).getlength(text)


def _title_pieces(title: str, font_size: int = 13) -> tuple[tuple[int, str], ...]:
    """A title whose last word changes at every step ("..., step 1200") as (x offset, text)
    pieces that are drawn and measured apart, each from the cache: the words before the last
    and the last word where the first part's advance is a whole number of pixels (the glyphs
    then land where `ImageDraw.text` puts them), else the whole title."""
    head, space, tail = title.rpartition(" ")
    if head and tail:
        advance = _advance(head + space, font_size)
        if advance == int(advance):
            return ((0, head + space), (int(advance), tail))
    return ((0, title),)


def _title_extent(title: str, font_size: int = 13) -> tuple[int, int]:
    """The width and height of a title, as `_extent` measures it: the union of its pieces'
    boxes, which is the whole text's box."""
    boxes = [(dx, _text_box(text, font_size)) for dx, text in _title_pieces(title, font_size)]
    return (max(dx + b[2] for dx, b in boxes) - min(dx + b[0] for dx, b in boxes),
            max(b[3] for _, b in boxes) - min(b[1] for _, b in boxes))  # fmt: skip


def _stamp_title(image, xy: tuple[int, int], title: str, font_size: int = 13) -> None:
    """Draws a title (`_title_pieces`) as `ImageDraw.text` does, pixel for pixel."""
    pieces = _title_pieces(title, font_size)
    if len(pieces) == 1:  # not cached: the title changes at every step
        from PIL import ImageDraw

        ImageDraw.Draw(image).text(xy, title, fill=(0, 0, 0), font=_font(font_size))
        return
    for dx, text in pieces:
        _stamp(image, (xy[0] + dx, xy[1]), text, (0, 0, 0), font_size)


def _extent(text: str, font_size: int = 13) -> tuple[int, int]:
    """The width and height of `text` in the default font."""
    box = _text_box(text, font_size)
    return box[2] - box[0], box[3] - box[1]


@functools.lru_cache(maxsize=32)
def _heatmap_frame(
    rows: tuple[str, ...],
    columns: tuple[str, ...],
    title_size: tuple[int, int] | None,
    low: float,
    high: float,
    diverging: bool,
    min_width: int,
):
    """A heatmap's white image with its labels and colour bar drawn, and the grid's geometry.

    Returns `(image, (left, top, cell_w, cell_h))`: the Pillow image (copied before drawing
    on it) and the grid's top-left corner and cell size. The title's size is the only part of
    the title the layout depends on.
    """
    from PIL import Image, ImageDraw

    stops = _DIVERGING if diverging else _SEQUENTIAL
    font, small = _font(13), _font(11)
    pad = _PAD
    cell_w = max(56, max((_extent(c)[1] for c in columns), default=0) + 12)
    cell_h = 30
    left = pad + max((_extent(r)[0] for r in rows), default=0) + pad
    top = pad + (title_size[1] + pad if title_size else 0)
    top += max((_extent(c)[0] for c in columns), default=0) + pad
    bar_x = left + cell_w * len(columns) + 2 * pad
    bar_w = 16
    scale_w = max(_extent(f"{v:+.2f}", 11)[0] for v in (low, high)) + pad
    width = max(min_width, bar_x + bar_w + 6 + scale_w + pad)
    if title_size:
        width = max(width, pad + title_size[0] + pad)
    grid_h = cell_h * len(rows)
    height = top + max(grid_h, 120) + pad
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for j, name in enumerate(columns):  # vertical labels, bottom-aligned on the grid
        w, h = _extent(name)
        label = Image.new("RGB", (w + 4, h + 6), (255, 255, 255))
        ImageDraw.Draw(label).text((2, -_text_box(name, 13)[1] + 2), name,
                                   fill=(0, 0, 0), font=font)  # fmt: skip
        label = label.rotate(90, expand=True)
        x = left + j * cell_w + (cell_w - label.width) // 2
        image.paste(label, (x, top - pad - label.height + 4))
    for i, name in enumerate(rows):
        w, h = _extent(name)
        draw.text((left - pad - w, top + i * cell_h + (cell_h - h) // 2 - 2), name,
                  fill=(0, 0, 0), font=font)  # fmt: skip
    bar_h = max(grid_h, 120)
    for k in range(bar_h):  # the colour bar: high at the top
        value = high - (high - low) * k / max(bar_h - 1, 1)
        draw.line([bar_x, top + k, bar_x + bar_w, top + k], fill=_colour(value, low, high, stops))
    draw.rectangle([bar_x, top, bar_x + bar_w, top + bar_h - 1], outline=(0, 0, 0))
    ticks = (high, (low + high) / 2, low)
    for k, value in enumerate(ticks):
        y = top + round(k * (bar_h - 1) / (len(ticks) - 1))
        draw.line([bar_x + bar_w, y, bar_x + bar_w + 4, y], fill=(0, 0, 0))
        text = f"{value:+.2f}" if diverging else f"{value:.2f}"
        _, th = _extent(text, 11)
        draw.text((bar_x + bar_w + 6, min(max(y - th // 2 - 2, 0), height - th - 4)), text,
                  fill=(0, 0, 0), font=small)  # fmt: skip
    return image, (left, top, cell_w, cell_h)


def layer_shares(norms) -> np.ndarray:
    """Each term's share of each layer's gradient norm: ``|g_t,l| / sum_s |g_s,l|``.

    Args:
        norms: [T, L] norms of each weighted term's gradient restricted to each layer.

    Returns:
        [T, L] float64 shares; each layer's column sums to 1, or is NaN where no term has a
        gradient in that layer.
    """
    norms = np.abs(np.asarray(norms, dtype=np.float64))
    totals = norms.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, norms / np.where(totals > 0, totals, 1.0), np.nan)


def _fallback_heatmap(matrix, low: float, high: float, cell: int = 24) -> np.ndarray:
    """Without Pillow: the cells alone (no text), upscaled, as uint8 RGB."""
    values = np.nan_to_num(np.asarray(matrix, dtype=np.float64), nan=low)
    rgb = np.array([[_colour(v, low, high, _DIVERGING) for v in row] for row in values])
    return np.repeat(np.repeat(rgb.astype(np.uint8), cell, axis=0), cell, axis=1)


def _draw(matrix, rows, columns, **options) -> np.ndarray:
    try:
        import PIL  # noqa: F401
    except ImportError:  # Pillow ships with the `examples` and `test` extras
        return _fallback_heatmap(matrix, options.get("low", -1.0), options.get("high", 1.0))
    return heatmap_image(matrix, rows, columns, **options)


# ---------------------------------------------------------------------------------------------
# The writer.

HOLD_SECONDS = 0.5  # the longest a write waits for `SummaryWriter.release`

_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None)


def _import_event(writer, event: event_pb2.Event) -> None:
    """Appends `event` to a TF2 file writer. TF2's writers have no API for a whole event: the
    public raw op `ImportEvent` writes it into the writer's private `_resource`."""
    tf.raw_ops.ImportEvent(writer=writer._resource, event=event.SerializeToString())


def _write_summary(writer, summary: summary_pb2.Summary, step: int) -> None:
    """Writes `summary` at `step` as the event `tf.summary.experimental.write_raw_pb` writes
    (the step, the wall time now, the summary), by one op: `write_raw_pb` ran five eager ops
    a summary (its recording condition, the step's and the bytes' tensors, the write), a third
    of the writing thread's time at a logged step."""
    _import_event(writer, event_pb2.Event(step=step, wall_time=time.time(), summary=summary))


def _write_scalars(writer, values: Mapping[str, float], step: int) -> None:
    """Writes `values` at `step` as one `Summary` of the scalars `tf.summary.scalar` writes."""
    if not values:
        return
    summary = summary_pb2.Summary()
    for tag, value in values.items():
        summary.value.add(tag=tag, metadata=_SCALAR_METADATA, tensor=_float32_scalar(value))
    _write_summary(writer, summary, step)


def _float32_scalar(value: float) -> tensor_pb2.TensorProto:
    """The bytes `tensor_util.make_tensor_proto(np.float32(value))` serializes to (the field is a
    float32), without its dtype dispatch: that was 40% of writing a logged step's scalars."""
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=_SCALAR_SHAPE, float_val=[float(value)]
    )


_SCALAR_SHAPE = tensor_shape_pb2.TensorShapeProto()


def _write_restart(writer, step: int) -> None:
    """Writes two `SessionLog(status=START)` events at `step` into a TF2 summary writer (see
    `SummaryWriter.restart`)."""
    event = event_pb2.Event(
        step=step,
        wall_time=time.time(),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
    )
    for _ in range(2):
        _import_event(writer, event)


_IMAGE_METADATA = image_metadata.create_summary_metadata(display_name=None, description=None)


def _image_batch(images) -> np.ndarray:
    """A copy of `images` ([n, h, w, c], uint8 or floats in [0, 1]) as uint8.

    Floats are converted as `tf.summary.image` converts them (`tf.image.convert_image_dtype`
    with saturation: clipped, times 255.5, truncated).
    """
    images = np.array(images)  # a copy: the caller may reuse its array
    if images.dtype != np.uint8:
        clipped = np.clip(images.astype(np.float32), 0.0, 1.0)
        images = (clipped * np.float32(255.5)).astype(np.uint8)
    return images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey + alpha, RGB, RGBA


def _png(image: np.ndarray) -> bytes:
    """One [h, w, c] uint8 image (c = 1 to 4) as PNG bytes (ISO/IEC 15948: 8 bits a sample,
    every row with filter 0, zlib level 1).

    A heatmap's cells and margins are runs of one colour, which zlib's fastest level packs
    to within a tenth of Pillow's adaptive filters at level 6, five times faster (0.7 ms
    against 3.7 ms for a 374 x 320 heatmap; TensorFlow's eager `encode_png` took 6 ms).
    """
    height, width, channels = image.shape
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 0  # the filter type of each row: none
    rows[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
        _png_chunk(b"IEND", b""),
    ))  # fmt: skip


def _write_image_summary(writer, tag: str, images: np.ndarray, step: int, max_outputs: int) -> None:
    """Writes uint8 images [n, h, w, c] as `tf.summary.image` does: the image plugin's string
    tensor [width, height, png, ...]."""
    height, width = images.shape[1:3]
    encoded = [str(width).encode(), str(height).encode()]
    encoded += [_png(image) for image in images[:max_outputs]]
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=tag,
        metadata=_IMAGE_METADATA,
        tensor=tensor_util.make_tensor_proto(np.array(encoded, dtype=object)),
    )
    _write_summary(writer, summary, step)


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


class SummaryWriter:
    """Writes the Trainer's TensorBoard events: the run directory and one run per term.

    Every write runs on one background thread, in the order the methods were called, while
    the next compiled call runs: a logged step's scalars, gradient tags, tensors and heatmaps
    took 15 to 20 ms of eager summary ops, PNG encoding and file writes against a VAE's 0.8 ms
    step (a fifth of the time between two logged steps, every 100 steps), and on two cores that
    thread still takes its CPU from the step: the heatmaps' frames are cached, the PNGs written
    at zlib's fastest level and the scalar tensors built directly, which brought a logged step
    from 30-34 to 11-13 ms of this thread's CPU time (VAE; CNN 25 -> 13 ms); the texts stamped
    from cached masks and one op per event brought the VAE's to 6 ms. During `fit` the
    writes wait for the next compiled call (`hold`, `release`). The values are
    copied when a method is called; `flush` and `close` wait for the writes and raise the
    first error one raised (so does the next method called after a failed write).

    Args:
        log_dir: the run directory.
        term_names: phase name to its term names, in order (see `set_terms`).
    """

    def __init__(self, log_dir: str, term_names: Mapping[str, Sequence[str]] | None = None):
        self.log_dir = log_dir
        self._writer = tf.summary.create_file_writer(log_dir)
        self._term_writers: dict[str, tf.summary.SummaryWriter] = {}
        self._restart_step: int | None = None  # see `restart`
        self._phase_of: dict[str, str] = {}  # term -> phase
        self._layout_written = False
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # see `_submit`
        self._pending: list[concurrent.futures.Future] = []
        self._go = threading.Event()  # cleared while the host loop works: see `hold`
        self._go.set()
        self.term_names: dict[str, tuple[str, ...]] = {}
        if term_names:
            self.set_terms(term_names)

    def set_terms(self, term_names: Mapping[str, Sequence[str]]) -> None:
        """Names each phase's terms: their flat tags are then also written to their own runs."""
        self.term_names = {phase: tuple(names) for phase, names in term_names.items()}
        self._phase_of = {n: phase for phase, names in self.term_names.items() for n in names}

    def _term_writer(self, term: str) -> tf.summary.SummaryWriter:
        writer = self._term_writers.get(term)
        if writer is None:
            writer = tf.summary.create_file_writer(os.path.join(self.log_dir, term_run(term)))
            self._term_writers[term] = writer
            if self._restart_step is not None:
                _write_restart(writer, self._restart_step)
        return writer

    def _split(self, values: Mapping[str, float]) -> dict[str, dict[str, float]]:
        """Term name to its `by_term/<phase>/<quantity>` values, from the flat tags."""
        by_term: dict[str, dict[str, float]] = {}
        for tag, value in values.items():
            quantity, _, term = tag.partition("/")
            phase = self._phase_of.get(term)
            if phase is not None and quantity in PER_TERM:
                by_term.setdefault(term, {})[f"{BY_TERM}/{phase}/{quantity}"] = value
        return by_term

    def _write_layout(self, phases: Sequence[str]) -> None:
        layout = custom_scalar_summary.pb(layout_proto(phases))  # TensorFlow's own proto class
        _write_summary(self._writer, summary_pb2.Summary.FromString(layout.SerializeToString()), 0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes each value under its tag at `step`, and each term's also to its own run.

        The events are those `tf.summary.scalar` writes (a float32 scalar tensor with the
        scalars plugin's metadata), all of one writer's in one `Summary`: one write per
        writer, not one eager op per value (760 of them took a third of a VAE's logging).
        """
        values, by_term = dict(values), self._split(values)
        layout = not self._layout_written and bool(self.term_names)
        self._layout_written = self._layout_written or layout
        phases = list(self.term_names)  # the layout's charts, when it is written

        def write():
            if layout:
                self._write_layout(phases)
            _write_scalars(self._writer, values, step)
            for term, term_values in by_term.items():
                _write_scalars(self._term_writer(term), term_values, step)

        self._submit(write)

    def hparams(
        self, values: Mapping[str, object], metrics: Sequence[str] = (), *, step: int = 0
    ) -> None:
        """Records the run's options for the HParams dashboard, and the metrics it shows.

        The session and the experiment (its hparams and metrics) are written to the run
        directory itself, where TensorBoard pairs each metric with the session (`--logdir` at
        the run directory, whose run is named "."; or at a folder of runs). Declaring the
        metrics keeps TensorBoard from making a column of every scalar tag.

        Args:
            values: name to value (bool, int, float or str; anything else becomes its str,
                None becomes "none").
            metrics: scalar tags of the run directory whose last values the table shows.
            step: the step of the events.
        """
        clean: dict[str, object] = {}
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                clean[key] = value
            else:
                clean[key] = "none" if value is None else str(value)
        infos = []
        for key, value in clean.items():
            if isinstance(value, bool):
                kind = api_pb2.DATA_TYPE_BOOL
            elif isinstance(value, (int, float)):
                kind = api_pb2.DATA_TYPE_FLOAT64
            else:
                kind = api_pb2.DATA_TYPE_STRING
            infos.append(api_pb2.HParamInfo(name=key, type=kind))
        experiment = api_pb2.Experiment(
            hparam_infos=infos,
            metric_infos=[
                api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag, group=""))
                for tag in dict.fromkeys(metrics)
            ],
        )
        plugin_data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
        summary = summary_pb2.Summary()
        summary.value.add(
            tag=hparams_metadata.EXPERIMENT_TAG,
            metadata=hparams_metadata.create_summary_metadata(plugin_data),
            tensor=hparams_metadata.NULL_TENSOR,
        )

        def write():
            with self._writer.as_default():
                tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
                hparams_api.hparams(clean)

        self._submit(write)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Writes markdown text under `tag` (TensorBoard's Text tab)."""

        def write():
            with self._writer.as_default(step=step):
                tf.summary.text(tag, markdown)

        self._submit(write)

    def images(self, tag: str, images, step: int, max_outputs: int = 16) -> None:
        """Writes a batch of images ([n, h, w, c] floats in [0, 1], or uint8) as `images/<tag>`."""
        images = _image_batch(images)
        self._submit(lambda: self._write_images(tag, images, step, max_outputs))

    def _write_images(self, tag: str, images: np.ndarray, step: int, max_outputs: int) -> None:
        _write_image_summary(self._writer, f"images/{tag}", images, step, max_outputs)

    def image(self, tag: str, image, step: int) -> None:
        """Writes one image ([h, w, c] floats in [0, 1], or uint8) under `images/<tag>`."""
        self.images(tag, np.asarray(image)[None], step, max_outputs=1)

    def _paint(self, tag: str, matrix, rows, columns, step: int, **options) -> None:
        """Draws a heatmap and writes it as `images/<tag>` (on the background thread)."""
        matrix = np.array(matrix, dtype=np.float64)  # a copy: the caller may reuse its array
        rows, columns = list(rows), list(columns)

        def paint():
            image = _draw(matrix, rows, columns, **options)
            self._write_images(tag, _image_batch(image[None]), step, 1)

        self._submit(paint)

    def hold(self) -> None:
        """Holds the writes not yet begun until `release` (or `HOLD_SECONDS`, or a flush).

        The Trainer holds them from a compiled call's end to the next one's start: a write
        begun while the loop's host work ran took the GIL from it, which added 1 to 2 ms to a
        VAE's 1.2 ms of host work per 100 steps (its writes then run during the call, when the
        loop's thread waits on the call in C++).
        """
        self._go.clear()

    def release(self) -> None:
        """Lets the held writes run (see `hold`)."""
        self._go.set()

    def _submit(self, write) -> None:
        """Runs `write` on the writing thread, after every write submitted before it."""
        self._raise_written()
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="termwise-summaries"
            )

        def held():
            self._go.wait(HOLD_SECONDS)
            write()

        self._pending.append(self._worker.submit(held))

    def _raise_written(self, wait: bool = False) -> None:
        """Drops the finished writes (all of them when `wait`, held or not), raising the first
        error."""
        if wait:
            self.release()
        pending = []
        for future in self._pending:
            if wait or future.done():
                future.result()
            else:
                pending.append(future)
        self._pending = pending

    def cosine_matrix(self, phase: str, names: Sequence[str], matrix, step: int) -> None:
        """A phase's pairwise gradient cosines: the heatmap and one scalar per pair.

        Writes `images/grad_cosine/<phase>` (term names on both axes, each pair's value, a
        colour bar from -1 to 1; the diagonal, always +1, is left blank) and
        `grad_cosine/<a>~<b>` for each pair a before b in the phase's term order.
        """
        matrix = np.asarray(matrix, dtype=np.float64)
        names = list(names)
        pairs = {
            f"grad_cosine/{a}~{names[j]}": float(matrix[i, j])
            for i, a in enumerate(names)
            for j in range(i + 1, len(names))
        }
        if pairs:
            self.scalars(step, pairs)
        shown = matrix.copy()
        np.fill_diagonal(shown, np.nan)  # always +1: left blank
        self._paint(
            f"grad_cosine/{phase}",
            shown,
            names,
            names,
            step,
            title=f"{phase}: gradient cosines, step {step}",
            missing="",
        )

    def layer_norms(
        self, phase: str, names: Sequence[str], layers: Sequence[str], norms, step: int
    ) -> None:
        """Each term's share of each layer's gradient norm: a heatmap and a tensor summary.

        Writes `images/term_layer_share/<phase>` (layers as rows, terms as columns) and the
        tensor summaries `term_layer_share/<phase>` and `grad_layer_norms/<phase>`, [T, L]
        float32, whose description is the JSON `{"terms": [...], "layers": [...]}`.
        """
        norms = np.asarray(norms, dtype=np.float64)
        shares = layer_shares(norms)
        labels = json.dumps({"terms": list(names), "layers": list(layers)})
        metadata = summary_pb2.SummaryMetadata(
            summary_description=labels,
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name="termwise_matrix", content=labels.encode()
            ),
        )

        def write():  # the events `tf.summary.write(tag, float32 tensor, metadata)` writes
            summary = summary_pb2.Summary()
            for tag, value in (
                (f"term_layer_share/{phase}", shares),
                (f"grad_layer_norms/{phase}", norms),
            ):
                tensor = tensor_util.make_tensor_proto(value.astype(np.float32))
                summary.value.add(tag=tag, metadata=metadata, tensor=tensor)
            _write_summary(self._writer, summary, step)

        self._submit(write)
        self._paint(
            f"term_layer_share/{phase}",
            shares.T,
            layers,
            names,
            step,
            title=f"{phase}: share of each layer's gradient norm, step {step}",
            low=0.0,
            high=1.0,
            diverging=False,
        )

    def histograms(self, step: int, values: Mapping[str, object]) -> None:
        """Writes each array as a histogram under its tag."""
        values = {t: np.array(v, dtype=np.float32).reshape(-1) for t, v in values.items()}

        def write():
            with self._writer.as_default(step=step):
                for tag, value in values.items():
                    tf.summary.histogram(tag, value)

        self._submit(write)

    def restart(self, step: int, notes: Sequence[str] = ()) -> None:
        """Marks a resume: TensorBoard drops what an interrupted run logged at `step` and after.

        Call it with the restored step + 1: the events up to the restored step are the
        checkpoint's own. Writes TensorFlow's restart event, `SessionLog(status=START)`, at
        `step` into every run this writer has (and into each term run it creates later), so
        that TensorBoard shows one value per step after a resume:

        * its Python loaders (`plugin_event_accumulator`, `--load_fast=false`, and the older
          `EventAccumulator` for scalars, images and histograms) purge every event of the run
          at `step` or later seen before it. The plugin loader takes a run's first START for
          its beginning and purges only at later ones, so the event is written twice;
        * its Rust data server (the default) ignores SessionLog events; its per-tag reservoirs
          drop a tag's points at or after any step written again (preemption), which the
          resumed run does at its first logged step of each tag.

        Args:
            step: the first step the resumed run logs.
            notes: what changed since the checkpoint's run (one item each): written as the text
                `resume` at `step`.
        """

        def write():
            self._restart_step = step
            for writer in self._writers():
                _write_restart(writer, step)

        self._submit(write)
        if notes:
            self.text("resume", "\n".join(f"- {_markdown_escape(n)}" for n in notes), step)

    def _writers(self):
        return [self._writer, *self._term_writers.values()]

    def flush(self) -> None:
        """Writes everything out (what the background thread has still to write first)."""
        self._raise_written(wait=True)
        for writer in self._writers():
            writer.flush()

    def close(self) -> None:
        try:
            self._raise_written(wait=True)
        finally:
            if self._worker is not None:
                self._worker.shutdown()
                self._worker = None
            for writer in self._writers():
                writer.close()


def read_events(log_dir: str) -> EventAccumulator:
    """Loads every event of a run directory (the reader's default keeps only 10 per tag).

    TF2 writes scalars as tensor events: `Tags()["tensors"]` lists every tag, and
    `scalar_series` decodes one. A term's own run is `read_events(<log_dir>/terms/<term>)`.
    """
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """The (step, value) pairs of one scalar tag, in the order written."""
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
