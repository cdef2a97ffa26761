"""A procedural image world with known ground truth, standing in for Stable Diffusion on CPU.

Every caption names a shape, its colour, a background pattern and a background colour
("a red triangle on a striped purple background"). The 25 images of a set share those attributes and
differ in placement, size, rotation, pattern phase and a small colour jitter, as SD's images of one
caption share content and differ in layout. Later issues train an attribute classifier on these images
and measure whether M2M keeps the context's colour / shape / background.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from m2m_pipeline.data.captions import Caption, write_caption_tsv
from m2m_pipeline.data.generators import ImageSet, image_seed

# Saturated foreground colours and dark, muted background colours: every foreground stays clearly
# separable from every background at 16-32 px, even after jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 245),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 24),
    "grey": (105, 105, 110),
    "brown": (95, 60, 30),
    "purple": (70, 35, 100),
}
# Attribute name -> vocabulary; the class id of a value is its position.
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "background_colour": tuple(BACKGROUND_COLOURS),
}
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} {background_colour} background",
    "an image of a {colour} {shape} over a {background} {background_colour} backdrop",
    "{colour} {shape}, {background} {background_colour} background",
    "a picture showing a {colour} {shape} in front of a {background} {background_colour} wall",
)
_WORD_TO_ATTRIBUTE = {word: (name, i) for name, vocab in VOCABULARIES.items() for i, word in enumerate(vocab)}

SIZE_RANGE = (0.38, 0.62)    # shape size as a fraction of the image side
COLOUR_JITTER = 14           # max per-channel offset of the foreground colour, in 0..255 units
SUPERSAMPLE = 4              # sub-pixels per pixel side: anti-aliased edges, still exact and seeded


def attributes_of(caption: str) -> dict[str, int]:
    """Parse a caption of the grammar back to class ids; the vocabularies are disjoint, so words suffice."""
    found: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in _WORD_TO_ATTRIBUTE:
            name, index = _WORD_TO_ATTRIBUTE[word]
            if name in found and found[name] != index:
                raise ValueError(f"caption {caption!r} names two values for attribute {name!r}")
            found[name] = index
    missing = [name for name in VOCABULARIES if name not in found]
    if missing:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar: no {', '.join(missing)}")
    return found


def caption_of(ids: dict[str, int], template: int = 0) -> str:
    words = {name: VOCABULARIES[name][ids[name]] for name in VOCABULARIES}
    return TEMPLATES[template].format(**words)


def random_captions(num: int, seed: int) -> list[tuple[str, str]]:
    """`num` (url, caption) rows drawn uniformly from the grammar; the url names the draw."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        ids = {name: int(rng.integers(len(vocab))) for name, vocab in VOCABULARIES.items()}
        rows.append((f"shapes://{seed}/{i}", caption_of(ids, int(rng.integers(len(TEMPLATES))))))
    return rows


def write_shapes_caption_tsv(path: str | os.PathLike, num: int, seed: int = 0) -> os.PathLike:
    """The procedural world's caption source, in CC12M format so `filter_captions` runs unchanged."""
    return write_caption_tsv(path, random_captions(num, seed))


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, size: float) -> np.ndarray:
    """Inside-test on coordinates already centred on the shape and rotated into its frame."""
    half = size / 2
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        side = half * 0.85  # area close to the circle's so size does not reveal the shape
        return (np.abs(x) <= side) & (np.abs(y) <= side)
    if shape == "triangle":
        r = half * 1.15  # circumradius; the three edges are half-planes at distance r/2 from the centre
        inside = np.ones_like(x, dtype=bool)
        for k in range(3):
            angle = math.pi / 2 + k * 2 * math.pi / 3
            inside &= x * math.cos(angle) + y * math.sin(angle) >= -r / 2
        return inside
    if shape == "cross":
        arm = half / 3
        return ((np.abs(x) <= half) & (np.abs(y) <= arm)) | ((np.abs(y) <= half) & (np.abs(x) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(background: str, x: np.ndarray, y: np.ndarray, period: float, phase: tuple[float, float]) -> np.ndarray:
    """1 where the pattern's second tone shows, 0 elsewhere."""
    u, v = (x + phase[0]) / period, (y + phase[1]) / period
    if background == "plain":
        return np.zeros_like(x)
    if background == "striped":
        return (np.floor(u * 2) % 2).astype(np.float64)
    if background == "checkered":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float64)
    if background == "dotted":
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return (du * du + dv * dv <= 0.28**2).astype(np.float64)
    raise ValueError(f"unknown background {background!r}")


def render_image(ids: dict[str, int], seed: int, resolution: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One image, (H, W, 3) uint8, and its per-image placement; deterministic in (ids, seed, resolution)."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[ids["shape"]]
    colour = np.array(COLOURS[VOCABULARIES["colour"][ids["colour"]]], dtype=np.float64)
    background = BACKGROUNDS[ids["background"]]
    bg = np.array(BACKGROUND_COLOURS[VOCABULARIES["background_colour"][ids["background_colour"]]], dtype=np.float64)
    bg2 = np.clip(bg + 55.0, 0, 255)  # pattern's second tone: lighter, same hue

    size = rng.uniform(*SIZE_RANGE) * resolution
    margin = size * 0.6
    cx, cy = rng.uniform(margin, resolution - margin, size=2) if resolution > 2 * margin else (resolution / 2,) * 2
    rotation = rng.uniform(0.0, 360.0)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fg = np.clip(colour + jitter, 0, 255)
    period = max(4.0, resolution / 4)
    phase = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))

    n = resolution * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / SUPERSAMPLE
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    theta = math.radians(rotation)
    dx, dy = xs - cx, ys - cy
    rx, ry = dx * math.cos(theta) + dy * math.sin(theta), -dx * math.sin(theta) + dy * math.cos(theta)
    alpha = _shape_mask(shape, rx, ry, size).astype(np.float64)
    tone = _pattern(background, xs, ys, period, phase)

    canvas = bg * (1 - tone)[..., None] + bg2 * tone[..., None]
    canvas = canvas * (1 - alpha)[..., None] + fg * alpha[..., None]
    canvas = canvas.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    placement = {
        "center": [round(cx / resolution, 6), round(cy / resolution, 6)],  # fractions of the side
        "size": round(size / resolution, 6),
        "rotation": round(rotation, 4),                                    # degrees
        "colour_rgb": [int(c) for c in fg],
    }
    return image, placement


def uint8_to_images(array: np.ndarray) -> torch.Tensor:
    """(K, H, W, 3) uint8 -> (K, 3, H, W) float in [-1, 1]; exact inverse of the shard encoder's rounding."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_dataset(num: int, image_size: int, seed: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` images with uniformly random attributes -> (num, 3, S, S) in [-1, 1] and labels (num, 4).

    Per-image attributes (not per-set): the oracle and the autoencoder must not rely on set structure. The
    renderer's own variation (placement, size, rotation, pattern phase, colour jitter) is the geometric jitter.
    """
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.integers(len(VOCABULARIES[name]), size=num) for name in VOCABULARIES], axis=1)
    seeds = rng.integers(0, 2**63 - 1, size=num)
    images = np.empty((num, image_size, image_size, 3), dtype=np.uint8)
    for i in tqdm(range(num), desc=f"render shapes images ({image_size}px)", disable=not progress, leave=False):
        ids = dict(zip(VOCABULARIES, (int(v) for v in labels[i])))
        images[i], _ = render_image(ids, int(seeds[i]), image_size)
    return uint8_to_images(images), torch.from_numpy(labels).long()


class ShapesSetGenerator:
    """Procedural stand-in for SD 2.1 in Sec. 4: same caption -> 25 varied images of the same attributes."""

    def __init__(self, resolution: int = 32, images_per_set: int = 25, base_seed: int = 0):
        self.resolution = resolution        # pixels per side
        self.images_per_set = images_per_set
        self.base_seed = base_seed          # mixed into every per-image seed

    vocabularies = VOCABULARIES

    def generation_params(self) -> dict[str, Any]:
        return {
            "generator": "shapes", "model": "procedural-shapes-v1", "height": self.resolution,
            "width": self.resolution, "base_seed": self.base_seed, "supersample": SUPERSAMPLE,
        }

    def generate(self, captions: Sequence[Caption], indices: Sequence[int] | None = None) -> list[ImageSet]:
        indices = list(range(self.images_per_set)) if indices is None else list(indices)
        sets = []
        for caption in captions:
            ids = attributes_of(caption.text)
            seeds = [image_seed(caption.id, i, self.base_seed) for i in indices]
            rendered = [render_image(ids, seed, self.resolution) for seed in seeds]
            images = uint8_to_images(np.stack([image for image, _ in rendered]))  # (K, 3, H, W)
            attributes = {
                "ids": ids,
                "names": {name: VOCABULARIES[name][i] for name, i in ids.items()},
                "images": [dict(index=i, **placement) for i, (_, placement) in zip(indices, rendered)],
            }
            sets.append(ImageSet(caption.id, caption.text, images, indices, seeds, None, attributes,
                                 {**self.generation_params(), "seeds": seeds}))
        return sets
