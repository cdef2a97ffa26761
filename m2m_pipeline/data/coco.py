"""MSCOCO 2017 as sets of real images sharing one object category (Sec. 8.3, Figs. 5, 16, 17).

Layout read (the released one): `<coco_dir>/annotations/instances_<split>2017.json` and
`<coco_dir>/<split>2017/<file_name>`. Reading is bounded and checked before anything large is allocated:

- the annotation file's size is checked against `max_annotation_bytes` before it is read (instances_train2017.json
  is ~450 MB, instances_val2017.json ~20 MB), and it is read once and hashed from the same bytes (io.read_hashed);
- every field used is validated (images: id, file_name, width, height; annotations: image_id, category_id, area,
  iscrowd; categories: id, name); an error is one line naming the file, the list, the index and the field;
- an image's pixel count is checked from its header (PIL opens lazily: `.size` before `.load`) against
  `max_image_pixels` and against the annotation's width x height, before it is decoded.

Grouping rule (docs/evaluation.md, "MSCOCO zero-shot continuation"): an image belongs to the category of its
largest non-crowd instance by area (ties: the instance listed first); images with no non-crowd instance belong to
none. Per category, sets of `views` distinct images are drawn without replacement with `seed`; a category with
fewer than `views x sets_per_category` images is skipped (and reported); no image is in two sets.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m2m_pipeline.data.errors import MISDataError
from m2m_pipeline.io import atomic_write_bytes, read_hashed

if TYPE_CHECKING:  # torch is imported where images are decoded: settings validation imports this module
    import torch

COCO_SPLITS = ("train", "val")          # the 2017 splits with instance annotations (test2017 has none)
# instances_train2017.json is 448 MB; 1 GiB leaves room and still refuses a wrong file before json.loads
# (which needs several times the file's size in memory).
MAX_ANNOTATION_BYTES = 1 << 30
# COCO images are at most 640 px on the long side (~0.4 Mpx); 4096 x 4096 refuses a decompression bomb named
# like a COCO file long before PIL's own limit (~179 Mpx).
MAX_IMAGE_PIXELS = 4096 * 4096


class CocoError(MISDataError):
    """A COCO folder, annotation file or image that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class CocoSetsConfig:
    """How sets are drawn from one split (recorded in every report)."""

    views: int = 4                          # real images per set (Sec. 8.3: 4 preceding images)
    sets_per_category: int = 1              # sets drawn from each category
    max_sets: int | None = None             # at most this many sets in all (None: every eligible category)
    categories: tuple[str, ...] | None = None  # only these category names (None: all)
    seed: int = 0                           # draws the category order and each category's images
    max_annotation_bytes: int = MAX_ANNOTATION_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("views", "sets_per_category", "max_annotation_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"CocoSetsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_sets is not None and self.max_sets < 1:
            raise ValueError(f"CocoSetsConfig.max_sets must be >= 1 or None, got {self.max_sets}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = None if self.categories is None else list(self.categories)
        return d


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoIndex:
    """The validated parts of one instances file."""

    path: Path                              # the annotation file
    image_dir: Path                         # <coco_dir>/<split>2017
    sha256: str
    images: dict[int, CocoImage]
    categories: dict[int, str]              # id -> name
    # image id -> (category id, area) of its largest non-crowd instance (the grouping rule)
    largest: dict[int, tuple[int, float]] = field(repr=False)

    def groups(self) -> dict[int, list[int]]:
        """category id -> sorted ids of the images it owns (the grouping rule)."""
        out: dict[int, list[int]] = {c: [] for c in self.categories}
        for image_id, (category_id, _) in self.largest.items():
            out[category_id].append(image_id)
        return {c: sorted(ids) for c, ids in out.items()}


@dataclass(frozen=True)
class CocoSet:
    category_id: int
    category: str
    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"category_id": self.category_id, "category": self.category, "image_ids": list(self.image_ids),
                "file_names": list(self.file_names)}


@dataclass(frozen=True)
class CocoSets:
    index: CocoIndex
    sets: list[CocoSet]
    skipped: dict[str, int]                 # category name -> images it owns (fewer than needed)
    config: CocoSetsConfig

    def provenance(self) -> dict[str, Any]:
        return {"annotations": str(self.index.path), "annotations_sha256": self.index.sha256,
                "image_dir": str(self.index.image_dir), "config": self.config.to_dict(),
                "grouping": "largest non-crowd instance by area (ties: first listed)",
                "sets": [s.to_dict() for s in self.sets], "skipped_categories": self.skipped}


# ---------------------------------------------------------------------- reading and validation
def annotation_path(coco_dir: str | os.PathLike, split: str) -> Path:
    if split not in COCO_SPLITS:
        raise CocoError(f"COCO split {split!r}: choose one of {list(COCO_SPLITS)} (the 2017 splits with instances)")
    return Path(coco_dir) / "annotations" / f"instances_{split}2017.json"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(path: Path, where: str, i: int, record: Any, name: str, kind: str) -> Any:
    """record[name], checked: kind "int", "pos_int", "str", "number" (>= 0) or "flag" (0 / 1)."""
    if not isinstance(record, dict):
        raise CocoError(f"{path}: {where}[{i}]: expected an object, got {type(record).__name__}")
    if name not in record:
        raise CocoError(f"{path}: {where}[{i}].{name}: missing")
    v = record[name]
    ok = {"int": _is_int(v), "pos_int": _is_int(v) and v > 0, "str": isinstance(v, str) and v != "",
          "number": (_is_int(v) or isinstance(v, float)) and np.isfinite(v) and v >= 0,
          "flag": _is_int(v) and v in (0, 1)}[kind]
    if not ok:
        want = {"int": "an integer", "pos_int": "a positive integer", "str": "a non-empty string",
                "number": "a finite number >= 0", "flag": "0 or 1"}[kind]
        raise CocoError(f"{path}: {where}[{i}].{name}: expected {want}, got {v!r:.60}")
    return v


def read_instances(coco_dir: str | os.PathLike, split: str = "val",
                   max_bytes: int = MAX_ANNOTATION_BYTES) -> CocoIndex:
    """Validate `instances_<split>2017.json` and apply the grouping rule; see the module docstring."""
    path = annotation_path(coco_dir, split)
    if not path.is_file():
        raise CocoError(f"{path}: no COCO instances file (expected the COCO 2017 layout "
                        f"<coco_dir>/annotations/instances_<split>2017.json)")
    size = path.stat().st_size
    if size > max_bytes:
        raise CocoError(f"{path}: {size} bytes, over the cap of {max_bytes} (max_annotation_bytes)")
    data, digest = read_hashed(path, limit=max_bytes)
    if len(data) > max_bytes:  # grew after the check
        raise CocoError(f"{path}: over the cap of {max_bytes} bytes (max_annotation_bytes)")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise CocoError(f"{path}: not JSON ({exn})") from exn
    del data
    if not isinstance(doc, dict):
        raise CocoError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise CocoError(f"{path}: {key}: missing or not a list")
    categories: dict[int, str] = {}
    for i, c in enumerate(doc["categories"]):
        cid = _field(path, "categories", i, c, "id", "int")
        name = _field(path, "categories", i, c, "name", "str")
        if cid in categories:
            raise CocoError(f"{path}: categories[{i}].id: {cid} is listed twice")
        categories[cid] = name
    images: dict[int, CocoImage] = {}
    for i, im in enumerate(doc["images"]):
        iid = _field(path, "images", i, im, "id", "int")
        file_name = _field(path, "images", i, im, "file_name", "str")
        width = _field(path, "images", i, im, "width", "pos_int")
        height = _field(path, "images", i, im, "height", "pos_int")
        if iid in images:
            raise CocoError(f"{path}: images[{i}].id: {iid} is listed twice")
        if Path(file_name).name != file_name:  # a name, never a path out of the image folder
            raise CocoError(f"{path}: images[{i}].file_name: {file_name!r} is not a plain file name")
        images[iid] = CocoImage(iid, file_name, width, height)
    largest: dict[int, tuple[int, float]] = {}
    for i, a in enumerate(doc["annotations"]):
        iid = _field(path, "annotations", i, a, "image_id", "int")
        cid = _field(path, "annotations", i, a, "category_id", "int")
        area = float(_field(path, "annotations", i, a, "area", "number"))
        crowd = _field(path, "annotations", i, a, "iscrowd", "flag")
        if iid not in images:
            raise CocoError(f"{path}: annotations[{i}].image_id: {iid} is not in images")
        if cid not in categories:
            raise CocoError(f"{path}: annotations[{i}].category_id: {cid} is not in categories")
        if crowd:
            continue  # a crowd region is not one object
        if iid not in largest or area > largest[iid][1]:  # strict: ties keep the instance listed first
            largest[iid] = (cid, area)
    if not images:
        raise CocoError(f"{path}: images: empty")
    return CocoIndex(path, Path(coco_dir) / f"{split}2017", digest, images, categories, largest)


def draw_sets(index: CocoIndex, config: CocoSetsConfig = CocoSetsConfig()) -> CocoSets:
    """Sets of `views` images of one category each (module docstring). Order: categories in a seeded random
    order, round-robin (every eligible category's first set, then the second ones, ...), cut at max_sets."""
    names = {name: cid for cid, name in index.categories.items()}
    if config.categories is not None:
        unknown = sorted(set(config.categories) - set(names))
        if unknown:
            raise CocoError(f"{index.path}: category {unknown[0]!r} is not in categories; choose from "
                            f"{sorted(names)[:20]}{'...' if len(names) > 20 else ''}")
        wanted = [names[n] for n in config.categories]
    else:
        wanted = sorted(index.categories)
    groups = index.groups()
    need = config.views * config.sets_per_category
    rng = np.random.default_rng(config.seed)
    skipped = {index.categories[c]: len(groups[c]) for c in wanted if len(groups[c]) < need}
    eligible = [c for c in wanted if len(groups[c]) >= need]
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    per_category: dict[int, list[CocoSet]] = {}
    for cid in order:
        ids = np.asarray(groups[cid])
        picked = ids[rng.permutation(len(ids))[:need]].tolist()
        per_category[cid] = [
            CocoSet(cid, index.categories[cid], tuple(chunk),
                    tuple(index.images[i].file_name for i in chunk))
            for chunk in (tuple(picked[k * config.views:(k + 1) * config.views])
                          for k in range(config.sets_per_category))]
    sets = [per_category[cid][k] for k in range(config.sets_per_category) for cid in order]
    if config.max_sets is not None:
        sets = sets[:config.max_sets]
    if not sets:
        raise CocoError(f"{index.path}: no category owns {need} images ({config.views} views x "
                        f"{config.sets_per_category} sets); largest: "
                        f"{max((len(groups[c]) for c in wanted), default=0)} images")
    return CocoSets(index, sets, skipped, config)


def load_coco_sets(coco_dir: str | os.PathLike, split: str = "val",
                   config: CocoSetsConfig = CocoSetsConfig()) -> CocoSets:
    """read_instances + draw_sets: the sets of one split (no image decoded yet)."""
    return draw_sets(read_instances(coco_dir, split, config.max_annotation_bytes), config)


def load_image(path: Path, image: CocoImage, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """One image as (3, S, S) in [-1, 1]: the centred square of its short side, resized (bicubic, PIL's
    antialiasing) to S = image_size. The header's size is checked before the pixels are decoded."""
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    if image.width * image.height > max_pixels:
        raise CocoError(f"{path}: annotated {image.width}x{image.height} pixels, over the cap of {max_pixels} "
                        f"(max_image_pixels)")
    if not path.is_file():
        raise CocoError(f"{path}: image file missing (listed in the annotations as image {image.id})")
    try:
        with Image.open(path) as im:  # lazy: only the header is read here
            w, h = im.size
            if w * h > max_pixels:
                raise CocoError(f"{path}: {w}x{h} pixels, over the cap of {max_pixels} (max_image_pixels)")
            if (w, h) != (image.width, image.height):
                raise CocoError(f"{path}: {w}x{h} pixels, but the annotations say {image.width}x{image.height}")
            im.load()
            rgb = ImageOps.fit(im.convert("RGB"), (image_size, image_size), method=Image.BICUBIC)
    except CocoError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exn:
        raise CocoError(f"{path}: cannot decode image ({exn})") from exn
    x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1).clamp(-1, 1)


def load_set_images(sets: CocoSets, image_size: int) -> torch.Tensor:
    """(S, views, 3, image_size, image_size) in [-1, 1], in the order of `sets.sets`."""
    import torch

    index, cap = sets.index, sets.config.max_image_pixels
    return torch.stack([torch.stack([load_image(index.image_dir / index.images[i].file_name, index.images[i],
                                                image_size, cap) for i in s.image_ids]) for s in sets.sets])


# ---------------------------------------------------------------------- a COCO-format folder for tests and dry runs
# (COCO category id, name, scikit-image photograph the fixture's images of that category are crops of): photos
# that ship inside scikit-image's wheel, so the fixture needs no download.
FIXTURE_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "astronaut"), (17, "cat", "chelsea"), (47, "cup", "coffee"), (5, "airplane", "rocket"))


def write_coco_fixture(root: str | os.PathLike, split: str = "val", images_per_category: int = 5,
                       categories: Sequence[tuple[int, str, str]] = FIXTURE_CATEGORIES, seed: int = 0,
                       max_side: int = 96) -> Path:
    """A small folder in the COCO 2017 layout: per category, `images_per_category` JPEGs that are random crops
    of one scikit-image photograph (real-looking, no download), each annotated with the category as its largest
    non-crowd instance, a smaller instance of the next category, and a larger *crowd* region of the next
    category (which the grouping rule must ignore). Returns `root`."""
    from PIL import Image
    from skimage import data as skdata

    root = Path(root)
    path = annotation_path(root, split)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    cats = list(categories)
    for c_index, (cid, _, photo) in enumerate(cats):
        other = cats[(c_index + 1) % len(cats)][0]
        source = np.asarray(getattr(skdata, photo)())
        source = np.repeat(source[..., None], 3, -1) if source.ndim == 2 else source[..., :3]
        for k in range(images_per_category):
            image_id = cid * 1000 + k
            h0, w0 = source.shape[:2]
            ch, cw = int(h0 * rng.uniform(0.6, 1.0)), int(w0 * rng.uniform(0.6, 1.0))
            top, left = int(rng.integers(0, h0 - ch + 1)), int(rng.integers(0, w0 - cw + 1))
            crop = Image.fromarray(np.ascontiguousarray(source[top:top + ch, left:left + cw]))
            scale = max_side / max(ch, cw)
            crop = crop.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            name = f"{image_id:012d}.jpg"  # COCO's naming
            atomic_write_bytes(root / f"{split}2017" / name, buf.getvalue())
            w, h = crop.size
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            area = float(w * h)
            for share, category, crowd in ((0.5, cid, 0), (0.2, other, 0), (0.9, other, 1)):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "area": round(area * share, 2), "iscrowd": crowd,
                                    "bbox": [0.0, 0.0, float(w), float(h)]})
    doc = {"info": {"description": "m2m_pipeline COCO-format fixture (crops of scikit-image photographs)"},
           "images": images, "annotations": annotations,
           "categories": [{"id": cid, "name": name, "supercategory": name} for cid, name, _ in cats]}
    atomic_write_bytes(path, (json.dumps(doc) + "\n").encode())
    return root
