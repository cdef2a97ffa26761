"""Procedural stand-in for Objaverse renders: coloured convex polyhedra seen from 12 known cameras.

Written in the Zero-1-to-3 layout that `objaverse.py` reads (`<root>/<uid>/NNN.png` RGBA on a
transparent background + `NNN.npy` 3x4 world-to-camera), so the reader, the fine-tuning and the
evaluation run unchanged on real renders, and every held-out view has its ground truth.
`<uid>/object.json` adds what the renderer knows (shape, face colours, cameras); the reader ignores it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from m2m_pipeline.io import atomic_directory
from m2m_pipeline.tasks.cameras import orbit_w2c, random_rigid
from m2m_pipeline.tasks.images import to_uint8

# Faces as vertex-index polygons; winding is fixed at build time (outward normals), so order is free.
SOLIDS: dict[str, tuple[np.ndarray, tuple[tuple[int, ...], ...]]] = {
    "tetrahedron": (np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float),
                    ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3))),
    "cube": (np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float),
             ((0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5))),
    "octahedron": (np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float),
                   tuple((a, b, c) for a in (0, 1) for b in (2, 3) for c in (4, 5))),
    "pyramid": (np.array([[1, 1, -0.7], [1, -1, -0.7], [-1, -1, -0.7], [-1, 1, -0.7], [0, 0, 1.2]], float),
                ((0, 1, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4))),
    "prism": (np.array([[1, 0, -1], [-0.5, 0.866, -1], [-0.5, -0.866, -1],
                        [1, 0, 1], [-0.5, 0.866, 1], [-0.5, -0.866, 1]], float),
              ((0, 1, 2), (3, 4, 5), (0, 1, 4, 3), (1, 2, 5, 4), (2, 0, 3, 5))),
}
# Distinct saturated colours (0..1): neighbouring faces stay distinguishable after shading at 32 px.
PALETTE: np.ndarray = np.array([
    (0.90, 0.15, 0.15), (0.15, 0.75, 0.25), (0.20, 0.35, 0.95), (0.95, 0.85, 0.15), (0.85, 0.20, 0.85),
    (0.15, 0.85, 0.90), (0.98, 0.55, 0.10), (0.55, 0.30, 0.10), (0.45, 0.45, 0.50), (0.10, 0.10, 0.12),
])
LIGHT_DIR = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])  # fixed in the world: shading is view-consistent
AMBIENT = 0.55                                                            # share of light that ignores orientation


@dataclass(frozen=True)
class RenderSettings:
    """Camera rig shared by every object; Zero-1-to-3-like: an orbit around a unit-scale object."""

    image_size: int = 32                          # output side, px
    supersample: int = 4                          # rendered at image_size * supersample, box-filtered down (anti-aliasing)
    n_views: int = 12                             # views per object, as Objaverse renders
    elevations_deg: tuple[float, ...] = (20.0,)   # cycled over the views; one ring by default
    radius: float = 2.0                           # camera distance from the object centre, world units
    fov_deg: float = 49.1                         # vertical = horizontal field of view (35 mm lens, 32 mm sensor)
    object_radius: float = 0.6                    # circumradius of every object: fits the view at this radius/fov


@dataclass(frozen=True)
class Polyhedron:
    """One object: world-space triangles and a colour per triangle, plus what generated them."""

    shape: str
    vertices: np.ndarray        # (V, 3) world coordinates
    triangles: np.ndarray       # (T, 3) vertex indices, counter-clockwise seen from outside
    face_of_triangle: np.ndarray  # (T,) polygon face index
    face_colours: np.ndarray    # (F, 3) in [0, 1]


def make_polyhedron(rng: np.random.Generator, object_radius: float = 0.6) -> Polyhedron:
    """A random solid with a distinct palette colour per face, in a random world orientation."""
    shape = list(SOLIDS)[rng.integers(len(SOLIDS))]
    base, polygons = SOLIDS[shape]
    vertices = base - base.mean(axis=0)
    vertices *= object_radius / np.linalg.norm(vertices, axis=1).max()
    pose = random_rigid(rng, max_translation=0.0)  # random orientation: the world frame carries no meaning
    vertices = vertices @ pose[:, :3].T
    triangles, faces = [], []
    for face, polygon in enumerate(polygons):
        for k in range(1, len(polygon) - 1):  # fan triangulation: the polygons are convex
            a, b, c = polygon[0], polygon[k], polygon[k + 1]
            normal = np.cross(vertices[b] - vertices[a], vertices[c] - vertices[a])
            if normal @ vertices[[a, b, c]].mean(axis=0) < 0:  # centred convex solid: outward = away from 0
                b, c = c, b
            triangles.append((a, b, c))
            faces.append(face)
    colours = PALETTE[rng.choice(len(PALETTE), size=len(polygons), replace=False)]
    return Polyhedron(shape, vertices, np.array(triangles), np.array(faces), colours)


def render(poly: Polyhedron, w2c: np.ndarray, settings: RenderSettings = RenderSettings()) -> np.ndarray:
    """Flat-shaded RGBA (H, W, 4) float in [0, 1], straight (not premultiplied) alpha.

    The solids are convex, so back-face culling alone resolves visibility exactly (front faces never
    overlap): no depth buffer. Coverage at `supersample`^2 samples per pixel gives anti-aliased edges.
    """
    s = settings.image_size * settings.supersample
    cam = poly.vertices @ w2c[:, :3].T + w2c[:, 3]         # (V, 3) camera coordinates, -z forward
    depth = -cam[:, 2]
    if (depth <= 1e-6).any():
        raise ValueError("object crosses the camera plane; increase RenderSettings.radius")
    focal = 0.5 * s / math.tan(math.radians(settings.fov_deg) / 2)
    px = np.stack([focal * cam[:, 0] / depth + s / 2, -focal * cam[:, 1] / depth + s / 2], axis=1)  # (V, 2), y down
    centres = np.arange(s) + 0.5
    gx, gy = np.meshgrid(centres, centres)                  # (s, s) sample positions
    premultiplied = np.zeros((s, s, 4))
    for tri, face in zip(poly.triangles, poly.face_of_triangle):
        a, b, c = cam[tri]
        normal = np.cross(b - a, c - a)
        if normal @ a >= 0:                                 # faces away from the camera (camera at origin)
            continue
        world_normal = np.cross(*(poly.vertices[tri[1:]] - poly.vertices[tri[0]]))
        shade = AMBIENT + (1 - AMBIENT) * max(0.0, world_normal @ LIGHT_DIR / np.linalg.norm(world_normal))
        p0, p1, p2 = px[tri]
        x0, y0 = np.floor(np.minimum(np.minimum(p0, p1), p2)).astype(int).clip(0, s)
        x1, y1 = np.ceil(np.maximum(np.maximum(p0, p1), p2)).astype(int).clip(0, s)
        x, y = gx[y0:y1, x0:x1], gy[y0:y1, x0:x1]
        # Edge functions; a front face is clockwise on screen (y down) so all three are <= 0 inside.
        e0 = (p1[0] - p0[0]) * (y - p0[1]) - (p1[1] - p0[1]) * (x - p0[0])
        e1 = (p2[0] - p1[0]) * (y - p1[1]) - (p2[1] - p1[1]) * (x - p1[0])
        e2 = (p0[0] - p2[0]) * (y - p2[1]) - (p0[1] - p2[1]) * (x - p2[0])
        inside = ((e0 <= 0) & (e1 <= 0) & (e2 <= 0)) | ((e0 >= 0) & (e1 >= 0) & (e2 >= 0))
        premultiplied[y0:y1, x0:x1][inside] = (*(poly.face_colours[face] * shade), 1.0)
    n, k = settings.image_size, settings.supersample
    pooled = premultiplied.reshape(n, k, n, k, 4).mean(axis=(1, 3))
    alpha = pooled[..., 3:]
    rgb = np.divide(pooled[..., :3], alpha, out=np.zeros_like(pooled[..., :3]), where=alpha > 0)
    return np.concatenate([rgb, alpha], axis=-1)


def object_cameras(rng: np.random.Generator, settings: RenderSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuths, elevations (degrees) and (V, 3, 4) world-to-camera: 360/V apart from a random offset."""
    offset = rng.uniform(0.0, 360.0)
    azimuths = (offset + 360.0 / settings.n_views * np.arange(settings.n_views)) % 360.0
    elevations = np.resize(np.array(settings.elevations_deg, float), settings.n_views)
    return azimuths, elevations, orbit_w2c(azimuths, elevations, settings.radius)


def object_uid(index: int) -> str:
    return f"poly_{index:06d}"


def write_object(root: str | os.PathLike, index: int, seed: int = 0,
                 settings: RenderSettings = RenderSettings(), overwrite: bool = False, uid: str | None = None) -> Path:
    """Render object `index` into `<root>/<uid>/` (default uid `object_uid(index)`); a function of (seed, index)
    only, so any subset can be (re)written in any order or process. The folder appears whole (renamed from a
    temp dir)."""
    root = Path(root)
    final = root / (uid or object_uid(index))
    if final.exists() and not overwrite:
        return final
    rng = np.random.default_rng([seed, index])
    poly = make_polyhedron(rng, settings.object_radius)
    azimuths, elevations, w2c = object_cameras(rng, settings)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(final) as tmp:
        for view in range(settings.n_views):
            Image.fromarray(to_uint8(render(poly, w2c[view], settings))).save(tmp / f"{view:03d}.png")
            np.save(tmp / f"{view:03d}.npy", w2c[view].astype(np.float32))
        meta = {"shape": poly.shape, "face_colours": poly.face_colours.tolist(),
                "azimuths_deg": azimuths.tolist(), "elevations_deg": elevations.tolist(),
                "seed": seed, "index": index, "settings": asdict(settings)}
        (tmp / "object.json").write_text(json.dumps(meta, indent=1))
    return final


def write_polyhedra(root: str | os.PathLike, n_objects: int, seed: int = 0,
                    settings: RenderSettings = RenderSettings(), overwrite: bool = False,
                    start: int = 0) -> list[str]:
    """Write objects start..start+n_objects-1 under `root`; returns their uids. Existing objects are kept
    (resumable) unless `overwrite`."""
    return [write_object(root, i, seed, settings, overwrite).name for i in range(start, start + n_objects)]
