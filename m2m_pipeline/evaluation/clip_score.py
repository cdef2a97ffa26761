"""CLIP scores (Sec. 8.4): text-image against the caption, image-image against the preceding images.

Score = 100 x cosine of L2-normalised open_clip embeddings, **not** clamped at 0 (torchmetrics' CLIPScore
clamps with max(., 0); the two agree whenever the cosine is >= 0, which holds for real CLIP models on
natural images, but an unclamped score keeps a collapsed model's negative similarities visible).

Weights are local only: `model` is an open_clip name with `pretrained` a local checkpoint file, or
"local-dir:/path" (open_clip_config.json + weights), or a name with pretrained=None (random init: tests
only; the report says so). A pretrained *tag* ("laion2b_s34b_b79k") is refused unless allow_download is
set, because open_clip fetches tags over the network and some without honouring HF_HUB_OFFLINE.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2m_pipeline.weights import WeightsNotFoundError


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class ClipScorer:
    """open_clip model + its own preprocessing + tokenizer; embeddings are L2-normalised."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | os.PathLike | None = None, device: str = "cpu",
                 allow_download: bool = False, clamp_at_zero: bool = False):
        import open_clip

        weights: str | None = None
        if model.startswith("local-dir:"):
            folder = Path(model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise WeightsNotFoundError(f"CLIP folder {folder} has no open_clip_config.json")
            weights = "local-dir"
        elif pretrained is not None:
            p = Path(pretrained).expanduser()
            if p.is_file():
                pretrained, weights = str(p), _file_hash(p)
            elif not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise WeightsNotFoundError(
                    f"CLIP pretrained {str(pretrained)!r} for {model!r} is not a local file; this project does not "
                    f"download weights. Pass a local checkpoint file, or model='local-dir:/path' with "
                    f"open_clip_config.json and weights.")
            else:
                weights = f"tag:{pretrained}"
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if pretrained is None else str(pretrained), device=device)
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            raise WeightsNotFoundError(f"cannot build CLIP {model!r} (pretrained={pretrained!r}): {err}") from err
        self.model = net.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.clamp_at_zero = clamp_at_zero
        if weights == "local-dir":
            ckpt = open_clip.factory._find_checkpoint_in_dir(Path(model.removeprefix("local-dir:")))
            weights = _file_hash(Path(ckpt)) if ckpt else None
        self.info: dict[str, Any] = {
            "model": model, "pretrained": None if pretrained is None else str(pretrained),
            "weights_sha256": weights or "random-init (no pretrained weights: scores are not meaningful)",
            "scale": "100 x cosine", "clamped_at_zero": clamp_at_zero,
            "preprocess": "open_clip image transform on uint8 PIL images",
        }

    def _score(self, cos: torch.Tensor) -> torch.Tensor:
        s = 100.0 * cos
        return s.clamp_min(0.0) if self.clamp_at_zero else s

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(..., 3, H, W) in [-1, 1] -> (..., E) unit vectors."""
        if images.ndim < 4 or images.shape[-3] != 3:
            raise ValueError(f"CLIP images must be (..., 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        u8 = ((flat.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        u8 = u8.permute(0, 2, 3, 1).numpy()
        out = []
        for i in range(0, len(u8), batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(a))) for a in u8[i : i + batch_size]])
            out.append(self.model.encode_image(x.to(self.device)).float())
        e = torch.cat(out)
        return (e / e.norm(dim=-1, keepdim=True)).reshape(*lead, -1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(T,) captions -> (T, E) unit vectors."""
        e = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return (e / e.norm(dim=-1, keepdim=True)).cpu()

    def image_image(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Mean score of each image against its set's references: (B, 3, H, W), (B, R, 3, H, W) -> (B,)."""
        return self.image_image_from_embeddings(self.image_embeddings(images), self.image_embeddings(references))

    def text_image(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Score of each image against its caption: (B, 3, H, W), B captions -> (B,)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return self.text_image_from_embeddings(self.image_embeddings(images), self.text_embeddings(captions))

    # The scores from embeddings already computed: the paper protocol embeds each batch once while it generates
    # and scores every position from those (protocol.run_paper_protocol); one definition for both paths.
    def image_image_from_embeddings(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """(B, ..., E) unit vectors against (B, R, E) -> (B, ...): the mean score over the R references."""
        lead = images.shape[1:-1]
        flat = images.reshape(images.shape[0], -1, images.shape[-1])           # (B, M, E)
        cos = torch.einsum("bme,bre->bmr", flat, references)
        return self._score(cos).mean(dim=-1).reshape(images.shape[0], *lead)

    def text_image_from_embeddings(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """(B, ..., E) image unit vectors against their set's (B, E) caption vector -> (B, ...)."""
        t = texts.reshape(texts.shape[0], *([1] * (images.ndim - 2)), texts.shape[-1])
        return self._score((images * t).sum(-1))
