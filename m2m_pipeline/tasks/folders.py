"""The real task folders of the paper profile (Sec. 7.1.2): checking and indexing them, and writing fixtures in
their exact layouts.

- `objaverse_catalog` / `vgsi_catalog`: list and check a folder the readers read (`objaverse.py`, `vgsi.py`),
  write `index.json` (counts, a SHA-256 of the sorted item keys: the splits are a function of that list and
  the split seed) and `preview.png` (a few items, every view / step), and return the index.
- `write_objaverse_fixture` / `write_vgsi_fixture`: small folders in the layouts of Zero-1-to-3's Objaverse
  renders and of VGSI after download, with images that look like them (RGBA renders on a transparent
  background, 32-hex uids; 4:3 JPEG step photos listed by `index.json`), for the paper dry run and tests.
  The images are the stand-ins' renderers (`polyhedra.py`, `procedures.py`).

A library: no orchestration imports. docs/tasks.md ("The paper profile's task data").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2m_pipeline.io import atomic_directory, atomic_write_bytes, atomic_write_text
from m2m_pipeline.tasks.errors import TaskDataError
from m2m_pipeline.tasks.images import to_uint8
from m2m_pipeline.tasks.objaverse import (
    VIEWS_PER_OBJECT,
    check_object,
    list_objects,
    load_views,
)
from m2m_pipeline.tasks.vgsi import INDEX_NAME, list_procedures

PREVIEW_SIZE = 64          # px per preview tile
PREVIEW_ITEMS = 4          # objects / procedures shown in a preview
FIXTURE_JPEG_QUALITY = 90  # wikiHow step photos are JPEG
# Default fixture sizes: enough items for a test, a validation and a training item of one example each, plus
# one (the smallest split the fine-tune accepts), and as many steps as the paper preset's examples need
# (FinetuneConfig.preset("paper", "position").min_steps).
FIXTURE_ITEMS, FIXTURE_STEPS = 4, 8


def keys_digest(keys: list[str]) -> str:
    """SHA-256 of the sorted item keys, one per line: two folders with the same items give the same splits."""
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(keys)).encode()).hexdigest()


def _write_preview(rows: list[torch.Tensor], path: Path) -> Path:
    """Rows of (K, 3, S, S) images in [-1, 1] (K may differ per row) as one PNG, white gaps between tiles."""
    gap, side = 2, rows[0].shape[-1]
    width = max(r.shape[0] for r in rows) * (side + gap) - gap
    canvas = np.full((len(rows) * (side + gap) - gap, width, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        tiles = to_uint8(((row.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())  # (K, S, S, 3)
        for j, tile in enumerate(tiles):
            y, x = i * (side + gap), j * (side + gap)
            canvas[y:y + side, x:x + side] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------- checking and indexing
def objaverse_catalog(root: str | os.PathLike, out_dir: str | os.PathLike,
                      views_per_object: int = VIEWS_PER_OBJECT, preview_items: int = PREVIEW_ITEMS,
                      preview_size: int = PREVIEW_SIZE) -> dict[str, Any]:
    """Check every object folder of `root` (each view's NNN.png and NNN.npy present; the preview objects'
    images and poses fully read), then write `out_dir/index.json` and `out_dir/preview.png`. An empty folder or
    a missing file raises TaskDataError naming it."""
    root, out = Path(root), Path(out_dir)
    uids = list_objects(root)
    for uid in uids:
        check_object(root / uid, views_per_object)
    shown = uids[:preview_items]
    rows = [load_views(root / uid, range(views_per_object), preview_size)[0] for uid in shown]
    index = {"layout": "objaverse (Zero-1-to-3 renders)", "root": str(root), "objects": len(uids),
             "views_per_object": views_per_object, "keys_sha256": keys_digest(uids), "preview": shown}
    atomic_write_text(out / "index.json", [json.dumps(index, indent=1)])
    _write_preview(rows, out / "preview.png")
    return {**index, "files": {"index": out / "index.json", "preview": out / "preview.png"}}


def vgsi_catalog(root: str | os.PathLike, out_dir: str | os.PathLike, min_steps: int = 1,
                 preview_items: int = PREVIEW_ITEMS, preview_size: int = PREVIEW_SIZE) -> dict[str, Any]:
    """List every procedure of `root` (index.json or folders; every listed file must exist), count those with at
    least `min_steps` step images (the ones fine-tuning and evaluation use: FinetuneConfig.min_steps), read the
    preview procedures' images, then write `out_dir/index.json` and `out_dir/preview.png`. None usable raises."""
    from m2m_pipeline.tasks.images import load_image

    root, out = Path(root), Path(out_dir)
    procedures = list_procedures(root)
    usable = [p for p in procedures if len(p.steps) >= min_steps]
    if not usable:
        raise TaskDataError(root, f"no procedure has {min_steps} or more step images "
                                  f"({len(procedures)} procedures found)")
    shown = usable[:preview_items]
    rows = [torch.stack([load_image(path, preview_size) for path in p.steps]) for p in shown]
    lengths = Counter(len(p.steps) for p in procedures)
    index = {"layout": "vgsi (" + ("index.json" if (root / INDEX_NAME).is_file() else "folders") + ")",
             "root": str(root), "procedures": len(procedures), "usable": len(usable), "min_steps": min_steps,
             "skipped_short": len(procedures) - len(usable), "articles": len({p.article for p in procedures}),
             "steps_histogram": {str(k): lengths[k] for k in sorted(lengths)},
             "keys_sha256": keys_digest([p.key for p in usable]), "preview": [p.key for p in shown]}
    atomic_write_text(out / "index.json", [json.dumps(index, indent=1)])
    _write_preview(rows, out / "preview.png")
    return {**index, "files": {"index": out / "index.json", "preview": out / "preview.png"}}


# ---------------------------------------------------------------------- fixtures in the real layouts
def fixture_uid(seed: int, index: int) -> str:
    """An Objaverse-style uid (32 hex digits), a function of (seed, index)."""
    return hashlib.sha256(f"objaverse-fixture/{seed}/{index}".encode()).hexdigest()[:32]


def write_objaverse_fixture(root: str | os.PathLike, objects: int = FIXTURE_ITEMS, views: int = VIEWS_PER_OBJECT,
                            image_size: int = 256, seed: int = 0) -> list[str]:
    """`objects` objects in Zero-1-to-3's layout under `root`: `<uid>/NNN.png` (RGBA on a transparent
    background, `image_size` px: Zero-1-to-3 renders 256) and `<uid>/NNN.npy` ((3, 4) float32 world-to-camera),
    `views` views each (the reader wants VIEWS_PER_OBJECT = 12; fewer makes a folder it refuses). Coloured convex
    polyhedra on a camera orbit (polyhedra.py). Returns the uids; existing objects are kept."""
    from m2m_pipeline.tasks.polyhedra import RenderSettings, write_object

    if objects < 1 or views < 1 or image_size < 8:
        raise ValueError(f"write_objaverse_fixture: objects and views must be >= 1 and image_size >= 8, got "
                         f"{objects}, {views}, {image_size}")
    # 4x4 supersampling is 16 samples a pixel; at 256 px and above 2x2 is as smooth and 4x faster
    settings = RenderSettings(image_size=image_size, n_views=views, supersample=4 if image_size < 128 else 2)
    return [write_object(root, i, seed, settings, uid=fixture_uid(seed, i)).name for i in range(objects)]


def write_vgsi_fixture(root: str | os.PathLike, procedures: int = FIXTURE_ITEMS, steps: int = FIXTURE_STEPS,
                       image_size: int = 256,
                       seed: int = 0) -> list[str]:
    """`procedures` procedures in the VGSI index layout under `root`: `images/<article>/<method>/step_KK.jpg`
    (4:3 JPEG photos, `image_size` px high, as wikiHow's; the reader centre-crops them back to the square
    picture) listed in step order by `root/index.json` ({article: {method: [paths]}}, two methods for every
    third article). Each procedure has `steps` steps of one change that progresses (procedures.py: a bar
    grows, a wedge fills, a disc moves). Returns the keys "article/method"."""
    from m2m_pipeline.tasks.procedures import make_procedure, render_step

    if procedures < 1 or steps < 2 or image_size < 8:
        raise ValueError(f"write_vgsi_fixture: procedures must be >= 1, steps >= 2 and image_size >= 8, got "
                         f"{procedures}, {steps}, {image_size}")
    root = Path(root)
    width = round(image_size * 4 / 3)
    pad = (width - image_size) // 2
    index: dict[str, dict[str, list[str]]] = {}
    n, article_no = 0, 0
    while n < procedures:
        article = f"How_to_Do_Task_{article_no:05d}"
        methods = min(2 if article_no % 3 == 2 else 1, procedures - n)
        folder = root / "images" / article
        if not folder.exists():
            with atomic_directory(folder) as tmp:
                for m in range(methods):
                    meta = make_procedure(np.random.default_rng([seed, n + m]))
                    (tmp / f"Method_{m + 1}").mkdir()
                    for k in range(steps):
                        square = to_uint8(render_step(meta, k / (steps - 1), image_size, supersample=2))
                        photo = np.empty((image_size, width, 3), np.uint8)
                        photo[:] = to_uint8(np.asarray(meta["bg"]))  # the scene's background fills the 4:3 frame
                        photo[:, pad:pad + image_size] = square
                        Image.fromarray(photo).save(tmp / f"Method_{m + 1}" / f"step_{k + 1}.jpg",
                                                    quality=FIXTURE_JPEG_QUALITY)
        index[article] = {f"Method_{m + 1}": [f"images/{article}/Method_{m + 1}/step_{k + 1}.jpg"
                                              for k in range(steps)] for m in range(methods)}
        n, article_no = n + methods, article_no + 1
    atomic_write_text(root / INDEX_NAME, [json.dumps(index, indent=1)])
    return [f"{a}/{m}" for a, methods in index.items() for m in methods]
