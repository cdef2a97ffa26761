"""A resumable stream of training micro-batches for one process: its position is (epoch, batches consumed).

Exact resume rests on two properties: the order of epoch e is a function of (seed, e, rank) alone, and
the stream can be fast-forwarded to a position. How each kind of source gets there (docs/training.md):

- feature shards (a path, glob, brace pattern or list of paths): `make_loader(repeat=True)`, whose stream is
  seeded by (seed, epoch, rank, worker) and split over ranks by webdataset; one endless "epoch" 0, and a
  resume re-reads and drops the consumed batches (cost: reading those shards once more).
- a `torch.utils.data.DataLoader` over a map-style dataset (the task loaders): accelerate shards its batches
  over ranks with a sampler seeded by `seed + epoch`; a resume skips consumed batches at the sampler level
  (`skip_first_batches`: no sample is loaded).
- any other re-iterable (a list of batches in tests; a DataLoader over an IterableDataset that splits by rank
  itself): iterated again each epoch (after `set_epoch(epoch)` where it has one); lists and other plain
  iterables are split round-robin over ranks; a resume re-iterates and drops the consumed batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset


def is_shard_source(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], (str, Path)))


class BatchStream:
    """Endless iterator of this rank's micro-batches; `position` is what a checkpoint stores."""

    def __init__(self, data: Any, accelerator: Any, *, n_images: int, batch_size: int, num_workers: int,
                 seed: int, epoch: int = 0, consumed: int = 0):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.epoch, self.consumed = epoch, consumed
        self.ledger: Any = None  # feature shards only: which consumed shards are not verified yet
        if is_shard_source(data):
            from m2m_pipeline.data import make_loader

            from m2m_pipeline.data.loader import ShardLedger

            self.kind = "shards"
            self.ledger = ShardLedger()
            self.source = make_loader(data, n_images=n_images, batch_size=batch_size, num_workers=num_workers,
                                      seed=seed, repeat=True)
        elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            self.kind = "map"
            self.dataset = data.dataset
            self.source = accelerator.prepare_data_loader(data)
        else:
            self.kind = "iterable"
            self.source = data
        self._it = self._open(skip=consumed)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def verify_consumed(self) -> None:
        """Before a checkpoint: every feature shard this rank trained on is verified against its manifest
        (data/loader.py ShardLedger). All ranks agree, so none waits for another that stopped."""
        if self.ledger is None:
            return
        import torch

        from m2m_pipeline.data.errors import MISDataError

        problem: Exception | None = None
        try:
            self.ledger.verify_pending()
        except MISDataError as exn:
            problem = exn
        flag = torch.tensor(float(problem is not None), device=self.accelerator.device)
        if self.world > 1 and bool(self.accelerator.reduce(flag, "max").item()) and problem is None:
            raise MISDataError("another rank found a feature shard that does not match its manifest; see its error")
        if problem is not None:
            raise problem

    def describe(self) -> str:
        return {"shards": "feature shards", "map": "map-style DataLoader",
                "iterable": "iterable of batches"}[self.kind]

    def _epoch_iter(self) -> Iterable[dict[str, Any]]:
        if self.kind == "shards":
            return self.source
        if self.kind == "map":
            self.source.set_epoch(self.epoch)  # seeds the sampler with seed + epoch
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            return self.source
        for owner in (self.source, getattr(self.source, "dataset", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(self.epoch)
                break
        if self.world > 1 and not (isinstance(self.source, DataLoader)
                                   and isinstance(self.source.dataset, IterableDataset)):
            return self._round_robin(self.source)
        return self.source

    def _round_robin(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Batch i goes to rank i mod world; a trailing partial round is dropped so every rank steps alike."""
        round_: list[dict[str, Any]] = []
        for batch in source:
            round_.append(batch)
            if len(round_) == self.world:
                yield round_[self.rank]
                round_ = []

    def _open(self, skip: int) -> Iterator[dict[str, Any]]:
        if self.kind == "map" and skip:
            self.source.set_epoch(self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            return iter(self.accelerator.skip_first_batches(self.source, skip))
        it = iter(self._epoch_iter())
        for i in range(skip):  # re-read and drop what the checkpointed run had consumed
            try:
                dropped = next(it)
            except StopIteration:
                raise ValueError(f"cannot resume: epoch {self.epoch} of the {self.describe()} has {i} batches, "
                                 f"the checkpoint consumed {skip}; is this the same data?") from None
            if self.ledger is not None:
                self.ledger.record(dropped)  # re-read (and re-verified) like the rest of its shard
        return it

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch boundary per batch; an empty epoch means empty data
            try:
                batch = next(self._it)
            except StopIteration:
                if self.consumed == 0:
                    break
                self.epoch, self.consumed = self.epoch + 1, 0
                self._it = self._open(skip=0)
                continue
            self.consumed += 1
            if self.ledger is not None:
                self.ledger.record(batch)
            return batch
        raise ValueError(f"training data is empty: epoch {self.epoch} of the {self.describe()} yielded no batch"
                         + (f" for rank {self.rank} of {self.world}" if self.world > 1 else ""))
