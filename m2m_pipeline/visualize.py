"""Image grids: preceding | generated, one row per set (Fig. 4 layout)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m2m_pipeline.io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def set_grid(context: torch.Tensor, generated: torch.Tensor, gap: int = 4) -> Image.Image:
    """context (B, n, 3, H, W) and generated (B, K, 3, H, W), in [-1, 1] -> one PIL image, a row per set,
    preceding images left of a white gap and generated images right of it."""
    if context.ndim != 5 or generated.ndim != 5 or context.shape[0] != generated.shape[0]:
        raise ValueError(f"expected (B, n, 3, H, W) and (B, K, 3, H, W), got {tuple(context.shape)} and "
                         f"{tuple(generated.shape)}")
    b, n, _, h, w = context.shape
    k = generated.shape[1]
    canvas = np.full((b * h + (b - 1) * 2, (n + k) * w + gap, 3), 255, dtype=np.uint8)
    ctx, gen = to_uint8(context), to_uint8(generated)
    for row in range(b):
        y = row * (h + 2)
        for j in range(n):
            canvas[y : y + h, j * w : (j + 1) * w] = ctx[row, j]
        for j in range(k):
            x = n * w + gap + j * w
            canvas[y : y + h, x : x + w] = gen[row, j]
    return Image.fromarray(canvas)


def save_set_grid(context: torch.Tensor, generated: torch.Tensor, path: str | os.PathLike, scale: int = 1) -> Path:
    image = set_grid(context, generated)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
