"""Frozen image encoders: the autoencoder E/D of Sec. 3 (SD VAE or identity for pixel-space presets)
and the DINOv2 encoder E_v of Sec. 5.2.

Convention for the whole library: images are float tensors in [-1, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from m2m_pipeline.io import sha256_file
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
    """DINOv2 last-hidden-state tokens (CLS + patches) of the context images (docs/model.md "Network").

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


# ----------------------------------------------------------------------------------------------- specification

@dataclass(frozen=True)
class EncoderSpec:
    """Which frozen encoders produced a feature cache, so a checkpoint trained on it can rebuild exactly them.

    Written into every feature shard's manifest and, through training, into every checkpoint's config.json
    (M2MUNet.encoder_spec); `m2m_pipeline.bundle.load_bundle` rebuilds the encoders from it. The DINO encoder is
    a local folder (`dino_path`) or, on CPU presets, the seeded random stand-in (`dino_random`: its
    DinoEncoder.random arguments); the autoencoder is the identity ("pixel") or an AutoencoderKL folder,
    named by the sha256 of its weights (content, not path: a moved checkout keeps its caches).
    """

    autoencoder: str                               # "pixel" or "vae"
    autoencoder_path: str | None = None            # folder holding vae/ when the cache was built
    autoencoder_sha256: str | None = None          # vae_weights_digest of that folder
    dino_path: str | None = None                   # local DINOv2 folder
    dino_random: dict[str, int] | None = None      # image_size, patch_size, hidden_size, num_layers, seed

    def __post_init__(self) -> None:
        if self.autoencoder not in ("pixel", "vae"):
            raise ValueError(f"EncoderSpec.autoencoder must be 'pixel' or 'vae', got {self.autoencoder!r}")
        if (self.dino_path is None) == (self.dino_random is None):
            raise ValueError("EncoderSpec: give exactly one of dino_path and dino_random")
        if self.dino_random is not None and set(self.dino_random) != set(RANDOM_DINO_FIELDS):
            raise ValueError(f"EncoderSpec.dino_random must have the fields {list(RANDOM_DINO_FIELDS)}, "
                             f"got {sorted(self.dino_random)}")

    # ------------------------------------------------------------------ identity
    def tag(self) -> str:
        """One string naming the encoders; a cache built with another tag is stale."""
        if self.dino_random is not None:
            r = self.dino_random
            dino = f"random-dino-{r['hidden_size']}x{r['num_layers']}-p{r['patch_size']}-s{r['seed']}"
        else:
            dino = str(self.dino_path)
        auto = self.autoencoder if self.autoencoder == "pixel" else f"vae@{self.autoencoder_sha256}"
        return f"{auto}|{dino}"

    def describe(self) -> str:
        dino = f"DINOv2 {self.dino_path}" if self.dino_path else f"random DINOv2 stand-in {self.dino_random}"
        auto = "pixels" if self.autoencoder == "pixel" else f"autoencoder {self.autoencoder_path} " \
                                                            f"(weights {self.autoencoder_sha256})"
        return f"{auto}; {dino}"

    def mismatch(self, other: "EncoderSpec", variant: str) -> str | None:
        """What differs between two specs in what a `variant` network uses (M2M-Self ignores DINO); None if
        nothing does."""
        problems = []
        if (self.autoencoder, self.autoencoder_sha256) != (other.autoencoder, other.autoencoder_sha256):
            problems.append(f"autoencoder {self.autoencoder}@{self.autoencoder_sha256} vs "
                            f"{other.autoencoder}@{other.autoencoder_sha256}")
        if variant == "dino" and (self.dino_path, self.dino_random) != (other.dino_path, other.dino_random):
            problems.append(f"DINO {self.dino_path or self.dino_random} vs {other.dino_path or other.dino_random}")
        return "; ".join(problems) or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "encoder spec") -> "EncoderSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not set(d) <= names or "autoencoder" not in d:
            raise ValueError(f"{where}: expected an object with fields {sorted(names)}, got {d!r:.200}")
        return cls(**d)

    # ------------------------------------------------------------------ building
    def build_autoencoder(self, path: str | os.PathLike | None = None) -> Autoencoder:
        """The autoencoder; `path` overrides where the weights are (e.g. on another machine), but its weights
        must be the recorded ones."""
        if self.autoencoder == "pixel":
            return PixelAutoencoder()
        where = path if path is not None else self.autoencoder_path
        if where is None:
            raise ValueError("the checkpoint's features were built with an autoencoder; pass its folder (--vae)")
        digest = vae_weights_digest(where)
        if digest != self.autoencoder_sha256:
            raise ValueError(f"autoencoder {where}: weights sha256 {digest} differ from the {self.autoencoder_sha256} "
                             f"the checkpoint's features were built with; pass the autoencoder it was trained on (--vae)")
        return VaeAutoencoder.from_pretrained(where)

    def build_dino(self, path: str | os.PathLike | None = None) -> DinoEncoder:
        """The DINO encoder; `path` overrides a recorded DINOv2 folder (a random stand-in has no path)."""
        if self.dino_random is not None:
            if path is not None:
                raise ValueError(f"the checkpoint's DINO features came from the random stand-in {self.dino_random}, "
                                 f"not a DINOv2 folder; do not pass --dino {path}")
            return DinoEncoder.random(**self.dino_random)
        return DinoEncoder.from_pretrained(path if path is not None else str(self.dino_path))


RANDOM_DINO_FIELDS = ("image_size", "patch_size", "hidden_size", "num_layers", "seed")


def vae_weights_digest(path: str | os.PathLike | None) -> str:
    """sha256 (first 16 hex digits) of the `vae/` weight files under `path`; "missing" when there are none."""
    files = sorted(Path(path, "vae").glob("*.safetensors")) if path is not None else []
    if not files:
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]
