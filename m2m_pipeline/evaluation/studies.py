"""The paper's qualitative studies as measurements (Sec. 8.1-8.3, 9): generation for drift over long runs,
for a varying number of preceding images (Fig. 6), and zero-shot continuation of real photographs (Fig. 5).

Plain functions over a network and clean context latents; scoring is the caller's (oracle on the shapes
world, CLIP where the sets carry real captions: `clip_consistency`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from m2m_pipeline.sampling import generate

Encoder = Callable[[torch.Tensor], torch.Tensor] | None

# Photographs that ship inside scikit-image's wheel (no download): the zero-shot continuation inputs.
REAL_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field",
                                "immunohistochemistry")


@dataclass(frozen=True)
class SamplingSpec:
    """How every study samples; recorded in every report."""

    steps: int = 25                  # DDIM steps
    guidance_scale: float = 3.0      # s of Eq. 6
    window: int | None = None        # context window W (None: every preceding image)
    anchors: int = 0                 # first images always kept in the window (sampling.window_indices)
    seed: int = 0                    # set b uses seed + b; image k of a set depends on (seed + b, k) only
    precision: str = "float32"       # autocast of the network calls (m2m_pipeline/precision.py; compute.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def continue_sets(net, context: torch.Tensor, num_images: int, spec: SamplingSpec, *,
                  context_encoder: Encoder = None, guidance_scale: float | None = None,
                  progress: bool = False) -> torch.Tensor:
    """(B, n_c, C, H, W) clean latents -> (B, num_images, C, H, W) generated autoregressively."""
    b = context.shape[0]
    return generate(net, context.to(net.device), num_images, context_encoder=context_encoder, steps=spec.steps,
                    guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
                    window=spec.window, anchors=spec.anchors, seed=[spec.seed + i for i in range(b)], progress=progress,
                    precision=spec.precision).cpu()


def context_count_sweep(net, context: torch.Tensor, spec: SamplingSpec, counts: Sequence[int] = (1, 2, 3, 4), *,
                        context_encoder: Encoder = None) -> dict[int, torch.Tensor]:
    """Fig. 6 as a measurement: the first image generated after the first k preceding images, k in counts.

    The same seeds are used for every k, so only the number of preceding images changes.
    Returns {k: (B, 1, C, H, W)}.
    """
    if max(counts) > context.shape[1]:
        raise ValueError(f"counts up to {max(counts)} need that many context images, got {context.shape[1]}")
    return {k: continue_sets(net, context[:, :k], 1, spec, context_encoder=context_encoder) for k in counts}


def real_photo_sets(image_size: int, views: int = 4, names: Sequence[str] = REAL_PHOTOS, seed: int = 0
                    ) -> tuple[torch.Tensor, list[str]]:
    """Sets of real photographs for zero-shot continuation (Fig. 5): per photo, `views` random square crops
    (60-100% of the short side) resized to `image_size` - one scene seen several times, as an MIS set is
    one caption rendered several times. Any mode (grey, RGBA) becomes RGB. Returns (S, views, 3, H, W) in
    [-1, 1] and the photo names."""
    from skimage import (
        data as skdata,  # scikit-image ships these files inside its wheel
    )

    rng = np.random.default_rng(seed)
    sets = []
    for name in names:
        image = np.asarray(getattr(skdata, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 127.5 - 1
        _, h, w = image.shape
        crops = []
        for _ in range(views):
            side = int(min(h, w) * rng.uniform(0.6, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = image[:, top:top + side, left:left + side][None]
            crops.append(F.interpolate(crop, size=(image_size, image_size), mode="bilinear", antialias=True,
                                       align_corners=False)[0])
        sets.append(torch.stack(crops))
    return torch.stack(sets).clamp(-1, 1), list(names)


# ---------------------------------------------------------------------- CLIP scoring (the paper's sets)
@torch.no_grad()
def clip_consistency(net, autoencoder, clip, context: torch.Tensor, references: torch.Tensor, num_images: int,
                     spec: SamplingSpec, *, context_encoder: Encoder = None, batch_size: int = 16, keep: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where no oracle applies (real captions): CLIP image-image consistency by position of `num_images`
    images generated after `context` (B, k, C, h, w) against each set's `references` (B, R, C, h, w), the
    set's preceding images (mean over them, 100 x cosine, as the protocol's CLIP-I). Generated batch by batch
    (set b still samples with spec.seed + b, so the images equal one `continue_sets` call); only embeddings
    are kept. Returns ((num_images,) mean over sets, decoded pixels (keep, num_images, 3, H, W) or None)."""
    scores, kept = [], []
    decode = lambda z: autoencoder.decode(z.flatten(0, 1).to(net.device)).unflatten(0, z.shape[:2]).float().cpu()
    for start in range(0, context.shape[0], batch_size):
        part = SamplingSpec(**{**spec.to_dict(), "seed": spec.seed + start})
        z = continue_sets(net, context[start : start + batch_size], num_images, part, context_encoder=context_encoder)
        images = decode(z)
        ref = clip.image_embeddings(decode(references[start : start + batch_size]))
        scores.append(clip.image_image_from_embeddings(clip.image_embeddings(images), ref))  # (b, num_images)
        if start < keep:
            kept.append(images[: keep - start])
    return torch.cat(scores).mean(0), (torch.cat(kept) if kept else None)


# ---------------------------------------------------------------------- oracle scoring (shapes world)
# The learnability bar of the CPU demo (docs/model.md "Learnability"): consistency of the first generated image with its set.
# "background" counts an image only when both the pattern and the background colour are right.
LEARNABILITY_TARGETS: dict[str, float] = {"colour": 0.90, "background": 0.80, "shape": 0.50}


def oracle_consistency(oracle, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """images (B, K, 3, H, W) in [-1, 1], targets {attribute: (B,)} -> {name: (K,)} fractions of sets whose
    k-th image shows the set's value: every attribute, plus "background" (pattern and colour both right)."""
    predicted = oracle.predict(images)  # {attribute: (B, K)}
    hit = {name: predicted[name] == targets[name][:, None] for name in targets}
    out = {name: h.float().mean(0) for name, h in hit.items()}
    out["background"] = (hit["background"] & hit["background_colour"]).float().mean(0)
    out["background_pattern"] = hit["background"].float().mean(0)
    return out


def chance_consistency() -> dict[str, float]:
    """What images unrelated to their set score: 1 / number of values (joint for the background)."""
    from m2m_pipeline.data.shapes import VOCABULARIES

    n = {name: len(v) for name, v in VOCABULARIES.items()}
    return {"shape": 1 / n["shape"], "colour": 1 / n["colour"], "background_colour": 1 / n["background_colour"],
            "background_pattern": 1 / n["background"], "background": 1 / (n["background"] * n["background_colour"])}


def learnability_verdict(guided: dict[str, float], unconditional: dict[str, float],
                         targets: dict[str, float] = LEARNABILITY_TARGETS) -> dict[str, dict[str, float | bool]]:
    """Per target attribute: the guided position-1 consistency, its target, whether it is met, and the
    unconditional branch's value next to chance."""
    chance = chance_consistency()
    return {name: {"guided": guided[name], "target": target, "met": guided[name] >= target,
                   "unconditional": unconditional[name], "chance": chance[name]}
            for name, target in targets.items()}
