"""The on-disk MIS formats: webdataset tar shards, one sample per image set, each with a JSON manifest.

An MIS sample `<key>.*` holds `caption.txt`, `00.png` .. `24.png` (or `.jpg`), `gen.json` (generation
parameters and seeds), optionally `latents.npy` (fp16) and `attributes.json`. A feature sample holds
`caption.txt`, `latents.npy`, `dino.npy` (both fp16) and `attributes.json` when known. See docs/data.md.
"""

from __future__ import annotations

import hashlib
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
from m2m_pipeline.io import atomic_write_bytes, sha256_file

MANIFEST_FORMAT = "mis-manifest-v1"
TAR_MTIME = 0            # fixed member mtimes/owners: identical inputs give byte-identical tars
TAR_USER = "mis"
PNG_COMPRESS_LEVEL = 6   # fixed encoder settings for the same reason
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg"}


def shard_name(index: int, prefix: str = "mis") -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_index(name: str) -> int:
    """The inverse of shard_name for any file of a shard: `mis-000003.tar`, its manifest `mis-000003.json`, or a
    writer's temp file `.mis-000003.tar.<random>.tmp` -> 3."""
    return int(name.lstrip(".").split(".")[0].rsplit("-", 1)[1])


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


class HashingStream:
    """A read-only file wrapper that hashes every byte read through it: the sha256 a reader compares with the
    manifest is that of the bytes it parsed, not of a separate read. It also keeps the last `keep` bytes, so
    the end of the archive can be checked after tarfile has stopped (tarfile reads ahead in 10 KiB records)."""

    def __init__(self, raw: Any, keep: int = 4 * tarfile.RECORDSIZE):
        self.raw, self.keep = raw, keep
        self.digest = hashlib.sha256()
        self.position = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.position += len(data)
        self.tail += data
        if len(self.tail) > self.keep:
            del self.tail[: len(self.tail) - self.keep]
        return data

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _archive_end_problem(stream: HashingStream, end: int, last_member: str | None) -> str | None:
    """After tarfile's last member, only the end-of-archive marker (>= 2 zero blocks) and zero padding may
    follow. tarfile ends a streamed archive *silently* at a header that fails its checksum or is cut short,
    dropping every later sample; this check turns that into an error. None when the end is sound."""
    after = stream.position - end
    if after > len(stream.tail):
        return f"cannot check the end of the archive at byte {end}"
    nonzero = any(stream.tail[len(stream.tail) - after:])
    trailing = after
    for block in iter(lambda: stream.read(1 << 16), b""):  # the rest of the stream: zero padding only
        trailing += len(block)
        nonzero = nonzero or any(block)
    if nonzero:
        return (f"corrupt tar header at byte {end} (after member {last_member!r}): tar reading stops there, "
                f"so the samples after it would be lost")
    if trailing < 2 * tarfile.BLOCKSIZE:
        return (f"no end-of-archive marker after member {last_member!r} (byte {end}): truncated at a member "
                f"boundary?")
    return None


def _manifest_for(url: str, verify: bool) -> dict[str, Any] | None:
    if not verify:
        return None
    manifest = read_manifest(url)
    if manifest is None:
        raise ShardError(url, None, f"no manifest {manifest_path(url)}: its bytes cannot be verified (write one "
                                    f"with data.shards.write_manifest, or read it with verify=False)")
    return manifest


def _manifest_problem(keys: list[str], manifest: dict[str, Any],
                      end_problem: str | None) -> tuple[str | None, str] | None:
    """(sample key at fault, reason) when the keys read differ from the manifest's, else None."""
    expected = manifest["keys"]
    if keys == expected:
        return None
    if len(keys) < len(expected) and keys == expected[: len(keys)]:
        return keys[-1] if keys else None, (
            f"shard ends after {len(keys)} samples but its manifest lists {manifest['num_samples']} "
            + (f"({end_problem})" if end_problem else "(truncated at a member boundary?)"))
    i = next((i for i, (a, b) in enumerate(zip(keys, expected)) if a != b), min(len(keys), len(expected)))
    read = keys[i] if i < len(keys) else None
    listed = expected[i] if i < len(expected) else "<end>"
    return read, (f"sample keys differ from the manifest at position {i}: read {read or '<end>'!r}, manifest "
                  f"lists {listed!r} ({len(keys)} read, {len(expected)} listed)")


def _tar_members(src: Iterable[Mapping[str, Any]], verify: bool = True,
                 digests: dict[str, dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Members of each shard as webdataset file samples, raising ShardError(shard, key) on bad data.

    Hand-written rather than webdataset's tar_file_iterator because that one reports the stream but not
    the member being read when a tar is truncated or corrupt, and the error must name the sample key.
    Every byte is hashed as it is read. At the end of each shard, before its end-of-shard marker (so before
    group_by_keys releases the shard's last sample): the end of the archive is checked (a corrupt header
    must not end it silently) and, with `verify`, the keys read and the sha256 of the bytes read are
    compared with the shard's manifest, which must exist. `digests[url]` receives what was read.
    """
    for item in src:
        url = item["url"]
        manifest = _manifest_for(url, verify)
        current: str | None = None
        keys: list[str] = []
        try:
            raw = wds.gopen(url, "rb")
        except OSError as exn:
            raise ShardError(url, None, f"cannot open shard: {exn}") from exn
        stream = HashingStream(raw)
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
                    if not keys or key != keys[-1]:
                        keys.append(key)
                    yield {"fname": info.name, "data": data, "__url__": url}
                end_problem = _archive_end_problem(stream, tar.offset, current)
        except (tarfile.TarError, OSError, EOFError) as exn:
            reason = f"truncated or corrupt tar data while reading member {current!r}: {exn}"
            raise ShardError(url, _key_of(current), reason) from exn
        finally:
            raw.close()
        last_key = keys[-1] if keys else None
        if digests is not None:
            digests[url] = {"sha256": stream.hexdigest(), "bytes": stream.position, "keys": keys}
        problem = _manifest_problem(keys, manifest, end_problem) if manifest is not None else None
        if problem is not None:
            raise ShardError(url, *problem)
        if end_problem is not None:
            raise ShardError(url, last_key, end_problem)
        if manifest is not None and (stream.hexdigest() != manifest["sha256"] or stream.position != manifest["bytes"]):
            raise ShardError(url, None, f"sha256 of the {stream.position} bytes read ({stream.hexdigest()[:12]}..) "
                                        f"does not match manifest {manifest_path(url)} ({manifest['sha256'][:12]}.., "
                                        f"{manifest['bytes']} bytes): the shard is corrupt or was changed")
        yield {}  # group_by_keys' end-of-shard marker: samples never straddle shards


def samples_from_shards(src: Iterable[Mapping[str, Any]], verify: bool = True,
                        digests: dict[str, dict[str, Any]] | None = None,
                        tag: Any = None) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: {"url": shard} dicts in, raw samples ({"__key__", "__url__", ext: bytes}) out.

    A shard's last sample is released only after the shard's bytes were checked (see _tar_members), so a
    consumer that has seen all of a shard's samples has seen verified bytes. `tag`, when given, is stored as
    `__pass__` in every sample: which read of the shard it came from (the training loader's epoch).
    """
    for item in src:
        url = item["url"]
        try:
            for sample in group_by_keys(_tar_members([item], verify, digests)):
                if tag is not None:
                    sample["__pass__"] = tag
                yield sample
        except ShardError:
            raise
        except ValueError as exn:  # group_by_keys: a member name repeated within one sample
            raise ShardError(url, None, f"malformed sample: {exn.args[0] if exn.args else exn}") from exn


def read_samples(urls: Iterable[str | os.PathLike], verify: bool = True,
                 digests: dict[str, dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards, in order, each shard's bytes checked against its manifest (verify)."""
    return samples_from_shards(({"url": os.fspath(u)} for u in urls), verify, digests)


def read_manifest(shard: str | os.PathLike) -> dict[str, Any] | None:
    """A shard's manifest, checked for consistency (fields, types, sample count = keys, unique keys)."""
    path = manifest_path(shard)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ShardError(os.fspath(shard), None, f"manifest {path} is not valid JSON: {exn}") from exn
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(os.fspath(shard), None, f"manifest {path} has format {found!r}, expected {MANIFEST_FORMAT!r}")
    problem = _manifest_fields_problem(manifest)
    if problem is not None:
        raise ShardError(os.fspath(shard), None, f"manifest {path}: {problem}")
    return manifest


def _manifest_fields_problem(manifest: dict[str, Any]) -> str | None:
    keys, count = manifest.get("keys"), manifest.get("num_samples")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return "field 'keys' must be a list of sample keys"
    if not isinstance(count, int) or isinstance(count, bool) or count != len(keys):
        return f"field 'num_samples' ({count!r}) does not equal the {len(keys)} keys listed"
    if len(set(keys)) != len(keys):
        return f"field 'keys' repeats {sorted({k for k in keys if keys.count(k) > 1})[:5]}"
    digest = manifest.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return f"field 'sha256' ({digest!r}) is not a sha256 hex digest"
    size = manifest.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"field 'bytes' ({size!r}) is not a byte count"
    return None


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


def decode_text(sample: Mapping[str, Any], ext: str, url: str, key: str) -> str:
    try:
        return sample[ext].decode("utf-8")
    except KeyError:
        raise ShardError(url, key, f"sample has no {ext!r} member") from None
    except UnicodeDecodeError as exn:
        raise ShardError(url, key, f"{ext!r} is not UTF-8: {exn}") from exn


def decode_json(sample: Mapping[str, Any], ext: str, url: str, key: str) -> Any:
    text = decode_text(sample, ext, url, key)
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


def decode_image(sample: Mapping[str, Any], name: str, url: str, key: str) -> np.ndarray:
    """One image member -> (H, W, 3) uint8; an undecodable one raises ShardError(shard, key)."""
    try:
        with Image.open(io.BytesIO(sample[name])) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exn:
        raise ShardError(url, key, f"image {name!r} does not decode: {exn}") from exn


def decode_mis_sample(sample: Mapping[str, Any], images_per_set: int | None = None) -> MISSample:
    """Decode one raw MIS sample; any missing or undecodable member raises ShardError(shard, key)."""
    url, key = sample.get("__url__", "<unknown shard>"), sample["__key__"]
    caption = decode_text(sample, "caption.txt", url, key)
    params = decode_json(sample, "gen.json", url, key)
    names = image_extensions(sample)
    expected = images_per_set if images_per_set is not None else len(params.get("seeds", names))
    if len(names) != expected:
        raise ShardError(url, key, f"sample has {len(names)} images, expected {expected}")
    pixels = [decode_image(sample, name, url, key) for name in names]
    if len({p.shape for p in pixels}) > 1:
        raise ShardError(url, key, f"images differ in size: {sorted({p.shape for p in pixels})}")
    latents = decode_npy(sample, "latents.npy", url, key) if "latents.npy" in sample else None
    attributes = decode_json(sample, "attributes.json", url, key) if "attributes.json" in sample else None
    return MISSample(key, caption, np.stack(pixels), params, latents, attributes)
