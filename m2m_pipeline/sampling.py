"""Auto-regressive sampling (Sec. 6.1 inference, Eq. 6 and Eq. 7): plain functions that only call the network.

The network is used through three members: `config`, `encode_context(...)` and `denoise(...)`, so any
callable with that surface (a stub in tests, a compiled model) can be sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from m2m_pipeline.network.context import ContextKV
from m2m_pipeline.precision import autocast_context

Callback = Callable[[int, int, int, torch.Tensor], None]  # (image k, step i, timestep t, z_t (B, C, H, W))


# ---------------------------------------------------------------------- guidance (Eq. 6, Eq. 7)
def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, s: float) -> torch.Tensor:
    """Eq. 6: eps(z_t, 0, t) + s * (eps(z_t, z_0^{1:W}, t) - eps(z_t, 0, t))."""
    return eps_uncond + s * (eps_cond - eps_uncond)


def dual_guidance(eps_none: torch.Tensor, eps_image: torch.Tensor, eps_image_task: torch.Tensor,
                  s_I: float, s_C: float) -> torch.Tensor:
    """Eq. 7: eps(0, 0) + s_I (eps(z_0, 0) - eps(0, 0)) + s_C (eps(z_0, c_C) - eps(z_0, 0))."""
    return eps_none + s_I * (eps_image - eps_none) + s_C * (eps_image_task - eps_image)


# ---------------------------------------------------------------------- context policies (docs/evaluation.md "Drift")
@dataclass(frozen=True)
class ContextPolicy:
    """Which earlier images image n attends to: `window_indices(n, window, anchors)`."""

    name: str
    window: int | None      # at most this many earlier images (None: all of them)
    anchors: int = 0        # of which the first `anchors` of the sequence (real preceding images) are always kept
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "window": self.window, "anchors": self.anchors, "label": self.label}


# Anchored policies keep k real images *and* the 4 most recent ones (window 4 + k), so each adds to the paper
# window instead of displacing recent images.
CONTEXT_POLICIES: dict[str, ContextPolicy] = {p.name: p for p in (
    ContextPolicy("window-4", 4, 0, "sliding window W = 4 (the paper protocol, Sec. 8.4)"),
    ContextPolicy("anchors-1", 5, 1, "the first real image kept + the 4 most recent"),
    ContextPolicy("anchors-2", 6, 2, "the first 2 real images kept + the 4 most recent"),
    ContextPolicy("anchors-4", 8, 4, "all 4 real images kept + the 4 most recent (the default, docs/evaluation.md 'Drift')"),
    ContextPolicy("all", None, 0, "every preceding image"),
)}
PAPER_POLICY = "window-4"
# The default of `m2m generate`, `m2m evaluate` and the smoke / demo evaluation (the paper preset keeps
# PAPER_POLICY to reproduce the paper's table). Chosen by `m2m drift` on the validation split for both demo
# variants (README "Drift per context policy"); position 1 is the same image under both policies, since the
# first generated image sees the same 4 real images.
DEFAULT_POLICY = "anchors-4"


def context_policy(name: str) -> ContextPolicy:
    if name not in CONTEXT_POLICIES:
        raise ValueError(f"unknown context policy {name!r}; choose from {sorted(CONTEXT_POLICIES)}")
    return CONTEXT_POLICIES[name]


# ---------------------------------------------------------------------- helpers
def window_indices(position: int, window: int | None, anchors: int = 0) -> list[int]:
    """Context images for the image at `position` (0-based): the last `window` images before it, of which
    the first `anchors` images of the sequence are always kept (attention-sink style, against drift)."""
    if window is None or window >= position:
        return list(range(position))
    if window < 0 or anchors < 0:
        raise ValueError(f"window and anchors must be >= 0, got window={window}, anchors={anchors}")
    kept = list(range(min(anchors, window, position)))
    recent = window - len(kept)
    return kept + list(range(max(len(kept), position - recent), position)) if recent else kept


def image_noise(shape: tuple[int, ...], seeds: Sequence[int], index: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Initial noise of generated image `index` of every set: one generator per (set seed, image index),
    so the same seeds give the same images whatever the batch composition."""
    out = []
    for seed in seeds:
        state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


def make_ddim(config, steps: int) -> Any:
    from diffusers import DDIMScheduler  # diffusers loads on first use: `m2m --help` lists the samplers without it

    # SD's DDIM settings (set_alpha_to_one=False, steps_offset=1) on the model's own noise schedule.
    scheduler = DDIMScheduler(**config.scheduler_kwargs(), set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def make_dpm_solver(config, steps: int) -> Any:
    """DPM-Solver++ (2nd order multistep, diffusers' DPMSolverMultistepScheduler) on the model's schedule."""
    from diffusers import DPMSolverMultistepScheduler

    kwargs = {k: v for k, v in config.scheduler_kwargs().items() if k != "clip_sample"}
    scheduler = DPMSolverMultistepScheduler(**kwargs, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


# Sampler name -> factory (config, steps) -> a diffusers scheduler with timesteps set. DDIM 50 is the paper's.
SCHEDULERS: dict[str, Callable[[Any, int], Any]] = {"ddim": make_ddim, "dpm++": make_dpm_solver}
SchedulerSpec = str | Callable[[Any, int], Any]


def make_scheduler(config, steps: int, sampler: SchedulerSpec = "ddim") -> Any:
    """A fresh scheduler (multistep solvers keep per-trajectory state): a SCHEDULERS name or a factory."""
    if callable(sampler):
        return sampler(config, steps)
    if sampler not in SCHEDULERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SCHEDULERS)} or pass a factory")
    return SCHEDULERS[sampler](config, steps)


def scheduler_step(scheduler: Any, eta: float) -> Callable[..., torch.Tensor]:
    """(guided, t, z, noise) -> the next z for this scheduler; eta and its noise only where the scheduler takes
    them (DDIM). Resolved once per trajectory, not per step."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):
        return lambda guided, t, z, noise: scheduler.step(guided, t, z, eta=eta, variance_noise=noise).prev_sample
    if eta > 0:
        raise ValueError(f"eta > 0 is DDIM's; {type(scheduler).__name__} is deterministic here")
    return lambda guided, t, z, noise: scheduler.step(guided, t, z).prev_sample


# ---------------------------------------------------------------------- branch bookkeeping
@dataclass(frozen=True)
class Branches:
    """Which guidance branches one batched forward evaluates, and how they combine (Eq. 6 or Eq. 7).

    q_index: per query row, the KV row it attends to (-1: image condition dropped). The KV rows are
    [no task condition | with task condition] for dual guidance, else one row per set.
    """

    b: int
    count: int                         # branches per set in the batched forward
    kv_rows: int
    q_index: torch.Tensor              # (count*B,)
    q_drop_task: torch.Tensor | None   # (count*B,) bool, task models only
    kv_drop_task: torch.Tensor | None  # (kv_rows,) bool, task models only
    guidance_scale: float
    task_guidance_scale: float | None

    @classmethod
    def build(cls, b: int, has_task: bool, guidance_scale: float, task_guidance_scale: float | None,
              device: torch.device) -> Branches:
        if task_guidance_scale is not None:
            # KV rows: [no task condition | with task condition]; query rows: [(0,0) | (I,0) | (I,C)].
            kv_drop_task = torch.tensor([True] * b + [False] * b, device=device)
            q_index = torch.cat([torch.full((b,), -1), torch.arange(b), torch.arange(b, 2 * b)]).to(device)
            q_drop_task = torch.tensor([True] * (2 * b) + [False] * b, device=device)
            return cls(b, 3, 2 * b, q_index, q_drop_task, kv_drop_task, guidance_scale, task_guidance_scale)
        kv_drop = torch.zeros(b, dtype=torch.bool, device=device) if has_task else None
        uncond = guidance_scale != 1.0  # s = 1 is the conditional prediction alone: skip the other branch
        q_index = torch.cat([torch.full((b,), -1), torch.arange(b)]).to(device) if uncond \
            else torch.arange(b, device=device)
        q_drop = (q_index < 0) if has_task else None  # Eq. 6 with a task: both conditions drop together
        return cls(b, q_index.numel() // b, b, q_index, q_drop, kv_drop, guidance_scale, None)

    def kv_tile(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x] * (self.kv_rows // self.b))

    def q_tile(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x] * self.count)

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        """(count*B, ...) predictions of the branches -> the guided prediction (B, ...)."""
        parts = eps.chunk(self.count)
        if self.task_guidance_scale is not None:
            return dual_guidance(parts[0], parts[1], parts[2], self.guidance_scale, self.task_guidance_scale)
        if self.count == 2:
            return classifier_free_guidance(parts[0], parts[1], self.guidance_scale)
        return parts[0]


def _check_inputs(cfg, context: torch.Tensor, num_images: int, context_encoder, task_cond, task_guidance_scale,
                  seed) -> list[int]:
    if context.ndim != 5:
        raise ValueError(f"context must be clean latents (B, n_c, C, H, W), got {tuple(context.shape)}")
    b, n_c = context.shape[:2]
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if cfg.variant == "dino" and context_encoder is None:
        raise ValueError("M2M-DINO needs context_encoder: latents (B, C, H, W) -> DINO tokens (B, S, D)")
    has_task = cfg.task != "none"
    if has_task and task_cond is None:
        raise ValueError(f"this model is conditioned on '{cfg.task}': pass task_cond (B, n_c + num_images, ...)")
    if task_cond is not None and tuple(task_cond.shape[:2]) != (b, n_c + num_images):
        raise ValueError(f"task_cond must start with (B, n_c + num_images) = ({b}, {n_c + num_images}), "
                         f"got {tuple(task_cond.shape)}")
    if task_guidance_scale is not None and not has_task:
        raise ValueError("task_guidance_scale (Eq. 7) needs a model with a task condition")
    seeds = [seed] * b if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"seed must be an int or {b} ints (one per set), got {len(seeds)}")
    return seeds


# ---------------------------------------------------------------------- the sampler
@torch.no_grad()
def generate(
    net,
    context: torch.Tensor,
    num_images: int,
    *,
    context_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    task_cond: torch.Tensor | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    task_guidance_scale: float | None = None,
    window: int | None = None,
    anchors: int = 0,
    seed: int | Sequence[int] = 0,
    use_cache: bool = True,
    eta: float = 0.0,
    sampler: SchedulerSpec = "ddim",
    progress: bool = True,
    callback: Callback | None = None,
    context_noise: int = 0,
    precision: str | torch.dtype = "float32",
) -> torch.Tensor:
    """Generate `num_images` latents after the given context images, one at a time (Fig. 1).

    net:                 an M2MUNet (or anything with its `config`, `encode_context`, `denoise`).
    context:             (B, n_c, C, H, W) clean latents of the given images; n_c may be 0.
    context_encoder:     latents (B, C, H, W) -> what the network attends to: DINO tokens (B, S, D) for
                         M2M-DINO (required there); identity for M2M-Self.
    task_cond:           (B, n_c + num_images, ...) task condition of every image (camera / step position).
    steps:               denoising steps (Sec. 8.6: DDIM, 50).
    guidance_scale:      s of Eq. 6, or s_I of Eq. 7 when task_guidance_scale is given; 1 disables guidance.
    task_guidance_scale: s_C of Eq. 7 (dual guidance; needs a task-conditioned model).
    window:              context window W: at most W preceding images (None: all, 0: none).
    anchors:             always keep the first `anchors` images inside the window.
    seed:                one seed, or one per set; image k of set b depends on (seed_b, k) only.
    use_cache:           compute each context image's keys/values once (KV cache) instead of every step.
    eta:                 DDIM eta (0: deterministic).
    sampler:             "ddim" (the paper's), "dpm++" (DPM-Solver++), or a factory (config, steps) -> scheduler.
    callback:            called after every denoising step with (image k, step i, timestep t, z_t).
    context_noise:       M2M-Self trained with context noise: every context image (given or generated) is noised
                         to this fixed timestep t_c before the network reads it (seeded per image); 0: clean.
    precision:           autocast dtype of the network calls (m2m_pipeline/precision.py; float32: none); the
                         latents and the scheduler stay in the network's dtype (fp32 for a fp32 network).
    Returns (B, num_images, C, H, W) latents.
    """
    cfg = net.config
    seeds = _check_inputs(cfg, context, num_images, context_encoder, task_cond, task_guidance_scale, seed)
    b, n_c, c, h, w = context.shape
    device, dtype = net.device, net.dtype
    amp = lambda: autocast_context(device, precision)  # around the network calls only
    encode = context_encoder or (lambda z: z)
    br = Branches.build(b, cfg.task != "none", guidance_scale, task_guidance_scale, device)
    reps: list[torch.Tensor] = []   # per image: what the network attends to, (B, 1, ...)
    cache: list[ContextKV] = []     # per image: keys/values of every layer (use_cache)

    context_t = None
    if context_noise:
        if cfg.variant != "self":
            raise ValueError("context_noise is defined for M2M-Self only")
        noiser = make_ddim(cfg, steps)  # add_noise only: the training schedule's alphas
        context_t = torch.full((b,), int(context_noise), device=device, dtype=torch.long)

    def image_kv(j: int) -> ContextKV:
        # Per image, in both modes: an image's keys/values depend on it alone, and identical shapes make
        # the cached and recomputed paths agree bit for bit.
        cond = None if task_cond is None else task_cond[:, j : j + 1].to(device)
        extra = {} if context_t is None else {"context_t": br.kv_tile(context_t)}
        with amp():
            return net.encode_context(br.kv_tile(reps[j]), br.kv_tile(cond), br.kv_drop_task, **extra)

    def add_image(z_0: torch.Tensor) -> None:
        if context_t is not None:  # seeded per (set, image), apart from the images' own initial noise
            eps = image_noise(tuple(z_0.shape[1:]), seeds, 50_000 + len(reps), dtype, device)
            z_0 = noiser.add_noise(z_0.to(device=device, dtype=dtype), eps, context_t)
        with amp():
            reps.append(encode(z_0.to(device=device, dtype=dtype))[:, None])  # (B, 1, ...)
        if use_cache:
            cache.append(image_kv(len(reps) - 1))

    for j in range(n_c):
        add_image(context[:, j])

    outputs = []
    bar = tqdm(total=num_images * steps, desc="sampling", disable=not progress, leave=False)
    for k in range(num_images):
        position = n_c + k
        idx = window_indices(position, window, anchors)
        kv = ContextKV.cat_images([cache[j] for j in idx]) if idx and use_cache else None
        q_cond = None if task_cond is None else br.q_tile(task_cond[:, position : position + 1].to(device))
        scheduler = make_scheduler(cfg, steps, sampler)  # fresh per image: multistep solvers keep state
        step = scheduler_step(scheduler, eta)
        z = image_noise((c, h, w), seeds, position, dtype, device) * scheduler.init_noise_sigma  # (B, C, H, W)
        for i, t in enumerate(scheduler.timesteps):
            if idx and not use_cache:  # recompute every context image's keys/values at every step
                kv = ContextKV.cat_images([image_kv(j) for j in idx])
            z_in = torch.cat([z] * br.count)[:, None]  # (count*B, 1, C, H, W)
            t_in = torch.full((z_in.shape[0],), int(t), device=device, dtype=torch.long)
            with amp():
                eps = net.denoise(z_in, t_in, kv, ctx_index=br.q_index if kv is not None else None, task_cond=q_cond,
                                  drop_task=br.q_drop_task, first_position=len(idx))[:, 0]
            eps = eps.to(z.dtype)  # the guidance combination and the scheduler step in the latents' dtype
            noise = image_noise((c, h, w), seeds, 10_000 * (position + 1) + i, dtype, device) if eta > 0 else None
            z = step(br.combine(eps), t, z, noise)
            if callback is not None:
                callback(k, i, int(t), z)
            bar.update(1)
        outputs.append(z)
        add_image(z)
    bar.close()
    if not outputs:
        return context.new_zeros(b, 0, c, h, w)
    return torch.stack(outputs, dim=1)  # (B, K, C, H, W)


@torch.no_grad()
def generate_images(net, images: torch.Tensor, num_images: int, autoencoder, dino=None, **kwargs) -> torch.Tensor:
    """Pixels in, pixels out: images (B, n, 3, H, W) in [-1, 1] -> (B, num_images, 3, H, W) in [-1, 1]."""
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be (B, n, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    b, n = images.shape[:2]
    latents = autoencoder.encode(images.flatten(0, 1).to(net.device)).unflatten(0, (b, n))
    encoder = None
    if net.config.variant == "dino":
        if dino is None:
            raise ValueError("M2M-DINO needs a DinoEncoder to encode context images")
        encoder = lambda z: dino.encode(autoencoder.decode(z))  # noqa: E731
    z = generate(net, latents, num_images, context_encoder=encoder, **kwargs)
    k = z.shape[1]
    if k == 0:
        return images.new_zeros(b, 0, *images.shape[2:])
    return autoencoder.decode(z.flatten(0, 1)).unflatten(0, (b, k))
