"""Reader for Objaverse renders in the Zero-1-to-3 layout, for novel view synthesis fine-tuning.

Layout (one folder per object):
    <root>/<uid>/000.png ... 011.png   RGBA (or RGB) renders; transparent background -> white
    <root>/<uid>/000.npy ... 011.npy   (3, 4) world-to-camera [R | t] of the same view
Other files in an object folder are ignored. `polyhedra.py` writes the same layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m2m_pipeline.tasks.cameras import camera_condition
from m2m_pipeline.tasks.errors import TaskDataError
from m2m_pipeline.tasks.images import load_image

VIEWS_PER_OBJECT = 12  # Zero-1-to-3 renders 12 views per object (Sec. 7.1.2)


def list_objects(root: str | os.PathLike) -> list[str]:
    """Sorted uids (sub-folders of root); hidden and temp folders (".name.tmp") are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(root, "Objaverse root is not a directory")
    uids = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not uids:
        raise TaskDataError(root, "no object folders")
    return uids


def check_object(folder: str | os.PathLike, n_views: int = VIEWS_PER_OBJECT) -> None:
    """Every view must have its .png and .npy: raise naming the first file that is missing."""
    folder = Path(folder)
    for view in range(n_views):
        for suffix in (".png", ".npy"):
            path = folder / f"{view:03d}{suffix}"
            if not path.is_file():
                raise TaskDataError(path, f"missing (each object needs {n_views} views as NNN.png + NNN.npy)")


def load_pose(path: str | os.PathLike) -> np.ndarray:
    """A (3, 4) world-to-camera matrix from .npy; (4, 4) with bottom row [0 0 0 1] is accepted too."""
    try:
        pose = np.load(path, allow_pickle=False)  # never unpickle data files
    except (OSError, ValueError, EOFError) as error:
        raise TaskDataError(path, f"cannot read camera matrix: {error}") from error
    if pose.shape == (4, 4) and np.allclose(pose[3], [0, 0, 0, 1]):
        pose = pose[:3]
    if pose.shape != (3, 4):
        raise TaskDataError(path, f"camera matrix must be 3x4 world-to-camera, got shape {pose.shape}")
    pose = pose.astype(np.float64)
    if not np.isfinite(pose).all():
        raise TaskDataError(path, "camera matrix has non-finite values")
    rotation = pose[:, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3) or np.linalg.det(rotation) < 0:
        raise TaskDataError(path, "camera matrix's 3x3 part is not a rotation (expected world-to-camera [R | t])")
    return pose


def load_views(folder: str | os.PathLike, views: Sequence[int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) in [-1, 1] and world-to-camera (N, 3, 4) float64 of the given views."""
    folder = Path(folder)
    images = torch.stack([load_image(folder / f"{v:03d}.png", image_size) for v in views])
    w2c = torch.from_numpy(np.stack([load_pose(folder / f"{v:03d}.npy") for v in views]))
    return images, w2c


class ObjaverseViews(Dataset):
    """Examples of N views of one object: a random subset in random order, seeded by (seed, epoch, index).

    An item is {"key": uid, "views": (N,) view numbers, "latents": (N, 3, S, S) images in [-1, 1]
    (pixel presets train on images directly), "w2c": (N, 3, 4), "task_cond": (N, 12)} where task_cond
    is every view's extrinsic relative to the first view of the example (docs/tasks.md "Novel view synthesis"). Map-style
    so a DistributedSampler splits it and a resumed run re-draws exactly the same examples.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        n_views: int = 5,                       # views per example (context + targets)
        image_size: int = 32,                   # output side, px
        seed: int = 0,
        uids: Sequence[str] | None = None,      # a split (e.g. held-out objects); default every folder
        views_per_object: int = VIEWS_PER_OBJECT,
        check_files: bool = True,               # list every object's files now: fail before training starts
    ):
        if not 1 <= n_views <= views_per_object:
            raise ValueError(f"n_views must be in 1..{views_per_object}, got {n_views}")
        self.root = Path(root)
        self.uids = list(uids) if uids is not None else list_objects(self.root)
        self.n_views = n_views
        self.image_size = image_size
        self.seed = seed
        self.views_per_object = views_per_object
        self.epoch = 0
        if check_files:
            for uid in self.uids:
                check_object(self.root / uid, views_per_object)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new view subsets of the same objects."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.uids)

    def draw_views(self, index: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return rng.permutation(self.views_per_object)[: self.n_views].tolist()

    def __getitem__(self, index: int) -> dict[str, Any]:
        uid = self.uids[index]
        views = self.draw_views(index)
        images, w2c = load_views(self.root / uid, views, self.image_size)
        return {
            "key": uid,
            "views": torch.tensor(views, dtype=torch.long),   # (N,)
            "latents": images,                                # (N, 3, S, S)
            "w2c": w2c.float(),                               # (N, 3, 4)
            "task_cond": camera_condition(w2c).float(),       # (N, 12), relative in float64 first
        }


def split_uids(uids: Sequence[str], held_out: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out) object split, seeded; `held_out` is a fraction (< 1) or a count."""
    count = round(held_out * len(uids)) if isinstance(held_out, float) and held_out < 1 else int(held_out)
    if not 0 < count < len(uids):
        raise ValueError(f"held_out={held_out} leaves no train or no held-out objects out of {len(uids)}")
    order = np.random.default_rng(seed).permutation(len(uids))
    held = {uids[i] for i in order[:count]}
    return [u for u in uids if u not in held], [u for u in uids if u in held]
