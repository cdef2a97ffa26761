"""The CPU presets' text-to-image model: a small latent diffusion U-Net trained on captioned shapes-world images,
in the role Stable Diffusion 2.1-base plays at paper scale (Sec. 6.1: M2M starts from SD's weights).

The paper does not train M2M from scratch: it initialises every U-Net weight except the text cross-attention
from SD-2.1-base, so M2M's training on MIS only has to learn to read the preceding images, not to draw. The
CPU demo reproduces that recipe at its own size: this module trains the M2M preset's own U-Net architecture
(a diffusers `UNet2DConditionModel`, text cross-attention on a small random CLIP text encoder) on freshly
rendered (image, caption) pairs encoded by the demo autoencoder, and saves a Stable Diffusion pipeline folder
(`unet/` with its EMA weights, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). M2M then starts from it
through exactly the paper path, `M2MUNet.from_stable_diffusion`. docs/model.md ("The base model") has the
measured effect.

The training images are rendered, not MIS shards, as SD was trained before MIS existed: the base model is
independent of the MIS assets (both run at once) and never sees a test set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from m2m_pipeline.io import atomic_directory

REPORT_NAME = "base_model.json"    # training config, steps, seconds, the oracle's reading of its samples
GRID_NAME = "samples.png"          # samples of the first 64 held-out captions, 8 per row
MetricsFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class BaseModelConfig:
    net_preset: str = "demo"          # the M2MConfig preset whose U-Net (and noise schedule) this model is
    schedule: str = ""                # a NOISE_SCHEDULES name instead of the preset's ("": the preset's); M2M
                                      # models started from it must use the same one
    text_layers: int = 2              # the random CLIP text encoder; its width is the preset's cross_attention_dim
    text_heads: int = 4
    steps: int = 20_000               # a ceiling; max_seconds stops the demo first
    max_seconds: float = 0.0          # wall-clock budget (0: none)
    batch_size: int = 64              # images per step
    lr: float = 1e-3                  # AdamW, constant after warm-up (the M2M demo preset's rate)
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    caption_drop: float = 0.1         # share of empty captions: the unconditional branch for guidance (SD: 0.1)
    ema_decay: float = 0.999          # unet/ holds the EMA weights, as the released SD 2.1-base does
    train_images: int = 20_000        # rendered once, encoded once
    sample_captions: int = 256        # held-out captions the report samples and the oracle reads
    guidance_scale: float = 3.0       # for the report's samples
    sample_steps: int = 25            # DDIM steps of the report's samples
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "train_images", "sample_captions", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"BaseModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        from m2m_pipeline.network.config import NOISE_SCHEDULES

        if self.schedule and self.schedule not in NOISE_SCHEDULES:
            raise ValueError(f"BaseModelConfig.schedule {self.schedule!r}: choose one of {sorted(NOISE_SCHEDULES)} or ''")
        if self.lr <= 0 or self.max_seconds < 0 or not 0 <= self.caption_drop < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("BaseModelConfig: lr must be > 0, max_seconds >= 0, caption_drop and ema_decay in [0, 1)")

    @property
    def net_config(self):
        from m2m_pipeline.network import M2MConfig
        from m2m_pipeline.network.config import NOISE_SCHEDULES

        return M2MConfig.preset(self.net_preset, **NOISE_SCHEDULES.get(self.schedule, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BaseModelConfig:
        if name not in BASE_MODEL_PRESETS:
            raise ValueError(f"unknown base-model preset {name!r}; choose one of {sorted(BASE_MODEL_PRESETS)}")
        return dataclasses.replace(BASE_MODEL_PRESETS[name], **overrides)


BASE_MODEL_PRESETS: dict[str, BaseModelConfig] = {
    # Tests and the smoke chain: seconds; nothing is expected of its samples.
    "tiny": BaseModelConfig(net_preset="tiny-latent", steps=20, batch_size=8, train_images=64, sample_captions=8,
                            sample_steps=4, log_every=5, warmup_steps=2),
    # CPU demo: the latent demo U-Net, a fixed step count (it plays SD's role, so its time is apart from M2M's
    # 15 minutes; ~12-20 minutes here), the count of the 20-minute one-core run docs/model.md reports.
    "demo": BaseModelConfig(steps=4650),
}


# ---------------------------------------------------------------------------------------------- components
def build_components(config: BaseModelConfig, scratch: Path) -> dict[str, Any]:
    """A fresh U-Net of the preset's architecture, a random frozen CLIP text encoder, SD's tokenizer, DDIM."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from m2m_pipeline.data.tiny_sd import clip_tokenizer, random_clip_text_encoder

    net = config.net_config
    torch.manual_seed(config.seed)
    text_encoder = random_clip_text_encoder(net.cross_attention_dim, config.text_layers, config.text_heads)
    return {"unet": UNet2DConditionModel(**net.unet_kwargs()), "text_encoder": text_encoder.eval().requires_grad_(False),
            "tokenizer": clip_tokenizer(scratch),
            "scheduler": DDIMScheduler(**net.scheduler_kwargs(), steps_offset=1)}  # SD 2.1-base's offset


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """(B, 77, D) last hidden states of the text encoder, as SD conditions its U-Net."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def rendered_training_set(config: BaseModelConfig, autoencoder, progress: bool) -> tuple[torch.Tensor, list[str]]:
    """(num, C, h, w) scaled latents of freshly rendered images and one caption of each (a random template)."""
    from m2m_pipeline.data.shapes import TEMPLATES, VOCABULARIES, caption_of, render_dataset

    images, labels = render_dataset(config.train_images, config.net_config.image_size, seed=30_000 + 2 * config.seed,
                                    progress=progress)
    latents = torch.cat([autoencoder.encode(images[i : i + 500]) for i in range(0, len(images), 500)])
    rng = random.Random(config.seed)
    captions = [caption_of(dict(zip(VOCABULARIES, map(int, row))), rng.randrange(len(TEMPLATES))) for row in labels]
    return latents, captions


# ---------------------------------------------------------------------------------------------- training
def _v_loss(unet, scheduler, z_0: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Eq. 1 of LDM with the preset's prediction target (v for the CPU presets), uniform timesteps."""
    b = z_0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(z_0.shape, generator=generator)
    z_t = scheduler.add_noise(z_0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z_0, noise, t)
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=text).sample, target)


def train_base_model(config: BaseModelConfig, autoencoder_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     oracle=None, progress: bool = True, on_metrics: MetricsFn | None = None) -> dict[str, Any]:
    """Train the text-to-image U-Net and save the SD-style folder to `out_dir` (atomically).

    autoencoder_dir: a folder with `vae/` (the demo autoencoder), loaded by the paper path's loader; it is
    copied into the pipeline folder. oracle: when given, the report holds its accuracy on samples of held-out
    captions (does the model draw what the caption names?). Returns the report, also `out_dir/base_model.json`.
    """
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from m2m_pipeline.encoders import VaeAutoencoder

    start = time.perf_counter()
    autoencoder = VaeAutoencoder.from_pretrained(autoencoder_dir)
    out_dir = Path(out_dir)
    parts = build_components(config, out_dir.parent / f".{out_dir.name}.tokenizer")
    unet, tokenizer, text_encoder = parts["unet"].train(), parts["tokenizer"], parts["text_encoder"]
    latents, captions = rendered_training_set(config, autoencoder, progress)
    distinct = sorted(set(captions) | {""})  # "" is the dropped caption (guidance's unconditional branch)
    text_of = dict(zip(distinct, encode_captions(tokenizer, text_encoder, distinct)))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed + 1)
    history, window, step, data_seconds = [], [], 0, time.perf_counter() - start
    train_start = time.perf_counter()
    bar = tqdm(total=config.steps, desc="train base model", disable=not progress)
    while step < config.steps and not (config.max_seconds and time.perf_counter() - train_start > config.max_seconds):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        text = torch.stack([text_of["" if rng.random() < config.caption_drop else captions[i]] for i in index.tolist()])
        loss = _v_loss(unet, parts["scheduler"], latents[index], text, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        step += 1
        window.append(loss.item())
        bar.update(1)
        if step % config.log_every == 0:
            history.append({"step": step, "loss": sum(window) / len(window)})
            window.clear()
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if on_metrics is not None:
                on_metrics({"loss": history[-1]["loss"]}, step)
    bar.close()
    if step == 0:
        raise RuntimeError(f"base-model training made no step within max_seconds={config.max_seconds}")
    ema.copy_to(unet.parameters())  # unet/ holds the EMA weights (what M2M starts from, Sec. 6.1)
    report = {"config": config.to_dict(), "steps": step, "train_seconds": round(time.perf_counter() - train_start, 1),
              "data_seconds": round(data_seconds, 1), "parameters": sum(p.numel() for p in unet.parameters()),
              "history": history}
    pipeline = _pipeline(unet.eval(), autoencoder.vae, text_encoder, tokenizer, parts["scheduler"])
    samples, sample_captions = sample_heldout(pipeline, config)
    if oracle is not None:
        report["oracle_accuracy"] = caption_accuracy(oracle, samples, sample_captions)
    save_base_model(pipeline, out_dir, report, samples, sample_captions)
    return report


def _pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------- the report
def heldout_captions(config: BaseModelConfig) -> list[str]:
    """Captions of fresh attribute draws (template 0), disjoint seeds from training."""
    from m2m_pipeline.data.shapes import random_captions

    return [caption for _, caption in random_captions(config.sample_captions, seed=40_000 + config.seed)]


@torch.no_grad()
def sample_heldout(pipeline, config: BaseModelConfig, batch_size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """(num, 3, H, W) samples in [-1, 1] of the held-out captions by SD's own pipeline (DDIM, text guidance)."""
    captions = heldout_captions(config)
    generator = torch.Generator().manual_seed(config.seed)
    images = []
    for i in range(0, len(captions), batch_size):
        out = pipeline(captions[i : i + batch_size], num_inference_steps=config.sample_steps,
                       guidance_scale=config.guidance_scale, generator=generator, output_type="pt")
        images.append(out.images * 2 - 1)  # the pipeline returns [0, 1]
    return torch.cat(images).clamp(-1, 1), captions


def caption_accuracy(oracle, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Share of samples whose attribute the oracle reads as the caption names it, per attribute."""
    from m2m_pipeline.data.shapes import VOCABULARIES, attributes_of
    from m2m_pipeline.evaluation.oracle import evaluate_accuracy

    labels = torch.tensor([[attributes_of(c)[name] for name in VOCABULARIES] for c in captions])
    return evaluate_accuracy(oracle, images, labels)


def save_base_model(pipeline, out_dir: Path, report: dict[str, Any], samples: torch.Tensor, captions: list[str]) -> Path:
    """The SD pipeline folder (safetensors only), the report and a sample grid, atomically."""
    from m2m_pipeline.visualize import save_set_grid

    with atomic_directory(out_dir) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        report = {**report, "sample_captions": captions[:8]}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        rows = max(1, min(8, len(samples) // 8))
        grid = samples[: rows * 8].unflatten(0, (rows, -1))  # (rows, 8, 3, H, W)
        save_set_grid(grid[:, :4], grid[:, 4:], tmp / GRID_NAME, scale=max(1, 64 // samples.shape[-1]))
    return out_dir


def read_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no trained base model ({REPORT_NAME} missing); run `m2m train-base-model`")
    return json.loads(path.read_text())
