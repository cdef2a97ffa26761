"""Batches of task examples: (B, N, ...) tensors, the training batch dict of `training.py`."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from m2m_pipeline.data.loader import collate_examples  # stacks tensors, keeps keys/attributes as lists


def make_task_loader(dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                     num_workers: int = 0, drop_last: bool = True) -> DataLoader:
    """DataLoader of {"latents": (B, N, 3, S, S), "task_cond": (B, N, ...), ...}.

    The shuffle uses its own seeded generator, so the example order is a function of `seed` (and
    the dataset's own epoch) alone. Multi-process training should pass a DistributedSampler instead.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_examples, drop_last=drop_last, generator=generator)
