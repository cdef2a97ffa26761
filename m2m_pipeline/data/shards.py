"""The on-disk MIS formats: webdataset tar shards, one sample per image set, each with a JSON manifest.

An MIS sample `<key>.*` holds `caption.txt`, `00.png` .. `24.png` (or `.jpg`), `gen.json` (generation
parameters and seeds), optionally `latents.npy` (fp16) and `attributes.json`. A feature sample holds
`caption.txt`, `latents.npy`, `dino.npy` (both fp16) and `attributes.json` when known. See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from m2m_pipeline.data.errors import ShardError
from m2m_pipeline.data.io import atomic_write_bytes, sha256_file

MANIFEST_FORMAT = "mis-manifest-v1"
TAR_MTIME = 0            # fixed member mtimes/owners: identical inputs give byte-identical tars
TAR_USER = "mis"
PNG_COMPRESS_LEVEL = 6   # fixed encoder settings for the same reason
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg"}


def shard_name(index: int, prefix: str = "mis") -> str:
    return f"{prefix}-{index:06d}.tar"


def manifest_path(shard: str | os.PathLike) -> Path:
    """`mis-000003.tar` -> `mis-000003.json`, beside it."""
    path = Path(shard)
    return path.with_suffix(".json") if path.suffix == ".tar" else path.with_name(path.name + ".json")


def image_name(index: int, image_format: str) -> str:
    return f"{index:02d}.{IMAGE_EXTENSIONS[image_format]}"


# ----------------------------------------------------------------------------------------------- encoding

def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(K, 3, H, W) in [-1, 1] -> (K, H, W, 3) uint8, rounding like diffusers' numpy_to_pil."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (K, 3, H, W), got {tuple(images.shape)}")
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).contiguous().numpy()


def encode_image(pixels: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif image_format == "jpeg":
        # 4:4:4 chroma: small images (and SD's fine texture) lose visibly more to 4:2:0 than they save.
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
    else:
        raise ValueError(f"unknown image format {image_format!r}; expected 'png' or 'jpeg'")
    return buffer.getvalue()


def dump_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dump_fp16(array: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    return wds.numpy_dumps(np.ascontiguousarray(array.astype(np.float16)))


class DeterministicTarWriter(wds.TarWriter):
    """webdataset's TarWriter with member metadata pinned (mtime, owner, mode, ustar format)."""

    def __init__(self, fileobj: Any):
        super().__init__(fileobj, user=TAR_USER, group=TAR_USER, mode=0o444, encoder=False, mtime=TAR_MTIME,
                         format="USTAR_FORMAT")


# ----------------------------------------------------------------------------------------------- reading

def _key_of(fname: str | None) -> str | None:
    if fname is None:
        return None
    key, _ = base_plus_ext(fname)
    return key


def _tar_members(src: Iterable[Mapping[str, Any]], check_manifest: bool = True) -> Iterator[dict[str, Any]]:
    """Members of each shard as webdataset file samples, raising ShardError(shard, key) on bad data.

    Hand-written rather than webdataset's tar_file_iterator because that one reports the stream but not
    the member being read when a tar is truncated or corrupt, and the error must name the sample key.
    A tar cut exactly at a member boundary reads as a valid, shorter tar; the sample count is then
    checked against the shard's manifest when one sits beside it.
    """
    for item in src:
        url = item["url"]
        current: str | None = None
        keys_seen = 0
        last_key: str | None = None
        try:
            stream = wds.gopen(url, "rb")
        except OSError as exn:
            raise ShardError(url, None, f"cannot open shard: {exn}") from exn
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    current = info.name
                    if not info.isreg():
                        continue
                    handle = tar.extractfile(info)
                    assert handle is not None
                    data = handle.read()
                    key = _key_of(info.name)
                    if key != last_key:
                        keys_seen, last_key = keys_seen + 1, key
                    yield {"fname": info.name, "data": data, "__url__": url}
        except (tarfile.TarError, OSError, EOFError) as exn:
            reason = f"truncated or corrupt tar data while reading member {current!r}: {exn}"
            raise ShardError(url, _key_of(current), reason) from exn
        finally:
            stream.close()
        manifest = read_manifest(url) if check_manifest and os.path.exists(url) else None
        if manifest is not None and manifest["num_samples"] != keys_seen:
            raise ShardError(url, last_key, f"shard ends after {keys_seen} samples but its manifest lists "
                                            f"{manifest['num_samples']} (truncated at a member boundary?)")
        yield {}  # group_by_keys' end-of-shard marker: samples never straddle shards


def samples_from_shards(src: Iterable[Mapping[str, Any]], check_manifest: bool = True) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: {"url": shard} dicts in, raw samples ({"__key__", "__url__", ext: bytes}) out."""
    return group_by_keys(_tar_members(src, check_manifest))


def read_samples(urls: Iterable[str | os.PathLike], check_manifest: bool = True) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards, in order."""
    return samples_from_shards(({"url": os.fspath(u)} for u in urls), check_manifest)


def read_manifest(shard: str | os.PathLike) -> dict[str, Any] | None:
    path = manifest_path(shard)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ShardError(os.fspath(shard), None, f"manifest {path} is not valid JSON: {exn}") from exn
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(os.fspath(shard), None, f"manifest {path} has format {manifest.get('format')!r}, "
                                                 f"expected {MANIFEST_FORMAT!r}")
    return manifest


def write_manifest(shard: Path, index: int, keys: list[str], request: str, extra: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "format": MANIFEST_FORMAT, "shard": shard.name, "index": index, "num_samples": len(keys), "keys": keys,
        "sha256": sha256_file(shard), "bytes": shard.stat().st_size, "request": request, **extra,
    }
    atomic_write_bytes(manifest_path(shard), json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n")
    return manifest


def shard_is_complete(shard: Path, request: str) -> dict[str, Any] | None:
    """The manifest if `shard` was fully written for exactly this request and still hashes the same."""
    try:
        manifest = read_manifest(shard)
    except ShardError:
        return None
    if manifest is None or not shard.exists() or manifest.get("request") != request:
        return None
    if manifest.get("bytes") != shard.stat().st_size or manifest.get("sha256") != sha256_file(shard):
        return None
    return manifest


# ----------------------------------------------------------------------------------------------- decoding

@dataclass
class MISSample:
    key: str
    caption: str
    images: np.ndarray                   # (K, H, W, 3) uint8, in image-index order
    params: dict[str, Any]
    latents: np.ndarray | None           # (K, C, h, w) float16
    attributes: dict[str, Any] | None


def _decode_text(sample: Mapping[str, Any], ext: str, url: str, key: str) -> str:
    try:
        return sample[ext].decode("utf-8")
    except KeyError:
        raise ShardError(url, key, f"sample has no {ext!r} member") from None
    except UnicodeDecodeError as exn:
        raise ShardError(url, key, f"{ext!r} is not UTF-8: {exn}") from exn


def _decode_json(sample: Mapping[str, Any], ext: str, url: str, key: str) -> Any:
    text = _decode_text(sample, ext, url, key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exn:
        raise ShardError(url, key, f"{ext!r} is not valid JSON: {exn}") from exn


def decode_npy(sample: Mapping[str, Any], ext: str, url: str, key: str) -> np.ndarray:
    if ext not in sample:
        raise ShardError(url, key, f"sample has no {ext!r} member")
    try:
        return np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise ShardError(url, key, f"{ext!r} is not a readable .npy array: {exn}") from exn


def image_extensions(sample: Mapping[str, Any]) -> list[str]:
    return sorted(ext for ext in sample if ext.split(".")[-1] in ("png", "jpg") and ext.split(".")[0].isdigit())


def decode_mis_sample(sample: Mapping[str, Any], images_per_set: int | None = None) -> MISSample:
    """Decode one raw MIS sample; any missing or undecodable member raises ShardError(shard, key)."""
    url, key = sample.get("__url__", "<unknown shard>"), sample["__key__"]
    caption = _decode_text(sample, "caption.txt", url, key)
    params = _decode_json(sample, "gen.json", url, key)
    names = image_extensions(sample)
    expected = images_per_set if images_per_set is not None else len(params.get("seeds", names))
    if len(names) != expected:
        raise ShardError(url, key, f"sample has {len(names)} images, expected {expected}")
    pixels = []
    for name in names:
        try:
            with Image.open(io.BytesIO(sample[name])) as image:
                image.load()
                pixels.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError) as exn:
            raise ShardError(url, key, f"image {name!r} does not decode: {exn}") from exn
    if len({p.shape for p in pixels}) > 1:
        raise ShardError(url, key, f"images differ in size: {sorted({p.shape for p in pixels})}")
    latents = decode_npy(sample, "latents.npy", url, key) if "latents.npy" in sample else None
    attributes = _decode_json(sample, "attributes.json", url, key) if "attributes.json" in sample else None
    return MISSample(key, caption, np.stack(pixels), params, latents, attributes)
