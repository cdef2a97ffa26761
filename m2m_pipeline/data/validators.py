"""Data checks as plain functions returning a ValidationResult (the orchestration layer wraps them as
asset checks; nothing here imports it). Each check reads its data as a stream and reports what failed,
naming the shard and sample key, instead of raising. Shards are hashed while they are read (the bytes checked
are the bytes hashed) and compared with their manifests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2m_pipeline.data.captions import SPLITS, read_caption_table
from m2m_pipeline.data.errors import MISDataError, ShardError
from m2m_pipeline.data.shards import (
    decode_image,
    decode_mis_sample,
    decode_npy,
    image_extensions,
    read_manifest,
    read_samples,
)
from m2m_pipeline.data.tokens import clip_token_count

MAX_ERRORS = 20


@dataclass
class ValidationResult:
    check: str                                       # name of the check
    target: str                                      # file checked
    passed: bool = True
    errors: list[str] = field(default_factory=list)  # first MAX_ERRORS problems, each naming file and key
    details: dict[str, Any] = field(default_factory=dict)  # counts and figures worth displaying

    def fail(self, message: str) -> None:
        self.passed = False
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    def __bool__(self) -> bool:
        return self.passed


def _check_manifest(result: ValidationResult, shard: Path) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(shard)
    except ShardError as exn:
        result.fail(str(exn))
        return None
    if manifest is None:
        result.fail(f"{shard}: no manifest")
        return None
    if not shard.exists():
        result.fail(f"{shard}: shard file missing")
        return None
    return manifest


def _check_digest(result: ValidationResult, shard: Path, manifest: dict[str, Any] | None,
                  digests: dict[str, dict[str, Any]]) -> None:
    """The sha256 of the bytes the check itself read (hashed while streaming) against the manifest's."""
    read = digests.get(os.fspath(shard))
    if manifest is None or read is None:  # no manifest, or the read stopped early (reported already)
        return
    if read["sha256"] != manifest["sha256"]:
        result.fail(f"{shard}: sha256 {read['sha256'][:12]}.. of the {read['bytes']} bytes read does not match "
                    f"manifest {manifest['sha256'][:12]}..")


def _check_keys(result: ValidationResult, shard: Path, keys: list[str], manifest: dict[str, Any] | None) -> None:
    repeated = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if repeated:
        result.fail(f"{shard}: duplicate sample keys {repeated[:5]}")
    if manifest is not None and keys != manifest["keys"]:
        missing = [k for k in manifest["keys"] if k not in set(keys)]
        result.fail(f"{shard}: {len(keys)} samples read, manifest lists {manifest['num_samples']}; "
                    f"missing keys {missing[:5]}")
    result.details["samples"] = len(keys)


def validate_mis_shard(shard: str | os.PathLike, images_per_set: int = 25, max_tokens: int = 77) -> ValidationResult:
    """Every sample has `images_per_set` decodable images of one size, a caption within the token limit,
    finite latents when stored; keys and bytes match the manifest."""
    shard = Path(shard)
    result = ValidationResult("mis_shard_integrity", os.fspath(shard))
    manifest = _check_manifest(result, shard)
    keys: list[str] = []
    sizes: set[tuple[int, ...]] = set()
    digests: dict[str, dict[str, Any]] = {}
    try:
        for raw in read_samples([shard], verify=False, digests=digests):
            keys.append(raw["__key__"])
            try:
                sample = decode_mis_sample(raw, images_per_set)
            except ShardError as exn:
                result.fail(str(exn))
                continue
            sizes.add(sample.images.shape[1:])
            tokens = clip_token_count(sample.caption)
            if tokens > max_tokens:
                result.fail(f"{shard}: sample {sample.key!r}: caption has {tokens} CLIP tokens > {max_tokens}")
            if sample.latents is not None and not np.isfinite(sample.latents.astype(np.float32)).all():
                result.fail(f"{shard}: sample {sample.key!r}: latents contain NaN or inf")
    except ShardError as exn:
        result.fail(str(exn))
    _check_keys(result, shard, keys, manifest)
    _check_digest(result, shard, manifest, digests)
    if len(sizes) > 1:
        result.fail(f"{shard}: image sizes differ across samples: {sorted(sizes)}")
    result.details["image_shape"] = list(next(iter(sizes))) if len(sizes) == 1 else None
    return result


def _check_online_images(result: ValidationResult, raw: dict[str, Any], url: str, key: str,
                         latents_shape: tuple[int, ...] | None) -> None:
    """An online DINO store's sample: one decodable image per latent (the DINO encoder's input in training)."""
    names = image_extensions(raw)
    if latents_shape is not None and len(names) != latents_shape[0]:
        result.fail(f"{url}: sample {key!r}: {len(names)} images for {latents_shape[0]} latents")
    for name in names:
        try:
            decode_image(raw, name, url, key)
        except ShardError as exn:
            result.fail(str(exn))


def validate_feature_shard(
    shard: str | os.PathLike, latents_shape: Iterable[int] | None = None, dino_shape: Iterable[int] | None = None,
) -> ValidationResult:
    """Feature arrays are fp16 with the expected (or at least consistent) shapes, finite, keyed as the manifest."""
    shard = Path(shard)
    result = ValidationResult("feature_shard", os.fspath(shard))
    manifest = _check_manifest(result, shard)
    expected = {"latents.npy": tuple(latents_shape) if latents_shape else None,
                "dino.npy": tuple(dino_shape) if dino_shape else None}
    if manifest is not None:
        expected = {"latents.npy": expected["latents.npy"] or tuple(manifest.get("latents_shape") or ()) or None,
                    "dino.npy": expected["dino.npy"] or tuple(manifest.get("dino_shape") or ()) or None}
    online = manifest is not None and manifest.get("dino_features") == "online"  # images instead of dino.npy
    keys: list[str] = []
    digests: dict[str, dict[str, Any]] = {}
    try:
        for raw in read_samples([shard], verify=False, digests=digests):
            url, key = os.fspath(shard), raw["__key__"]
            keys.append(key)
            if online:
                _check_online_images(result, raw, url, key, expected["latents.npy"])
            for ext in ("latents.npy",) if online else ("latents.npy", "dino.npy"):
                try:
                    array = decode_npy(raw, ext, url, key)
                except ShardError as exn:
                    result.fail(str(exn))
                    continue
                if array.dtype != np.float16:
                    result.fail(f"{url}: sample {key!r}: {ext} has dtype {array.dtype}, expected float16")
                if expected[ext] is None:
                    expected[ext] = array.shape
                elif array.shape != expected[ext]:
                    result.fail(f"{url}: sample {key!r}: {ext} has shape {array.shape}, expected {expected[ext]}")
                if not np.isfinite(array.astype(np.float32)).all():
                    result.fail(f"{url}: sample {key!r}: {ext} contains NaN or inf")
    except ShardError as exn:
        result.fail(str(exn))
    _check_keys(result, shard, keys, manifest)
    _check_digest(result, shard, manifest, digests)
    result.details.update(latents_shape=expected["latents.npy"], dino_shape=expected["dino.npy"])
    return result


def validate_caption_table(table: str | os.PathLike, max_tokens: int = 77) -> ValidationResult:
    """Every caption is non-empty, within the CLIP limit (recounted), with a unique id."""
    result = ValidationResult("caption_table", os.fspath(table))
    ids: set[str] = set()
    splits = {name: 0 for name in SPLITS}
    try:
        for record in read_caption_table(table):
            where = f"{table}: caption {record.id!r} ({record.source})"
            tokens = clip_token_count(record.caption)
            if not record.caption.strip():
                result.fail(f"{where}: empty caption")
            if tokens > max_tokens:
                result.fail(f"{where}: {tokens} CLIP tokens > {max_tokens}")
            if tokens != record.tokens:
                result.fail(f"{where}: recorded {record.tokens} tokens, tokenizer counts {tokens}")
            if record.id in ids:
                result.fail(f"{where}: duplicate id")
            ids.add(record.id)
            splits[record.split] = splits.get(record.split, 0) + 1
    except MISDataError as exn:
        result.fail(str(exn))
    result.details.update(captions=len(ids), **splits)
    return result
