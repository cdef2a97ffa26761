"""MIS image sets from Stable Diffusion 2.1-base (Sec. 4): Euler discrete scheduler, guidance 7.5.

Throughput comes from batching, not from a custom sampler: all images of several captions go through
diffusers' StableDiffusionPipeline in one denoising batch, with each caption's text embedding computed
once and every image's initial noise drawn from its own seeded generator (so any single image can be
regenerated alone and match the batched one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from m2m_pipeline.data.captions import Caption
from m2m_pipeline.data.config import MISConfig
from m2m_pipeline.data.generators import ImageSet, image_seed
from m2m_pipeline.precision import DTYPES, check_supported

SCHEDULER = "EulerDiscreteScheduler"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The SD pipeline's weight dtype. Inference only: the weights themselves are cast (half the memory, no
    autocast casts per op), unlike training's fp32 master weights under autocast (m2m_pipeline/precision.py)."""
    if dtype == "auto":
        # fp16 on CUDA as SD 2.1 is usually run; fp32 on CPU where half precision is slow and inexact.
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[check_supported(device, dtype, "MISConfig.dtype")]


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(K, C, h, w) unit Gaussian noise, image k from its own CPU generator: identical on every device."""
    noise = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(noise)


class StableDiffusionSetGenerator:
    """Sec. 4's MIS generator: one caption, 25 seeded latent noises, 25 images (and their final latents)."""

    def __init__(
        self,
        pipeline: Any,                       # a diffusers StableDiffusionPipeline (its scheduler is replaced)
        images_per_set: int = 25,            # Sec. 4
        guidance_scale: float = 7.5,         # Sec. 4
        num_inference_steps: int = 50,       # paper silent: diffusers' default
        resolution: int = 512,               # SD 2.1-base's native size, pixels per side
        keep_latents: bool = False,          # return the final (pre-VAE) latents as well
        base_seed: int = 0,                  # mixed into every (caption id, image index) seed
        model_name: str | None = None,       # recorded in the shard; defaults to the pipeline's name_or_path
        decode_batch_size: int = 8,          # images per VAE decode call (the VAE decoder is memory-hungry)
    ):
        from diffusers import EulerDiscreteScheduler

        pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        if getattr(pipeline, "safety_checker", None) is not None:
            # MIS keeps every image the model makes (the paper mentions no filter), and the checker
            # would blank images nondeterministically w.r.t. batching.
            pipeline.safety_checker = None
        self.pipeline = pipeline
        self.images_per_set = images_per_set
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.resolution = resolution
        self.keep_latents = keep_latents
        self.base_seed = base_seed
        self.model_name = model_name or str(pipeline.config.get("_name_or_path", "stable-diffusion"))
        self.decode_batch_size = decode_batch_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: MISConfig | None = None, device: str | None = None,
                        **overrides: Any) -> "StableDiffusionSetGenerator":
        """Load a local SD folder (diffusers layout); fp16 + SDPA on CUDA, fp32 on CPU."""
        from diffusers import StableDiffusionPipeline

        if not os.path.isdir(path):
            raise FileNotFoundError(f"Stable Diffusion folder {os.fspath(path)!r} does not exist (no hub access; "
                                    f"download it to models/ first)")
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(cfg.dtype if cfg else "auto", target)
        pipeline = StableDiffusionPipeline.from_pretrained(
            os.fspath(path), torch_dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, use_safetensors=True,  # never a pickled .bin
        ).to(target)
        # diffusers already uses torch's scaled_dot_product_attention (AttnProcessor2_0) by default on
        # torch >= 2, which is the memory-efficient/flash kernel on GPU; nothing to switch on here.
        kwargs: dict[str, Any] = {}
        if cfg is not None:
            kwargs = dict(images_per_set=cfg.images_per_set, guidance_scale=cfg.guidance_scale,
                          num_inference_steps=cfg.num_inference_steps, resolution=cfg.resolution,
                          keep_latents=cfg.keep_latents, base_seed=cfg.seed, model_name=cfg.model_name)
        kwargs.update(overrides)
        return cls(pipeline, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.pipeline.vae_scale_factor
        return (self.pipeline.unet.config.in_channels, size, size)

    def generation_params(self) -> dict[str, Any]:
        return {
            "generator": "stable-diffusion", "model": self.model_name, "scheduler": SCHEDULER,
            "guidance_scale": self.guidance_scale, "num_inference_steps": self.num_inference_steps,
            "height": self.resolution, "width": self.resolution, "base_seed": self.base_seed,
            "dtype": str(self.pipeline.unet.dtype).removeprefix("torch."), "noise": "cpu-randn-per-image",
        }

    @torch.no_grad()
    def generate(self, captions: Sequence[Caption], indices: Sequence[int] | None = None) -> list[ImageSet]:
        indices = list(range(self.images_per_set)) if indices is None else list(indices)
        pipe, device = self.pipeline, self.pipeline._execution_device
        k = len(indices)
        # Text embeddings once per caption (and once for the empty negative prompt), then repeated per image.
        cond, uncond = pipe.encode_prompt([c.text for c in captions], device, 1, self.guidance_scale > 1.0)
        seeds = [[image_seed(c.id, i, self.base_seed) for i in indices] for c in captions]
        noise = initial_noise([s for per_caption in seeds for s in per_caption], self.latent_shape)  # (B*K, C, h, w)
        output = pipe(
            prompt_embeds=cond.repeat_interleave(k, dim=0),
            negative_prompt_embeds=None if uncond is None else uncond.repeat_interleave(k, dim=0),
            latents=noise.to(device=device, dtype=cond.dtype),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            output_type="latent",
        )
        latents = output.images  # (B*K, C, h, w) final z_0 in the UNet's (scaled) latent space
        images = torch.cat([self.decode(chunk) for chunk in latents.split(self.decode_batch_size)])
        params = self.generation_params()
        sets = []
        for b, caption in enumerate(captions):
            rows = slice(b * k, (b + 1) * k)
            sets.append(ImageSet(
                key=caption.id, caption=caption.text, images=images[rows], indices=indices, seeds=seeds[b],
                latents=latents[rows].float().cpu() if self.keep_latents else None, params=params,
            ))
        return sets

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return images.float().clamp(-1.0, 1.0).cpu()  # (K, 3, H, W) in [-1, 1]
