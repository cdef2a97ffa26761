"""Rollout context for training (Self-Forcing in spirit; docs/training.md "Against drift"): part of an
example's context replaced by the model's own generations, so training sees the inputs that long
autoregressive sampling feeds it.

For a chosen fraction of the sets of a batch, context images 1 .. N - 2 are regenerated one after another from
the images before them (the first stays real: the real preceding images of inference), with a cheap sampler
(few DDIM steps, guidance), no gradient through sampling, and the same window the sampler uses. The noisy
stream's targets stay the real images: image i learns to be the set's image i given context that looks like
the model's own. M2M-Self only (M2M-DINO's context would need the decoder and DINO inside the step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutConfig:
    fraction: float = 0.0        # share of the sets of a batch whose context is rolled out (0: off, the paper)
    steps: int = 4               # DDIM steps per rolled-out image
    guidance_scale: float = 3.0  # s of Eq. 6 while rolling out
    window: int | None = 4       # the sampler's window W

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0 or self.steps < 1 or self.guidance_scale < 0:
            raise ValueError(f"RolloutConfig: fraction in [0, 1], steps >= 1, guidance >= 0; got {self}")


@torch.no_grad()
def rollout_context(net, z_0: torch.Tensor, cfg: RolloutConfig, generator: torch.Generator) -> torch.Tensor:
    """z_0 (B, N, C, H, W) real latents -> context (B, N, C, H, W): the real images for most sets, and for
    `cfg.fraction` of them image 0 real and images 1 .. N - 2 generated from the ones before (image N - 1 is
    nobody's context). `net` is the unwrapped network; its train/eval mode is restored."""
    from m2m_pipeline.sampling import generate

    b, n = z_0.shape[:2]
    rolled = torch.rand(b, generator=generator) < cfg.fraction  # (B,)
    if n < 3 or not bool(rolled.any()):
        return z_0
    rows = torch.nonzero(rolled).squeeze(1).to(z_0.device)
    seeds = torch.randint(0, 2**31 - 1, (len(rows),), generator=generator).tolist()
    context = z_0.index_select(0, rows)[:, :1]  # (R, 1, C, H, W): the real first image
    was_training = net.training
    net.eval()
    try:
        for j in range(1, n - 1):
            z_j = generate(net, context, 1, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                           window=cfg.window, seed=[s + j for s in seeds], progress=False)
            context = torch.cat([context, z_j.to(context.dtype)], dim=1)
    finally:
        net.train(was_training)
    out = z_0.clone()
    out[rows, : n - 1] = context
    return out
