"""The image-set generator interface (Sec. 4): captions and seeds in, sets of images out.

Each image's randomness comes from `image_seed(caption_id, index, base_seed)`, never from a shared
stream, so image k of caption c is the same whether it is rendered in a batch of 100 sets or alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from m2m_pipeline.data.captions import Caption


def image_seed(caption_id: str, index: int, base_seed: int = 0) -> int:
    """63-bit seed of image `index` of caption `caption_id`; stable across machines and Python runs."""
    digest = hashlib.sha256(f"{base_seed}:{caption_id}:{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class ImageSet:
    key: str                                   # caption id; the webdataset sample key
    caption: str
    images: torch.Tensor                       # (K, 3, H, W) float in [-1, 1], on CPU
    indices: list[int]                         # which of the set's images these are (0..images_per_set-1)
    seeds: list[int]                           # image_seed of each image, in `indices` order
    latents: torch.Tensor | None = None        # (K, C, h, w) final denoised latents (SD only), on CPU
    attributes: dict[str, Any] | None = None   # ground truth (procedural world only)
    params: dict[str, Any] = field(default_factory=dict)  # generation parameters recorded in the shard


@runtime_checkable
class SetGenerator(Protocol):
    images_per_set: int

    def generation_params(self) -> dict[str, Any]:
        """Everything that determines the pixels besides captions and seeds (model, scheduler, steps...)."""
        ...

    def generate(self, captions: Sequence[Caption], indices: Sequence[int] | None = None) -> list[ImageSet]:
        """Render images `indices` (default: all) of every caption; one ImageSet per caption, in order."""
        ...
