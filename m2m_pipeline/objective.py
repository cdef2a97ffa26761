"""The training objective of Eq. 5, with the condition drops that classifier-free guidance needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from einops import rearrange

from m2m_pipeline.network.config import M2MConfig


@dataclass(frozen=True)
class DropConfig:
    p_drop_image: float = 0.10       # Sec. 6.1: zero the clean-image condition of the whole set
    # With a task condition (Sec. 6.2, Eq. 7, docs/tasks.md "Choices") drops are drawn per set from one categorical,
    # so every branch of Eq. 7 is trained: (no image, no task), (image, no task), and (image, task).
    p_drop_both: float = 0.05
    p_drop_task_only: float = 0.05
    p_drop_image_only: float = 0.05

    def __post_init__(self) -> None:
        for name in ("p_drop_image", "p_drop_both", "p_drop_task_only", "p_drop_image_only"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DropConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.p_drop_both + self.p_drop_task_only + self.p_drop_image_only > 1.0:
            raise ValueError("DropConfig: p_drop_both + p_drop_task_only + p_drop_image_only must be <= 1")


def sample_drops(b: int, with_task: bool, drops: DropConfig, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) drop_image and drop_task masks."""
    u = torch.rand(b, generator=generator)
    if not with_task:
        return u < drops.p_drop_image, None
    both = u < drops.p_drop_both
    task_only = (u >= drops.p_drop_both) & (u < drops.p_drop_both + drops.p_drop_task_only)
    image_only = (u >= drops.p_drop_both + drops.p_drop_task_only) & (
        u < drops.p_drop_both + drops.p_drop_task_only + drops.p_drop_image_only)
    return both | image_only, both | task_only


class M2MObjective:
    """L = E ||eps - eps_theta(z_t^{1:N}, z_0^{1:N}, t)||^2 over all N noisy images of a set (Eq. 5).

    With `prediction_type="v_prediction"` (CPU presets) the target is v = sqrt(a_t) eps - sqrt(1 - a_t) z_0.

    t is drawn independently for every image of a set: each image's prediction is conditioned on clean
    context only, so independent noise levels are valid and decorrelate the N terms of the sum (the paper
    writes a single t; with N images this is the same expectation, with lower variance).
    """

    def __init__(self, config: M2MConfig, drops: DropConfig = DropConfig(), snr_gamma: float = 0.0,
                 context_noise: int = 0):
        self.scheduler = DDPMScheduler(**config.scheduler_kwargs())
        self.drops = drops
        # Context-noise augmentation (Diffusion Forcing / CausVid's context_noise; docs/training.md
        # "Against drift"), M2M-Self only: each set's context latents are noised to t_c ~ U{0..context_noise}
        # and the clean stream is told t_c, so the network learns to read imperfect context, as it gets from its own generations. 0: off (the paper).
        if context_noise < 0 or context_noise >= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"context_noise must be in [0, {self.scheduler.config.num_train_timesteps}), "
                             f"got {context_noise}")
        if context_noise and config.variant != "self":
            raise ValueError("context_noise is defined for M2M-Self only (M2M-DINO attends to DINO tokens)")
        self.context_noise = context_noise
        if snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0 (0: unweighted), got {snr_gamma}")
        self.snr_gamma = snr_gamma
        self._snr_weights = self._min_snr_table()  # (T,): looked up per step, not recomputed
        self.with_task = config.task != "none"

    def __call__(self, net: torch.nn.Module, z_0: torch.Tensor, context: torch.Tensor,
                 task_cond: torch.Tensor | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """z_0: (B, N, C, H, W) clean latents; context: z_0 itself (self) or DINO tokens (B, N, S, D)."""
        b, n, c, h, w = z_0.shape
        device = z_0.device
        eps = torch.randn(z_0.shape, generator=generator, device="cpu").to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b, n), generator=generator).to(device)
        z_t = self.scheduler.add_noise(
            rearrange(z_0, "b n c h w -> (b n) c h w"), rearrange(eps, "b n c h w -> (b n) c h w"),
            rearrange(t, "b n -> (b n)"),
        )
        z_t = rearrange(z_t, "(b n) c h w -> b n c h w", b=b)
        # Image N is nobody's context (image i sees images j < i): its clean stream would be wasted work.
        context = context[:, : max(1, n - 1)]
        drop_image, drop_task = sample_drops(b, self.with_task and task_cond is not None, self.drops, generator)
        extra = {}
        if self.context_noise:  # drawn after everything else: with context_noise = 0 the RNG stream is today's
            context, extra["context_t"] = self.noise_context(context, generator)
        pred = net(z_t, t, context, task_cond, drop_image=drop_image.to(device),
                   drop_task=None if drop_task is None else drop_task.to(device), **extra)
        target = eps
        if self.scheduler.config.prediction_type == "v_prediction":
            target = rearrange(self.scheduler.get_velocity(
                rearrange(z_0, "b n c h w -> (b n) c h w"), rearrange(eps, "b n c h w -> (b n) c h w"),
                rearrange(t, "b n -> (b n)")), "(b n) c h w -> b n c h w", b=b)
        if not self.snr_gamma:
            return F.mse_loss(pred.float(), target.float())
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(2, 3, 4))  # (B, N)
        return (per_image * self.min_snr_weights(t)).mean()

    def noise_context(self, context: torch.Tensor, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, C, H, W) clean context latents -> (noised to t_c per set, t_c (B,)); t_c = 0 leaves a set clean."""
        b, n = context.shape[:2]
        t_c = torch.randint(0, self.context_noise + 1, (b,), generator=generator).to(context.device)
        eps = torch.randn(context.shape, generator=generator, device="cpu").to(context.device)
        noised = self.scheduler.add_noise(rearrange(context, "b n c h w -> (b n) c h w"),
                                          rearrange(eps, "b n c h w -> (b n) c h w"), t_c.repeat_interleave(n))
        noised = rearrange(noised, "(b n) c h w -> b n c h w", b=b)
        return torch.where((t_c > 0).view(b, 1, 1, 1, 1), noised, context), t_c

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights of timesteps t (any shape); see `_min_snr_table`."""
        return self._snr_weights.to(t.device)[t]

    def _min_snr_table(self) -> torch.Tensor:
        """Min-SNR-gamma weight of every timestep (Hang et al. 2023), as diffusers' train_text_to_image
        `--snr_gamma`: min(SNR, gamma) / SNR for an eps target, min(SNR, gamma) / (SNR + 1) for v. They cap the
        weight of the low-noise steps, which dominate the plain loss but decide no layout."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, torch.arange(self.scheduler.config.num_train_timesteps))
        capped = torch.clamp(snr, max=self.snr_gamma)
        return capped / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else capped / snr
