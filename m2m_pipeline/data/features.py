"""Feature caches (Sec. 5): per MIS shard, a feature shard with the same keys holding the autoencoder
latents (pixel tensors for pixel-space presets) and, for M2M-DINO, what its context tokens come from.

`MISConfig.dino_features` chooses the latter (docs/data.md "The DINO feature store"):
- "cache": DINOv2 last hidden states, fp16 (`dino.npy`, (K, S, D)); training decodes nothing.
- "online": the set's images as the MIS shard encoded them (`00.jpg` .. `24.jpg` / `.png`, copied byte for
  byte, never re-encoded); the training step encodes the N - 1 context images it draws. At paper scale this
  is 3.0 MB per set instead of 20.6 MB.
Training reads only feature shards, so each carries the caption and attributes too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from m2m_pipeline.data.config import MISConfig
from m2m_pipeline.data.errors import ShardError
from m2m_pipeline.data.shapes import uint8_to_images
from m2m_pipeline.data.shards import (
    DeterministicTarWriter,
    MISSample,
    decode_mis_sample,
    dump_fp16,
    image_extensions,
    dump_json,
    manifest_path,
    read_manifest,
    read_samples,
    shard_is_complete,
    write_manifest,
)
from m2m_pipeline.encoders import EncoderSpec, vae_weights_digest
from m2m_pipeline.io import atomic_open, remove_stale_temps


class ImageEncoder(Protocol):
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


def encoder_spec(cfg: MISConfig) -> EncoderSpec:
    """The encoders a preset names; recorded in every feature manifest and, via training, every checkpoint."""
    if cfg.dino_path is not None:
        dino: dict[str, Any] = {"dino_path": cfg.dino_path}
    else:
        dino = {"dino_random": {"image_size": cfg.resolution, "patch_size": cfg.dino_patch_size,
                                "hidden_size": cfg.dino_hidden_size, "num_layers": cfg.dino_layers, "seed": cfg.seed}}
    if cfg.autoencoder == "pixel":
        return EncoderSpec("pixel", **dino)
    return EncoderSpec("vae", cfg.vae_path, vae_weights_digest(cfg.vae_path), **dino)


def load_feature_encoders(cfg: MISConfig, device: str | None = None) -> tuple[Any, Any]:
    """The (autoencoder, DINO encoder) pair a preset names (its `encoder_spec`); no DINO encoder (None) when
    the preset encodes DINO online, in training."""
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = encoder_spec(cfg)
    autoencoder = spec.build_autoencoder()
    dino = spec.build_dino() if cfg.dino_features == "cache" else None
    for module in (autoencoder, dino):
        if isinstance(module, torch.nn.Module):
            module.to(target)
    return autoencoder, dino


def encoder_tag(cfg: MISConfig, spec: EncoderSpec | None = None) -> str:
    """Names the encoders a cache was built with; a cache built with other encoders is stale (a retrained
    autoencoder, the demo's `autoencoder` asset, makes every feature shard built with the old one stale).
    `spec`: `encoder_spec(cfg)` when the caller has it (computing it hashes the VAE weights)."""
    online = "|dino=online" if cfg.dino_features == "online" else ""  # absent for "cache": older caches stay fresh
    return f"{(spec or encoder_spec(cfg)).tag()}|reuse={cfg.reuse_generation_latents}{online}"


def cache_dino_features(shards: list[str | os.PathLike]) -> str:
    """"cache" or "online": how the feature shards hold M2M-DINO's context (their manifests; mixed is refused)."""
    modes = {os.fspath(s): (read_manifest(s) or {}).get("dino_features", "cache") for s in shards}
    if len(set(modes.values())) > 1:
        first = {mode: shard for shard, mode in modes.items()}
        raise ShardError(os.fspath(shards[0]), None, f"feature shards mix DINO stores ({first}); rebuild them "
                                                     f"with one MISConfig.dino_features")
    return next(iter(modes.values()), "cache")


def cache_encoder_spec(shards: list[str | os.PathLike]) -> EncoderSpec | None:
    """The one EncoderSpec the feature shards' manifests record; shards built with different encoders are
    refused; None when no manifest records one (caches built before manifests carried it)."""
    found: dict[str, tuple[EncoderSpec, list[str]]] = {}  # tag -> (spec, shards recording it)
    for shard in shards:
        manifest = read_manifest(shard)
        raw = None if manifest is None else manifest.get("encoder_spec")
        if raw is None:
            continue
        spec = EncoderSpec.from_dict(raw, f"{manifest_path(shard)}: field 'encoder_spec'")
        found.setdefault(spec.tag(), (spec, []))[1].append(os.fspath(shard))
    if len(found) > 1:
        detail = "; ".join(f"{tag}: {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
                           for tag, (_, paths) in found.items())
        raise ShardError(os.fspath(shards[0]), None, f"feature shards were built with different encoders ({detail}); "
                                                     f"rebuild them with one")
    return next((spec for spec, _ in found.values()), None)


def _device_of(encoder: Any) -> torch.device:
    if isinstance(encoder, torch.nn.Module):
        for tensor in list(encoder.parameters()) + list(encoder.buffers()):
            return tensor.device
    return torch.device("cpu")


def _image_batches(samples: list[MISSample], batch_size: int) -> Iterator[torch.Tensor]:
    """Images of consecutive samples cut into encoder batches that may span samples (full batches)."""
    pixels = np.concatenate([s.images for s in samples])  # (S*K, H, W, 3) uint8
    for start in range(0, len(pixels), batch_size):
        yield uint8_to_images(pixels[start : start + batch_size])


@torch.no_grad()
def encode_images(encoder: ImageEncoder, samples: list[MISSample], batch_size: int, bar: Any) -> list[np.ndarray]:
    """Per-sample (K, ...) float32 features, computed batch_size images at a time."""
    device = _device_of(encoder)
    out = []
    for batch in _image_batches(samples, batch_size):
        features = encoder.encode(batch.to(device)).float().cpu().numpy()
        out.append(features)
        bar.update(len(batch))
    flat = np.concatenate(out)
    counts = np.cumsum([len(s.images) for s in samples])[:-1]
    return list(np.split(flat, counts))


def _check_features(array: np.ndarray, shard: str, key: str, what: str) -> None:
    if not np.isfinite(array).all():
        raise ShardError(shard, key, f"{what} contain NaN or inf")
    if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        raise ShardError(shard, key, f"{what} overflow fp16 (max |x| = {np.abs(array).max():.3g})")


def build_feature_shard(
    mis_shard: str | os.PathLike, out_dir: str | os.PathLike, autoencoder: ImageEncoder, dino: ImageEncoder | None,
    cfg: MISConfig, progress: bool = True, samples_per_chunk: int = 16,
) -> dict[str, Any]:
    """Encode every image of `mis_shard` into `out_dir/<same name>`; skips if already built from it.

    Samples are processed `samples_per_chunk` at a time, so memory stays bounded at any shard size.
    """
    mis_shard = Path(mis_shard)
    source = read_manifest(mis_shard)
    if source is None:
        raise ShardError(os.fspath(mis_shard), None, f"no manifest {manifest_path(mis_shard)}; generate the shard first")
    if source["num_samples"] == 0:
        raise ShardError(os.fspath(mis_shard), None, "holds no sets (its manifest lists 0); nothing to encode")
    shard = Path(out_dir) / mis_shard.name
    spec = encoder_spec(cfg)  # once per shard: it hashes the autoencoder's weights
    tag = encoder_tag(cfg, spec)
    request = hashlib.sha256(dump_json({"source": source["sha256"], "encoders": tag})).hexdigest()
    done = shard_is_complete(shard, request)
    if done is not None:
        return {**done, "skipped": True}
    manifest_path(shard).unlink(missing_ok=True)
    remove_stale_temps(shard.parent, shard.name)

    total = source["num_samples"] * source["images_per_set"]
    bar = tqdm(total=total, desc=f"features {shard.name}", unit=" img", disable=not progress)
    keys: list[str] = []
    shapes: dict[str, list[int]] = {}
    online = cfg.dino_features == "online"
    if not online and dino is None:
        raise ValueError(f"MISConfig {cfg.name!r} caches DINO features (dino_features='cache'): pass a DINO encoder")
    with atomic_open(shard) as handle, DeterministicTarWriter(handle) as writer:
        chunk: list[MISSample] = []
        raws: list[dict[str, Any]] = []

        def flush() -> None:
            if online:  # the images travel as the MIS shard encoded them; training encodes them
                contexts: list[dict[str, Any]] = [{name: raw[name] for name in image_extensions(raw)} for raw in raws]
                bar.update(sum(len(s.images) for s in chunk))
            else:
                contexts = [{"dino.npy": v} for v in encode_images(dino, chunk, cfg.feature_batch_size, bar)]
            reuse = cfg.reuse_generation_latents and all(s.latents is not None for s in chunk)
            if reuse:
                latents = [s.latents.astype(np.float32) for s in chunk]  # type: ignore[union-attr]
            else:
                latents = encode_images(autoencoder, chunk, cfg.feature_batch_size, _NullBar())
            for sample, z, context in zip(chunk, latents, contexts):
                _check_features(z, os.fspath(mis_shard), sample.key, "latents")
                shapes.setdefault("latents", list(z.shape))
                record: dict[str, Any] = {"__key__": sample.key, "caption.txt": sample.caption.encode("utf-8"),
                                          "latents.npy": dump_fp16(z)}
                if online:
                    record.update(context)
                else:
                    _check_features(context["dino.npy"], os.fspath(mis_shard), sample.key, "DINO features")
                    shapes.setdefault("dino", list(context["dino.npy"].shape))
                    record["dino.npy"] = dump_fp16(context["dino.npy"])
                if sample.attributes is not None:
                    record["attributes.json"] = dump_json(sample.attributes)
                writer.write(record)
                keys.append(sample.key)
            chunk.clear()
            raws.clear()

        read: dict[str, dict[str, Any]] = {}  # what the reader hashed while streaming the MIS shard
        for raw in read_samples([mis_shard], digests=read):  # raises at the end if bytes or keys differ
            chunk.append(decode_mis_sample(raw, source["images_per_set"]))
            raws.append(raw)
            if len(chunk) == samples_per_chunk:
                flush()
        if chunk:
            flush()
        if keys != source["keys"]:  # raised inside the writer: the partial feature shard is discarded
            raise ShardError(os.fspath(mis_shard), keys[-1] if keys else None,
                             f"holds {len(keys)} samples but its manifest lists {source['num_samples']} "
                             f"(truncated?); regenerate it")
    bar.close()
    extra = {"kind": "features", "source": mis_shard.name, "source_sha256": read[os.fspath(mis_shard)]["sha256"],
             "encoders": tag, "encoder_spec": spec.to_dict(), "images_per_set": source["images_per_set"],
             "latents_shape": shapes.get("latents"), "dino_shape": shapes.get("dino"), "dtype": "float16",
             "dino_features": cfg.dino_features, "preset": cfg.name}
    return {**write_manifest(shard, source["index"], keys, request, extra), "skipped": False}


class _NullBar:
    def update(self, n: int) -> None:  # the progress bar counts images once, on the DINO pass
        pass


def build_feature_shards(
    mis_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: MISConfig, device: str | None = None,
    rank: int = 0, world_size: int = 1, progress: bool = True,
) -> list[dict[str, Any]]:
    """Feature shards for every MIS shard in `mis_dir` (this worker's share, round-robin)."""
    shards = sorted(Path(mis_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no MIS shards (*.tar) in {mis_dir}; generate them first")
    autoencoder, dino = load_feature_encoders(cfg, device)
    return [build_feature_shard(s, out_dir, autoencoder, dino, cfg, progress=progress)
            for i, s in enumerate(shards) if i % world_size == rank]
