"""The CPU presets' autoencoder E / D (Sec. 3): a small diffusers `AutoencoderKL` trained on the procedural
shapes world, in the role Stable Diffusion 2.1's VAE plays at paper scale.

It is saved as a Stable-Diffusion-style folder (`<out>/vae/` written by `save_pretrained`) and loaded by the
very code the paper profile uses for SD's VAE (`encoders.VaeAutoencoder.from_pretrained`), so the demo, the
smoke run and CI exercise the latent path end to end: latents in the feature cache, sampling in latent space,
decoding for the grids and the oracle. docs/model.md ("Autoencoder") gives the measured choice of image size
and compression.

Training data are freshly rendered images of the shapes world (random attributes per image), not MIS
shards: SD's VAE was trained on other images than the ones MIS is rendered from, and this keeps the
autoencoder independent of the MIS asset (both can run at once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from m2m_pipeline.io import atomic_directory

VAE_SUBFOLDER = "vae"                 # as in a Stable Diffusion pipeline folder
REPORT_NAME = "autoencoder.json"      # training config, steps, seconds, held-out reconstruction metrics
GRID_NAME = "reconstructions.png"     # held-out images (top) over their reconstructions (bottom)
MetricsFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class AutoencoderConfig:
    # --- architecture (diffusers AutoencoderKL keys) ---
    image_size: int = 32                               # pixels per side (the MIS preset's resolution)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per level: downsampling f = 2^(levels - 1)
    latent_channels: int = 4                           # C of the latents (SD: 4)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    mid_block_attention: bool = True                   # self-attention in the mid block (SD's VAE has one)
    # --- training ---
    steps: int = 3000                                  # optimizer steps
    # The convolutions are translation-equivariant: all but the last `full_image_steps` steps train on random
    # `crop_size` crops, 4x cheaper per image at 16 of 32 px; the last steps on whole images fit the mid-block
    # attention and the normalisation statistics to what encoding sees (docs/model.md: measured gain).
    crop_size: int = 16                                # 0: whole images throughout
    full_image_steps: int = 600
    max_seconds: float = 0.0                           # wall-clock cap (0: none); reported if it cut the run
    batch_size: int = 32
    lr: float = 2e-3                                   # AdamW peak learning rate
    warmup_fraction: float = 0.05                      # of the run's compute (see _progress), then cosine
    kl_weight: float = 1e-6                            # weight of the KL term (SD's VAE: 1e-6)
    # Initial log-variance of the posterior (encoder output bias): nearly deterministic from the start. With
    # SD's KL weight the variance shrinks that far anyway; starting at std 1 spends the first steps on noise.
    initial_logvar: float = -6.0
    train_images: int = 20_000                         # rendered once; batches are drawn from them
    heldout_images: int = 1000                         # disjoint seeds: the reported metrics
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if self.image_size % self.downsample:
            raise ValueError(f"AutoencoderConfig.image_size={self.image_size} is not a multiple of the "
                             f"downsampling factor {self.downsample}")
        for name in ("steps", "batch_size", "train_images", "heldout_images", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_seconds < 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("AutoencoderConfig: lr must be > 0, max_seconds >= 0, warmup_fraction in [0, 1)")
        if self.crop_size and (self.crop_size % self.downsample or not 0 < self.crop_size <= self.image_size):
            raise ValueError(f"AutoencoderConfig.crop_size={self.crop_size} must be 0 or a multiple of the "
                             f"downsampling factor {self.downsample} within image_size={self.image_size}")
        if self.full_image_steps < 0:
            raise ValueError(f"AutoencoderConfig.full_image_steps must be >= 0, got {self.full_image_steps}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.latent_channels, side, side)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "block_out_channels": list(self.block_out_channels)}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AutoencoderConfig:
        if name not in AUTOENCODER_PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(AUTOENCODER_PRESETS)}")
        return dataclasses.replace(AUTOENCODER_PRESETS[name], **overrides)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # Tests and the smoke chain: 16 px -> 4x4x4 in seconds; nothing is expected of its reconstructions.
    "tiny": AutoencoderConfig(image_size=16, block_out_channels=(8, 16, 16), norm_num_groups=4, steps=30,
                              crop_size=8, full_image_steps=10, batch_size=16, train_images=512, heldout_images=64,
                              mid_block_attention=False),
    # CPU demo: 32 px -> 8x8x8 (f = 4), ~1 M parameters, ~9 minutes on one core (docs/model.md: why this size
    # and compression, measured).
    "demo": AutoencoderConfig(latent_channels=8),
}


def build_autoencoder(config: AutoencoderConfig):
    """A fresh diffusers AutoencoderKL with the config's architecture (seeded by the caller)."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups, sample_size=config.image_size,
        mid_block_add_attention=config.mid_block_attention,
    )


def _lr_factor(progress: float, warmup_fraction: float, floor: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to `floor` x the peak, as functions of training progress in [0, 1]."""
    if progress < warmup_fraction:
        return (progress + 1e-3) / warmup_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (progress - warmup_fraction) / (1 - warmup_fraction)))


def _progress(config: AutoencoderConfig) -> list[float]:
    """Progress at the start of every step, counted in compute rather than steps: a crop step costs
    (crop / image size)^2 of a whole-image step. The schedule then decays over the time the run takes, and the
    whole-image steps at the end still learn (at ~10% of the peak rate, not at ~0)."""
    crop_cost = (config.crop_size / config.image_size) ** 2 if config.crop_size else 1.0
    costs = [crop_cost if step < config.steps - config.full_image_steps else 1.0 for step in range(config.steps)]
    total, done, out = sum(costs), 0.0, []
    for cost in costs:
        out.append(done / total)
        done += cost
    return out


def reconstruct(vae, images: torch.Tensor, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> (posterior-mean latents, reconstructions in [-1, 1]); unscaled latents."""
    latents, recs = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            mean = vae.encode(images[i : i + batch_size]).latent_dist.mean
            latents.append(mean)
            recs.append(vae.decode(mean).sample.clamp(-1, 1))
    return torch.cat(latents), torch.cat(recs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def train_autoencoder(config: AutoencoderConfig, out_dir: str | os.PathLike, *, progress: bool = True,
                      on_metrics: MetricsFn | None = None, log_every: int = 50) -> dict[str, Any]:
    """Train an AutoencoderKL on rendered shapes-world images and save it to `out_dir/vae/` (atomically).

    The loss is L1 + MSE on pixels plus `kl_weight` x KL (SD's VAE adds LPIPS and a GAN loss; at 32 px and
    ~1 M parameters a pixel loss alone keeps every attribute the oracle judges, docs/model.md). The latent
    scaling factor (SD: 0.18215) is measured as 1 / std of the held-out posterior means and stored in the
    folder's config, so `VaeAutoencoder` hands the U-Net unit-variance latents. Returns the report that is
    also written to `out_dir/autoencoder.json`.
    """
    from m2m_pipeline.data.shapes import render_dataset

    torch.manual_seed(config.seed)
    start = time.perf_counter()
    x_train, _ = render_dataset(config.train_images, config.image_size, seed=10_000 + 2 * config.seed)
    x_held, _ = render_dataset(config.heldout_images, config.image_size, seed=10_001 + 2 * config.seed)
    vae = build_autoencoder(config).train()
    with torch.no_grad():  # encoder output = [mean | log-variance] per latent channel
        vae.encoder.conv_out.bias[config.latent_channels:] = config.initial_logvar
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    progress_at = _progress(config)
    bar = tqdm(total=config.steps, desc="train autoencoder", disable=not progress)
    step, cut_short = 0, False
    while step < config.steps:
        if config.max_seconds and time.perf_counter() - start > config.max_seconds:
            cut_short = True
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(progress_at[step], config.warmup_fraction)
        x = x_train[torch.randint(0, len(x_train), (config.batch_size,), generator=generator)]
        if config.crop_size and step < config.steps - config.full_image_steps:
            top, left = torch.randint(0, config.image_size - config.crop_size + 1, (2,), generator=generator).tolist()
            x = x[..., top : top + config.crop_size, left : left + config.crop_size]  # (B, 3, crop, crop)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=generator)).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = posterior.kl().mean()
        loss = rec_loss + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == config.steps:
            metrics = {"loss": loss.item(), "reconstruction_loss": rec_loss.item(), "kl": kl.item()}
            history.append({"step": step, **metrics})
            bar.set_postfix(rec=f"{metrics['reconstruction_loss']:.4f}")
            if on_metrics is not None:
                on_metrics(metrics, step)
    bar.close()
    if step == 0:
        raise RuntimeError(f"autoencoder training made no step within max_seconds={config.max_seconds}")
    train_seconds = time.perf_counter() - start
    vae.eval()
    latents, recs = reconstruct(vae, x_held)
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    report = {
        "config": config.to_dict(), "steps": step, "cut_short_by_max_seconds": cut_short,
        "train_seconds": round(train_seconds, 1), "parameters": sum(p.numel() for p in vae.parameters()),
        "latent_shape": list(config.latent_shape), "downsample": config.downsample, "scaling_factor": scaling,
        "latent_mean": float(latents.mean() * scaling), "heldout_psnr_db": psnr(recs, x_held),
        "heldout_mse": F.mse_loss(recs, x_held).item(), "history": history,
    }
    save_autoencoder(vae, out_dir, report, x_held[:16], recs[:16])
    return report


def save_autoencoder(vae, out_dir: str | os.PathLike, report: dict[str, Any], images: torch.Tensor,
                     reconstructions: torch.Tensor) -> Path:
    """`out_dir/vae/` (diffusers config.json + safetensors), the report and a reconstruction grid, atomically."""
    from m2m_pipeline.visualize import save_set_grid

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        vae.save_pretrained(tmp / VAE_SUBFOLDER, safe_serialization=True)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        rows = max(1, len(images) // 8)  # rows of 8 images | their 8 reconstructions
        save_set_grid(images[: rows * 8].unflatten(0, (rows, -1)), reconstructions[: rows * 8].unflatten(0, (rows, -1)),
                      tmp / GRID_NAME, scale=max(1, 64 // images.shape[-1]))
    return out_dir


def read_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no trained autoencoder ({REPORT_NAME} missing); "
                                f"run `m2m train-autoencoder`")
    return json.loads(path.read_text())


def oracle_reconstruction_accuracy(autoencoder_dir: str | os.PathLike, oracle, num_images: int = 2000,
                                   seed: int = 20_001) -> dict[str, Any]:
    """The oracle's per-attribute accuracy on held-out images and on their reconstructions.

    The autoencoder is loaded by the paper path's loader (`VaeAutoencoder.from_pretrained`) and images go
    through its encode (posterior mean x scaling factor) and decode, exactly as feature caches and samplers
    use it. Fresh seeds, disjoint from the autoencoder's and the oracle's training and held-out images.
    """
    from m2m_pipeline.data.shapes import render_dataset
    from m2m_pipeline.encoders import VaeAutoencoder
    from m2m_pipeline.evaluation.oracle import evaluate_accuracy

    autoencoder = VaeAutoencoder.from_pretrained(autoencoder_dir)
    images, labels = render_dataset(num_images, int(autoencoder.vae.config.sample_size), seed=seed)
    recs = torch.cat([autoencoder.decode(autoencoder.encode(images[i : i + 200]))
                      for i in range(0, len(images), 200)])
    return {"images": num_images, "original": evaluate_accuracy(oracle, images, labels),
            "reconstruction": evaluate_accuracy(oracle, recs, labels), "psnr_db": psnr(recs, images)}
