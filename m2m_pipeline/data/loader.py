"""Training examples from feature shards (Sec. 7.1.1): N images, a random subset *and order* of a set's 25.

A webdataset pipeline: seeded shard shuffle (same permutation on every rank), shards split over DDP ranks
then dataloader workers, samples streamed from tar files (nothing is loaded whole), a bounded shuffle
buffer, then the subset draw. All randomness derives from (seed, epoch, rank, worker).
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from m2m_pipeline.data.errors import ShardError
from m2m_pipeline.io import sha256_file
from m2m_pipeline.data.shapes import uint8_to_images
from m2m_pipeline.data.shards import (
    decode_image,
    decode_json,
    decode_npy,
    decode_text,
    image_extensions,
    read_manifest,
    samples_from_shards,
)


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A glob, a brace pattern ("mis-{000000..000007}.tar"), a directory, or a list of paths."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls: list[str] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isdir(text):
            urls.extend(sorted(glob.glob(os.path.join(text, "*.tar"))))
        elif glob.has_magic(text):
            urls.extend(sorted(glob.glob(text)))
        else:
            urls.extend(braceexpand.braceexpand(text))
    if not urls:
        raise FileNotFoundError(f"no feature shards match {shards!r}")
    return urls


def to_example(sample: Mapping[str, Any], n_images: int, rng: random.Random) -> dict[str, Any]:
    """Decode one feature sample and draw its N images; errors name the shard and the sample key."""
    url, key = sample.get("__url__", "<unknown shard>"), sample["__key__"]
    caption = decode_text(sample, "caption.txt", url, key) if "caption.txt" in sample else ""
    attributes = decode_json(sample, "attributes.json", url, key) if "attributes.json" in sample else None
    latents = decode_npy(sample, "latents.npy", url, key)  # (25, C, H, W) fp16
    online = "dino.npy" not in sample  # an online DINO store: the set's encoded images instead (data/features.py)
    if online:
        names = image_extensions(sample)
        if not names:
            raise ShardError(url, key, "sample has neither 'dino.npy' nor images ('00.jpg' ...) for M2M-DINO's context")
        sizes = (len(latents), len(names))
    else:
        dino = decode_npy(sample, "dino.npy", url, key)    # (25, S, D) fp16
        if dino.ndim != 3:
            raise ShardError(url, key, f"feature shape {dino.shape} of 'dino.npy' is not (K, S, D)")
        sizes = (len(latents), len(dino))
    if latents.ndim != 4 or sizes[0] != sizes[1]:
        raise ShardError(url, key, f"latents {latents.shape} are not (K, C, H, W) with one entry per image of the "
                                   f"set ({sizes[1]} {'images' if online else 'DINO entries'})")
    if len(latents) < n_images:
        raise ShardError(url, key, f"set has {len(latents)} images, fewer than the {n_images} an example needs")
    indices = rng.sample(range(len(latents)), n_images)  # random subset, random order
    example: dict[str, Any] = {
        "key": key,
        "shard": url,                                                          # for error messages
        "shard_pass": sample.get("__pass__", 0),                               # which read of it (ShardLedger)
        "caption": caption,
        "indices": torch.tensor(indices, dtype=torch.long),                    # (N,)
        "latents": torch.from_numpy(latents[indices].astype(np.float32)),      # (N, C, H, W)
    }
    if online:
        # Only the N - 1 context images are decoded (image N is nobody's context): (N - 1, 3, H, W) in [-1, 1].
        context = indices[: max(1, n_images - 1)]
        example["images"] = uint8_to_images(np.stack([decode_image(sample, names[i], url, key) for i in context]))
    else:
        example["dino"] = torch.from_numpy(dino[indices].astype(np.float32))  # (N, S, D)
    if attributes is not None:
        if not isinstance(attributes, dict):
            raise ShardError(url, key, f"'attributes.json' is a {type(attributes).__name__}, expected an object")
        per_image = attributes.get("images")
        if per_image is not None:
            if not isinstance(per_image, list) or len(per_image) != len(latents):
                raise ShardError(url, key, f"'attributes.json' field 'images' must list one entry per image of "
                                           f"the set ({len(latents)})")
            attributes = {**attributes, "images": [per_image[i] for i in indices]}
        example["attributes"] = attributes
    return example


class MISExamples(IterableDataset):
    """Iterable of training examples; call `set_epoch(e)` before each epoch for a fresh shard order."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        n_images: int = 5,             # images per example (Sec. 7.1.1: N = 5)
        seed: int = 0,
        shuffle_buffer: int = 1000,    # samples in the shuffle buffer (0: no sample shuffle)
        repeat: bool = False,          # loop over epochs forever: equal-length streams for DDP
        verify: bool = True,           # check each shard's keys and sha256 against its manifest (required)
    ):
        super().__init__()
        self.urls = expand_shards(shards)
        self.n_images = n_images
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.verify = verify
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pipeline(self, epoch: int) -> wds.DataPipeline:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if len(self.urls) < world_size * num_workers:
            raise ValueError(f"{len(self.urls)} shards cannot feed {world_size} ranks x {num_workers} workers; "
                             f"write smaller shards or use fewer workers")
        # Per-stream seed: different on every rank/worker, reproducible for a given (seed, epoch).
        stream_seed = f"{self.seed}:{epoch}:{rank}:{worker}"
        stages: list[Any] = [
            wds.SimpleShardList(self.urls, seed=self.seed + epoch),  # same permutation on all ranks
            wds.split_by_node,
            wds.split_by_worker,
            lambda src: samples_from_shards(src, self.verify, tag=epoch),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2,
                                      rng=random.Random(stream_seed + ":shuffle")))
        rng = random.Random(stream_seed + ":subset")
        # A plain generator stage, not wds.map, which would re-add webdataset's "__key__" to the example.
        stages.append(lambda src: (to_example(sample, self.n_images, rng) for sample in src))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        while True:
            yield from self._pipeline(epoch)
            if not self.repeat:
                return
            epoch += 1


class ShardLedger:
    """Which shards a training rank has consumed samples of without their bytes being verified yet.

    The reader checks a shard's sha256 when it reaches the shard's end, before it releases the shard's last
    sample; so once all `num_samples` samples of one read (a pass: shard and epoch) were consumed, that read
    was verified. A pass still open when a checkpoint is due has contributed to updates the checkpoint would
    include, so `verify_pending` hashes those shards' files against their manifests first.
    """

    def __init__(self) -> None:
        self.open: dict[tuple[str, Any], list[str]] = {}  # (shard, pass) -> keys consumed so far
        self.sizes: dict[str, int] = {}

    def record(self, batch: Mapping[str, Any]) -> None:
        shards, passes, keys = batch.get("shard"), batch.get("shard_pass"), batch.get("key")
        if shards is None or passes is None:
            return
        if isinstance(shards, str):  # a single example (batch_size None)
            shards, passes, keys = [shards], [passes], [keys]
        for url, tag, key in zip(shards, passes, keys):
            tag = int(tag) if isinstance(tag, torch.Tensor) else tag
            seen = self.open.setdefault((url, tag), [])
            seen.append(key)
            if len(seen) >= self._size(url):
                del self.open[(url, tag)]  # every sample of this read consumed: the read verified its bytes

    def _size(self, url: str) -> int:
        if url not in self.sizes:
            manifest = read_manifest(url)
            self.sizes[url] = manifest["num_samples"] if manifest is not None else 0
        return self.sizes[url]

    def pending(self) -> list[str]:
        return sorted({url for url, _ in self.open})

    def verify_pending(self) -> None:
        """Hash every shard with an open read against its manifest; a mismatch raises naming the shard."""
        for url in self.pending():
            manifest = read_manifest(url)
            if manifest is None:
                raise ShardError(url, None, "its manifest disappeared during training")
            digest = sha256_file(url)
            if digest != manifest["sha256"]:
                keys = [k for (u, _), ks in self.open.items() if u == url for k in ks]
                raise ShardError(url, keys[0] if keys else None,
                                 f"sha256 {digest[:12]}.. does not match its manifest ({manifest['sha256'][:12]}..), "
                                 f"checked before a checkpoint; samples {keys[:5]} were trained on")


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into (B, N, ...); keep strings and attribute dicts as lists."""
    batch: dict[str, Any] = {}
    for name in examples[0]:
        values = [e[name] for e in examples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def _as_is(example: dict[str, Any]) -> dict[str, Any]:
    return example  # batch_size=None: the default collate would convert attribute ints to tensors


def make_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike], n_images: int = 5, batch_size: int | None = None,
    num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, repeat: bool = False,
) -> DataLoader:
    """DataLoader over feature shards: single examples (batch_size None) or batches of (B, N, ...) tensors."""
    dataset = MISExamples(shards, n_images=n_images, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_examples if batch_size is not None else _as_is,
                      persistent_workers=False)
