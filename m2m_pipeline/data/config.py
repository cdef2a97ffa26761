"""MIS configuration (Sec. 4): one frozen dataclass and the named presets that define every default.

`MIS_PRESETS` is the single place a preset's numbers live; the CLI, the Dagster assets and the tests
all take a preset by name and override fields with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MISConfig:
    name: str                                       # preset name, recorded in manifests
    # --- captions (Sec. 4: CC12M alt-texts filtered to CLIP's context) ---
    max_tokens: int = 77                            # CLIP BPE tokens, start and end tokens included
    dedup: bool = False                             # drop repeated captions (the paper is silent; off = faithful)
    test_fraction: float = 0.01                     # share of captions hashed into the test split
    validation_fraction: float = 0.0                # next share: the validation split (guidance, steps chosen there)
    # --- caption source for the procedural world ---
    num_captions: int = 0                           # captions the shapes caption source writes (0: external TSV)
    # --- generation ---
    generator: Literal["shapes", "stable-diffusion"] = "shapes"
    model_path: str | None = None                   # local Stable Diffusion folder (generator == "stable-diffusion")
    model_name: str = "procedural-shapes-v1"        # recorded in every sample's generation parameters
    resolution: int = 32                            # pixels per side of each generated image
    images_per_set: int = 25                        # Sec. 4: 25 images per caption
    guidance_scale: float = 7.5                     # Sec. 4: SD's default classifier-free guidance
    num_inference_steps: int = 50                   # paper silent; diffusers' default (docs/data.md "Choices")
    scheduler: str = "EulerDiscreteScheduler"       # Sec. 4
    captions_per_batch: int = 4                     # captions denoised together (x images_per_set x 2 for CFG)
    keep_latents: bool = False                      # store SD's final latents next to the images (docs/data.md "Choices")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    seed: int = 0                                   # base seed mixed into every (caption id, image index) seed
    # --- shards ---
    sets_per_shard: int = 512                       # image sets (webdataset samples) per tar shard
    image_format: Literal["png", "jpeg"] = "png"    # png is lossless; jpeg for paper-scale storage
    jpeg_quality: int = 95
    # --- feature caches (Sec. 5) ---
    autoencoder: Literal["pixel", "vae"] = "pixel"  # pixel: images themselves; vae: an AutoencoderKL's latents
    # Folder holding the AutoencoderKL as `vae/` (a Stable Diffusion folder, or the demo's trained autoencoder,
    # m2m_pipeline/autoencoder.py); None: model_path, the SD folder that also generates MIS.
    autoencoder_path: str | None = None
    dino_path: str | None = None                    # local DINOv2 folder; None: a seeded random DinoEncoder
    dino_hidden_size: int = 96                      # random DinoEncoder width (CPU presets only)
    dino_layers: int = 2                            # random DinoEncoder depth (CPU presets only)
    dino_patch_size: int = 8                        # random DinoEncoder patch size in pixels
    feature_batch_size: int = 64                    # images per encoder forward pass
    reuse_generation_latents: bool = False          # take VAE latents from the MIS shard when it stored them
    # How DINO tokens reach M2M-DINO's training (docs/data.md "The DINO feature store"): "cache" stores them in
    # the feature shard (fp16, 25 x S x D per set); "online" stores the set's encoded images instead and the
    # training step encodes the N - 1 context images it draws (the paper profile: its cache would be ~241 TB).
    dino_features: Literal["cache", "online"] = "cache"
    # --- training examples (Sec. 7.1.1; N itself is TrainConfig.n_images, checked against images_per_set by the
    # loader) ---
    shuffle_buffer: int = 1000                      # samples held by the in-memory shuffle buffer

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"MISConfig.max_tokens must count start and end tokens (>= 2), got {self.max_tokens}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"MISConfig.test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.validation_fraction < 0.0 or self.test_fraction + self.validation_fraction >= 1.0:
            raise ValueError(f"MISConfig.validation_fraction must be >= 0 with test_fraction + validation_fraction "
                             f"< 1, got {self.validation_fraction} (test_fraction {self.test_fraction})")
        if self.generator == "stable-diffusion" and self.resolution % 8:
            raise ValueError(f"MISConfig.resolution must be a multiple of 8 for Stable Diffusion, got {self.resolution}")
        if self.dino_features not in ("cache", "online"):
            raise ValueError(f"MISConfig.dino_features must be 'cache' or 'online', got {self.dino_features!r}")
        if self.sets_per_shard < 1 or self.captions_per_batch < 1 or self.images_per_set < 1:
            raise ValueError("MISConfig.sets_per_shard, captions_per_batch and images_per_set must be >= 1")

    def replace(self, **changes: object) -> "MISConfig":
        return dataclasses.replace(self, **changes)

    @property
    def vae_path(self) -> str | None:
        """Where the AutoencoderKL of a latent preset lives (a folder with `vae/`); None for pixel presets."""
        if self.autoencoder != "vae":
            return None
        return self.autoencoder_path or self.model_path


MIS_PRESETS: dict[str, MISConfig] = {
    # Unit tests: a handful of 16 px sets, whole pipeline in seconds.
    "tiny": MISConfig(
        name="tiny", num_captions=16, resolution=16, sets_per_shard=4, test_fraction=0.25, validation_fraction=0.2,
        dino_hidden_size=32, dino_layers=1, dino_patch_size=8, feature_batch_size=50, shuffle_buffer=16,
    ),
    # CPU demo: the procedural world at 32 px, enough sets for a small model to learn colour/shape/background.
    "demo": MISConfig(
        name="demo", num_captions=4096, resolution=32, sets_per_shard=512, test_fraction=0.05,
        validation_fraction=0.05,
        dino_hidden_size=96, dino_layers=2, dino_patch_size=8, feature_batch_size=200,
    ),
    # Sec. 4 as published: SD 2.1-base, 512 px, 25 images, Euler, guidance 7.5, 50 steps.
    "paper": MISConfig(
        name="paper", generator="stable-diffusion", model_path="models/stable-diffusion-2-1-base",
        model_name="stabilityai/stable-diffusion-2-1-base", resolution=512, captions_per_batch=2,
        keep_latents=True, sets_per_shard=100, image_format="jpeg", test_fraction=0.001, validation_fraction=0.001,
        autoencoder="vae", dino_path="models/dinov2-giant", feature_batch_size=64, reuse_generation_latents=True,
        dino_features="online", shuffle_buffer=2000,
    ),
}


def get_preset(name: str) -> MISConfig:
    try:
        return MIS_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown MIS preset {name!r}; choose one of {sorted(MIS_PRESETS)}") from None
