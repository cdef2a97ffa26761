"""Procedural stand-in for VGSI: short procedures in which one thing changes step by step.

Written in the folder layout `vgsi.py` reads (`<root>/<article>/<method>/step_NN.png`), one method per
article. Each procedure has 6-10 steps and one kind of change, with random colours and geometry:
  grow  a bar grows from one side (direction random),
  pie   a disc fills in as a pie wedge (start angle and sense random),
  move  a disc moves along a straight line (end points random).
Step k has progress p_k = k / (n - 1) in [0, 1]; the image is a known function of p, so the true next
step exists and `measure_progress` can read p back from any image (the attribute check).
`<method>/attributes.json` stores what the generator knows; the reader ignores non-image files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2m_pipeline.io import atomic_directory
from m2m_pipeline.tasks.images import to_uint8

KINDS: tuple[str, ...] = ("grow", "pie", "move")
STEP_RANGE = (6, 10)            # steps per procedure, inclusive
ATTRIBUTES_NAME = "attributes.json"
# Foreground and background are drawn from one palette without replacement: always distinct colours.
PALETTE: np.ndarray = np.array([
    (0.90, 0.15, 0.15), (0.15, 0.75, 0.25), (0.20, 0.35, 0.95), (0.95, 0.85, 0.15), (0.85, 0.20, 0.85),
    (0.15, 0.85, 0.90), (0.98, 0.55, 0.10), (0.95, 0.95, 0.95), (0.10, 0.10, 0.12), (0.45, 0.45, 0.50),
])
BAR_THICKNESS, BAR_MIN, BAR_MAX = 0.22, 0.10, 0.85   # fractions of the image side
PIE_RADIUS, PIE_MIN_FRACTION = 0.36, 0.08            # the pie is never empty: step 0 is visible
DOT_RADIUS = 0.13


def article_name(index: int) -> str:
    return f"proc_{index:06d}"


def make_procedure(rng: np.random.Generator) -> dict[str, Any]:
    """Kind, step count, colours and geometry of one procedure (JSON-serialisable)."""
    kind = KINDS[rng.integers(len(KINDS))]
    n_steps = int(rng.integers(STEP_RANGE[0], STEP_RANGE[1] + 1))
    fg, bg = PALETTE[rng.choice(len(PALETTE), size=2, replace=False)]
    if kind == "grow":
        params = {"direction": ["right", "left", "down", "up"][rng.integers(4)], "offset": float(rng.uniform(0.3, 0.7))}
    elif kind == "pie":
        params = {"start_angle": float(rng.uniform(0, 2 * math.pi)), "sense": int(rng.choice([-1, 1]))}
    else:
        while True:  # end points far enough apart that every step moves visibly
            a, b = rng.uniform(0.2, 0.8, size=(2, 2))
            if np.linalg.norm(b - a) >= 0.4:
                break
        params = {"start": a.tolist(), "end": b.tolist()}
    return {"kind": kind, "n_steps": n_steps, "fg": fg.tolist(), "bg": bg.tolist(), "params": params,
            "progress": [k / (n_steps - 1) for k in range(n_steps)]}


def coverage(meta: dict[str, Any], progress: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Foreground mask at unit-square sample points (x right, y down) for a given progress."""
    kind, params = meta["kind"], meta["params"]
    if kind == "grow":
        length = BAR_MIN + (BAR_MAX - BAR_MIN) * progress
        along, across = {"right": (x, y), "left": (1 - x, y), "down": (y, x), "up": (1 - y, x)}[params["direction"]]
        start = (1 - BAR_MAX) / 2
        return (along >= start) & (along < start + length) & (np.abs(across - params["offset"]) < BAR_THICKNESS / 2)
    if kind == "pie":
        dx, dy = x - 0.5, y - 0.5
        angle = (params["sense"] * (np.arctan2(dy, dx) - params["start_angle"])) % (2 * math.pi)
        fraction = PIE_MIN_FRACTION + (1 - PIE_MIN_FRACTION) * progress
        return (dx ** 2 + dy ** 2 < PIE_RADIUS ** 2) & (angle < 2 * math.pi * fraction)
    if kind == "move":
        centre = np.array(params["start"]) + progress * (np.array(params["end"]) - np.array(params["start"]))
        return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < DOT_RADIUS ** 2
    raise ValueError(f"unknown procedure kind {kind!r}; expected one of {KINDS}")


def render_step(meta: dict[str, Any], progress: float, image_size: int = 32, supersample: int = 4) -> np.ndarray:
    """(H, W, 3) float in [0, 1]; coverage at supersample^2 points per pixel (anti-aliased edges)."""
    s = image_size * supersample
    centres = (np.arange(s) + 0.5) / s
    x, y = np.meshgrid(centres, centres)
    mask = coverage(meta, progress, x, y).astype(np.float64)
    mask = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))[..., None]
    return np.asarray(meta["bg"]) + mask * (np.asarray(meta["fg"]) - np.asarray(meta["bg"]))


def write_procedure(root: str | os.PathLike, index: int, seed: int = 0, image_size: int = 32,
                    supersample: int = 4, overwrite: bool = False) -> Path:
    """Write procedure `index` as `<root>/<article>/method_0/`; a function of (seed, index) only.
    The article folder appears whole (renamed from a temp dir)."""
    root = Path(root)
    final = root / article_name(index)
    if final.exists() and not overwrite:
        return final
    meta = make_procedure(np.random.default_rng([seed, index]))
    meta.update(seed=seed, index=index, image_size=image_size)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(final) as tmp:
        method = tmp / "method_0"
        method.mkdir()
        for k, progress in enumerate(meta["progress"]):
            Image.fromarray(to_uint8(render_step(meta, progress, image_size, supersample))).save(method / f"step_{k:02d}.png")
        (method / ATTRIBUTES_NAME).write_text(json.dumps(meta, indent=1))
    return final


def write_procedures(root: str | os.PathLike, n_procedures: int, seed: int = 0, image_size: int = 32,
                     supersample: int = 4, overwrite: bool = False, start: int = 0) -> list[str]:
    """Write procedures start..start+n-1; returns their keys ("article/method"). Existing ones are kept."""
    return [f"{write_procedure(root, i, seed, image_size, supersample, overwrite).name}/method_0"
            for i in range(start, start + n_procedures)]


def load_attributes(root: str | os.PathLike, key: str) -> dict[str, Any]:
    """The generator's record of procedure `key` ("article/method", as ProcedureSteps items name it)."""
    return json.loads((Path(root) / key / ATTRIBUTES_NAME).read_text())


def measure_progress(image: torch.Tensor, meta: dict[str, Any]) -> float:
    """Read the progress p back from an image (3, H, W) in [-1, 1]: the attribute check.

    Each pixel's foreground weight is its colour projected on the bg->fg segment (clipped to [0, 1]), so
    anti-aliased edges count fractionally and a generated image in between colours gets partial credit.
    grow and pie: foreground area -> length / fraction -> p; move: foreground centroid projected on the
    path. An image with no foreground reads as NaN (counts as a failed check).
    """
    rgb = (image.detach().double().cpu().permute(1, 2, 0).numpy() + 1) / 2  # (H, W, 3) in [0, 1]
    fg, bg = np.asarray(meta["fg"]), np.asarray(meta["bg"])
    axis = fg - bg
    weight = np.clip((rgb - bg) @ axis / (axis @ axis), 0.0, 1.0)           # (H, W)
    h, w = weight.shape
    area = weight.sum() / (h * w)                                          # fraction of the unit square
    kind, params = meta["kind"], meta["params"]
    if area <= 1e-6:
        return float("nan")
    if kind == "grow":
        return float((area / BAR_THICKNESS - BAR_MIN) / (BAR_MAX - BAR_MIN))
    if kind == "pie":
        return float((area / (math.pi * PIE_RADIUS ** 2) - PIE_MIN_FRACTION) / (1 - PIE_MIN_FRACTION))
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    centroid = np.array([(weight.sum(0) * xs).sum(), (weight.sum(1) * ys).sum()]) / weight.sum()
    a, b = np.array(params["start"]), np.array(params["end"])
    return float((centroid - a) @ (b - a) / ((b - a) @ (b - a)))


def progress_error(images: torch.Tensor, metas: list[dict[str, Any]], steps: torch.Tensor) -> torch.Tensor:
    """|measured - true progress| for images (B, K, 3, H, W) meant to show steps (B, K) of procedures
    `metas`; NaN where the image shows no foreground. One progress step is 1 / (n_steps - 1)."""
    b, k = steps.shape
    errors = torch.empty(b, k, dtype=torch.float64)
    for i in range(b):
        n = metas[i]["n_steps"]
        for j in range(k):
            errors[i, j] = abs(measure_progress(images[i, j], metas[i]) - int(steps[i, j]) / (n - 1))
    return errors
