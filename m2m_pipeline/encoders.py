"""Frozen image encoders: the autoencoder E/D of Sec. 3 (SD VAE or identity for pixel-space presets)
and the DINOv2 encoder E_v of Sec. 5.2.

Convention for the whole library: images are float tensors in [-1, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from m2m_pipeline.weights import resolve_local_path


class Autoencoder(Protocol):
    latent_channels: int
    downsample: int  # image pixels per latent pixel along one side

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, who: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{who}: expected float images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)} {images.dtype}"
        )


class PixelAutoencoder(nn.Module):
    """Identity autoencoder: pixel-space presets (tiny, demo) diffuse the images themselves."""

    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "PixelAutoencoder.encode")
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1.0, 1.0)


class VaeAutoencoder(nn.Module):
    """Stable Diffusion's AutoencoderKL; latents are scaled by the scaling factor in its config."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "vae") -> "VaeAutoencoder":
        from diffusers import AutoencoderKL

        local = resolve_local_path(path, subfolder=subfolder, what="Stable Diffusion VAE")
        return cls(AutoencoderKL.from_pretrained(local, subfolder=subfolder, use_safetensors=True))  # no pickle

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "VaeAutoencoder.encode")
        # Posterior mean rather than a sample: feature caches must be deterministic and re-computable.
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return images.float().clamp(-1.0, 1.0)


def load_autoencoder(kind: str, path: str | Path | None = None) -> Autoencoder:
    if kind == "pixel":
        return PixelAutoencoder()
    if kind == "vae":
        if path is None:
            raise ValueError("autoencoder kind 'vae' needs a path to a Stable Diffusion folder (with vae/)")
        return VaeAutoencoder.from_pretrained(path)
    raise ValueError(f"unknown autoencoder kind {kind!r}; expected 'pixel' or 'vae'")


class DinoEncoder(nn.Module):
    """DINOv2 last-hidden-state tokens (CLS + patches) of the context images (design-notes 4).

    Preprocessing is the image processor's (resize shortest edge, center crop, ImageNet normalisation),
    done in torch on batches so it runs on the accelerator and on [-1, 1] tensors.
    """

    def __init__(self, model: nn.Module, image_size: int, resize_size: int | None = None,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size  # crop size fed to the ViT
        self.resize_size = resize_size or image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        patch = model.config.patch_size
        self.num_tokens = 1 + (image_size // patch) ** 2
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DinoEncoder":
        from transformers import AutoImageProcessor, Dinov2Model

        local = resolve_local_path(path, subfolder=None, what="DINOv2 model")
        model = Dinov2Model.from_pretrained(local, use_safetensors=True)  # never a pickled .bin
        try:
            proc = AutoImageProcessor.from_pretrained(local)
            crop = proc.crop_size["height"]
            resize = proc.size.get("shortest_edge", crop)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):  # a folder without preprocessor_config.json: DINOv2's published defaults
            crop, resize = model.config.image_size, round(model.config.image_size * 256 / 224)
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return cls(model, image_size=crop, resize_size=resize, mean=mean, std=std)

    @classmethod
    def random(cls, image_size: int = 32, patch_size: int = 8, hidden_size: int = 96, num_layers: int = 2,
               num_heads: int = 4, seed: int = 0) -> "DinoEncoder":
        """A small, frozen, randomly initialised DINOv2 for CPU presets where no real weights exist.

        Seeded, so every process that builds it gets the same features.
        """
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           intermediate_size=hidden_size * 4)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Dinov2Model(cfg)
        return cls(model, image_size=image_size, resize_size=image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "DinoEncoder")
        x = (images.float() + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        h, w = x.shape[-2:]
        if min(h, w) != self.resize_size:
            scale = self.resize_size / min(h, w)
            size = (max(self.resize_size, round(h * scale)), max(self.resize_size, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        h, w = x.shape[-2:]
        top, left = (h - self.image_size) // 2, (w - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = self.preprocess(images).to(self.model.dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state.float()  # (B, S, D)
