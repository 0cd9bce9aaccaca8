"""Image grids for TensorBoard and PNG files (reconstructions, samples)."""

from __future__ import annotations

import os

import numpy as np


def grid(images, columns: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tiles [n, h, w, c] images in [0, 1] into one [H, W, c] image, row by row.

    Args:
        images: the images; values are clipped to [0, 1].
        columns: images per row (default: the smallest square that holds them).
        pad: pixels of white between images.
        scale: each pixel becomes a `scale` x `scale` block (8x8 digits are tiny).
    """
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    if images.ndim != 4:
        raise ValueError(f"`images` must be [n, h, w, c], got shape {images.shape}.")
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    out = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = images[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_png(path: str, image) -> str:
    """Writes an [H, W, 1 or 3] image in [0, 1] to `path` as an 8-bit PNG; returns the path."""
    from PIL import Image

    pixels = (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
