"""Writing MIS shards (Sec. 4): idempotent, resumable, byte-reproducible, split over GPU workers.

A shard is committed by its manifest: the tar is written to a temp file and renamed, then the manifest
(with the tar's sha256 and a hash of the request that produced it) is written the same way. A shard whose
manifest matches the request and the bytes is skipped; anything else (a temp file left by a killed
worker, a tar without manifest, a hash mismatch) is regenerated from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m2m_pipeline.data.captions import Caption, batched_captions, read_caption_table
from m2m_pipeline.data.config import MISConfig
from m2m_pipeline.data.errors import MISDataError
from m2m_pipeline.data.generators import ImageSet, SetGenerator
from m2m_pipeline.io import atomic_open, remove_stale_temps
from m2m_pipeline.data.shards import (
    DeterministicTarWriter,
    dump_fp16,
    dump_json,
    encode_image,
    image_name,
    images_to_uint8,
    manifest_path,
    shard_is_complete,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)


def make_generator(cfg: MISConfig, device: str | None = None, dtype: str = "auto") -> SetGenerator:
    """The generator a preset names; Stable Diffusion is imported only when asked for.

    dtype: the run's compute precision (m2m_pipeline/precision.py); "auto" keeps cfg.dtype, anything else
    replaces it (a cfg.dtype set to another dtype is refused: one run, one precision). The procedural shapes
    world draws with numpy and has no precision.
    """
    if dtype != "auto":
        if cfg.dtype not in ("auto", dtype):
            raise ValueError(f"MISConfig.dtype={cfg.dtype} contradicts the compute dtype {dtype}: set one of them")
        cfg = cfg.replace(dtype=dtype)
    if cfg.generator == "shapes":
        from m2m_pipeline.data.shapes import ShapesSetGenerator

        return ShapesSetGenerator(cfg.resolution, cfg.images_per_set, cfg.seed)
    if cfg.generator == "stable-diffusion":
        from m2m_pipeline.data.stable_diffusion import StableDiffusionSetGenerator

        if cfg.model_path is None:
            raise ValueError(f"preset {cfg.name!r}: generator 'stable-diffusion' needs model_path")
        return StableDiffusionSetGenerator.from_pretrained(cfg.model_path, cfg, device=device)
    raise ValueError(f"unknown generator {cfg.generator!r}")


def shard_request(captions: Sequence[Caption], generator: SetGenerator, cfg: MISConfig) -> str:
    """Hash of everything that determines a shard's bytes; a manifest with another request is stale."""
    request = {
        "captions": [[c.id, c.text] for c in captions],
        "params": generator.generation_params(),
        "images_per_set": generator.images_per_set,
        "image_format": cfg.image_format,
        "jpeg_quality": cfg.jpeg_quality if cfg.image_format == "jpeg" else None,
        "keep_latents": cfg.keep_latents,
    }
    return hashlib.sha256(dump_json(request)).hexdigest()


def encode_mis_sample(image_set: ImageSet, cfg: MISConfig) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "__key__": image_set.key,
        "caption.txt": image_set.caption.encode("utf-8"),
        "gen.json": dump_json({**image_set.params, "indices": image_set.indices, "seeds": image_set.seeds}),
    }
    for index, pixels in zip(image_set.indices, images_to_uint8(image_set.images)):
        sample[image_name(index, cfg.image_format)] = encode_image(pixels, cfg.image_format, cfg.jpeg_quality)
    if cfg.keep_latents and image_set.latents is not None:
        sample["latents.npy"] = dump_fp16(image_set.latents)
    if image_set.attributes is not None:
        sample["attributes.json"] = dump_json(image_set.attributes)
    return sample


def generate_shard(
    index: int, captions: Sequence[Caption], generator: SetGenerator, out_dir: str | os.PathLike, cfg: MISConfig,
    progress: bool = True, overwrite: bool = False,
) -> dict[str, Any]:
    """Write MIS shard `index` for `captions` into `out_dir` and return its manifest (skips if already done).

    A finished shard made from *other* captions or parameters raises unless `overwrite`: silently
    replacing it would change a dataset other shards and caches were built against.
    """
    if not captions:
        raise ValueError(f"shard {index}: no captions")
    keys = [c.id for c in captions]
    if len(set(keys)) != len(keys):
        raise MISDataError(f"shard {index}: duplicate caption ids {sorted({k for k in keys if keys.count(k) > 1})}")
    if any("." in k or "/" in k for k in keys):
        raise MISDataError(f"shard {index}: caption ids must not contain '.' or '/' (webdataset keys): {keys}")
    out_dir = Path(out_dir)
    shard = out_dir / shard_name(index)
    request = shard_request(captions, generator, cfg)
    done = shard_is_complete(shard, request)
    if done is not None:
        return {**done, "skipped": True}
    if shard.exists() and manifest_path(shard).exists() and not overwrite:
        old = json.loads(manifest_path(shard).read_text(encoding="utf-8"))
        if old.get("request") != request:
            raise MISDataError(f"{shard}: exists with a manifest for different captions or generation parameters; "
                               f"pass overwrite=True to regenerate it")
    manifest_path(shard).unlink(missing_ok=True)  # uncommit first: a crash below must not leave a stale "done"
    remove_stale_temps(out_dir, shard.name, on_remove=lambda p: log.info("removed partial shard %s", p))

    bar = tqdm(total=len(captions), desc=shard.name, unit=" sets", disable=not progress)
    with atomic_open(shard) as handle, DeterministicTarWriter(handle) as writer:
        for start in range(0, len(captions), cfg.captions_per_batch):
            batch = captions[start : start + cfg.captions_per_batch]
            for image_set in generator.generate(batch):
                writer.write(encode_mis_sample(image_set, cfg))
                bar.update(1)
    bar.close()
    params = generator.generation_params()
    extra = {"kind": "mis", "images_per_set": generator.images_per_set, "image_format": cfg.image_format,
             "generation": params, "preset": cfg.name}
    return {**write_manifest(shard, index, keys, request, extra), "skipped": False}


def generate_mis(
    caption_table: str | os.PathLike, out_dir: str | os.PathLike, generator: SetGenerator, cfg: MISConfig,
    split: str = "train", rank: int = 0, world_size: int = 1, max_shards: int | None = None, progress: bool = True,
    first_shard: int = 0,
) -> list[dict[str, Any]]:
    """Generate this worker's shards of one split; re-running resumes where a previous run stopped.

    Shards are dealt round-robin: worker `rank` of `world_size` (one per GPU) writes shards
    rank, rank + world_size, ...; workers share nothing but the caption table and the output folder.
    `first_shard` / `max_shards` restrict it to the shard indices [first_shard, max_shards) (a cluster job's range).

    The caption table is streamed, so only one shard's captions are in memory at a time.
    """
    manifests = []
    chunks: Iterable[list[Caption]] = batched_captions(read_caption_table(caption_table, split), cfg.sets_per_shard)
    index = -1
    for index, captions in enumerate(chunks):
        if max_shards is not None and index >= max_shards:
            break
        if index < first_shard or index % world_size != rank:
            continue
        manifests.append(generate_shard(index, captions, generator, out_dir, cfg, progress=progress))
    if index < 0:  # zero sets is a failed run, not an empty dataset (a worker may still own no shard)
        raise MISDataError(f"{caption_table}: no captions in split {split!r}; nothing to generate")
    return manifests
