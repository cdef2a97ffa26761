"""Image files <-> float tensors in [-1, 1], the one image convention of the project."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from m2m_pipeline.tasks.errors import TaskDataError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Read an image as a (3, size, size) float32 tensor in [-1, 1].

    RGBA (Objaverse renders are on a transparent background) is composited on white, as Zero-1-to-3
    does, so the background carries no undefined colour. Non-square images (wikiHow photos) are
    centre-cropped to a square first: the network's sets are square and stretching would change shapes.
    """
    try:
        with Image.open(path) as image:
            image.load()
            rgba = image.convert("RGBA")
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on truncated / foreign files
        raise TaskDataError(path, f"cannot read image: {error}") from error
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    array = np.asarray(rgb, dtype=np.float32)  # (H, W, 3) in 0..255
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> uint8, rounding rather than truncating (no half-level darkening)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
