"""Reader for VGSI / wikiHow step images, for visual procedure generation fine-tuning.

A procedure is one method of one article: its step images in order. Two layouts are accepted:

1. Folders: `<root>/<article>/<method>/<name>.(png|jpg|jpeg|webp)`, ordered by the last integer in
   the file name (`step_2.jpg` before `step_10.jpg`; `03.png` works too). Other files are ignored.
2. An index, used whenever `<root>/index.json` exists:
   `{"<article>": {"<method>": ["relative/or/absolute/path.jpg", ...]}}` with paths in step order
   (relative to root). This fits VGSI's own JSON after one conversion pass.

A step's position is its index among the procedure's images (0, 1, 2, ...): a step without an image
is absent from the data, so "consecutive" means consecutive images.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m2m_pipeline.tasks.errors import TaskDataError
from m2m_pipeline.tasks.images import IMAGE_SUFFIXES, load_image

INDEX_NAME = "index.json"
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Procedure:
    """One method of one article: its step images in order."""

    article: str
    method: str
    steps: tuple[Path, ...]

    @property
    def key(self) -> str:
        return f"{self.article}/{self.method}"


def step_number(path: Path) -> int:
    """The last integer in the file name's stem; the file is named in the error when there is none."""
    numbers = _NUMBER.findall(path.stem)
    if not numbers:
        raise TaskDataError(path, "step image name has no step number (expected e.g. step_03.jpg)")
    return int(numbers[-1])


def _method_steps(folder: Path) -> tuple[Path, ...]:
    images = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    numbered = sorted((step_number(p), p) for p in images)
    for (n_a, a), (n_b, b) in pairwise(numbered):
        if n_a == n_b:
            raise TaskDataError(b, f"step number {n_b} also used by {a.name}: step order is ambiguous")
    return tuple(p for _, p in numbered)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folders(root: Path) -> list[Procedure]:
    return [Procedure(article.name, method.name, _method_steps(method))
            for article in _visible_dirs(root) for method in _visible_dirs(article)]


def read_index(root: Path) -> list[Procedure]:
    """Procedures listed by `<root>/index.json`; every listed file must exist."""
    path = root / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TaskDataError(path, f"cannot read index: {error}") from error
    if not isinstance(index, dict):
        raise TaskDataError(path, "index must be {article: {method: [image paths in step order]}}")
    procedures = []
    for article, methods in index.items():
        if not isinstance(methods, dict) or not all(
                isinstance(steps, list) and all(isinstance(s, str) for s in steps) for steps in methods.values()):
            raise TaskDataError(path, f"article {article!r}: expected {{method: [image paths in step order]}}")
        for method, steps in methods.items():
            files = tuple(root / s for s in steps)  # an absolute s stays absolute
            for file in files:
                if not file.is_file():
                    raise TaskDataError(file, f"listed in {path} ({article}/{method}) but missing")
            procedures.append(Procedure(article, method, files))
    return procedures


def list_procedures(root: str | os.PathLike) -> list[Procedure]:
    """Every procedure under root, from index.json when present, else from the folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(root, "VGSI root is not a directory")
    return read_index(root) if (root / INDEX_NAME).is_file() else scan_folders(root)


class ProcedureSteps(Dataset):
    """Examples of N consecutive steps of one procedure, from a random start seeded by (seed, epoch, index).

    An item is {"key": "article/method", "steps": (N,) step positions as long, "latents":
    (N, 3, S, S) images in [-1, 1], "task_cond": (N,) float positions for M2MConfig(task="position")}.
    Positions are absolute (step 0 is the procedure's first image) unless `relative_positions`, which
    subtracts the example's first position. Procedures with fewer than N steps are skipped and counted
    in `skipped`; none left is an error.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        n_steps: int = 5,                  # consecutive steps per example (context + targets)
        image_size: int = 32,              # output side, px
        seed: int = 0,
        relative_positions: bool = False,  # positions counted from the example's first step
    ):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.root = Path(root)
        procedures = list_procedures(self.root)
        self.procedures = [p for p in procedures if len(p.steps) >= n_steps]
        self.skipped = len(procedures) - len(self.procedures)
        if not self.procedures:
            raise TaskDataError(self.root, f"no procedure has {n_steps} or more step images "
                                           f"({len(procedures)} procedures found)")
        self.n_steps = n_steps
        self.image_size = image_size
        self.seed = seed
        self.relative_positions = relative_positions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new start steps."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.procedures)

    def draw_start(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(len(self.procedures[index].steps) - self.n_steps + 1))

    def __getitem__(self, index: int) -> dict[str, Any]:
        procedure = self.procedures[index]
        start = self.draw_start(index)
        steps = torch.arange(start, start + self.n_steps)
        images = torch.stack([load_image(procedure.steps[int(i)], self.image_size) for i in steps])
        positions = (steps - start if self.relative_positions else steps).float()
        return {
            "key": procedure.key,
            "steps": steps,            # (N,)
            "latents": images,         # (N, 3, S, S)
            "task_cond": positions,    # (N,)
        }
