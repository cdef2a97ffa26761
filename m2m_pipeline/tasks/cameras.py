"""Camera poses for novel view synthesis: relative extrinsics (docs/tasks.md "Novel view synthesis") and orbit cameras.

Convention: a pose is a 3x4 world-to-camera matrix [R | t] (x_cam = R x_world + t), as Zero-1-to-3's
Objaverse renders store it. Camera axes follow Blender / OpenGL (x right, y up, the camera looks down
-z), which is what their renderer writes. Relative poses only ever combine matrices of one dataset,
so any other convention works as long as it is used consistently.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CAMERA_COND_DIM = 12  # flattened 3x4 relative extrinsic, row-major: the width of M2MConfig(task="camera")


def invert_rigid(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (..., 3, 4) [R | t]: [R^T | -R^T t]. Exact for rotations, unlike a general inverse."""
    r, t = pose[..., :3], pose[..., 3:]
    r_t = r.transpose(-1, -2)
    return torch.cat([r_t, -r_t @ t], dim=-1)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ∘ b for (..., 3, 4) rigid maps: x -> a(b(x))."""
    return torch.cat([a[..., :3] @ b[..., :3], a[..., :3] @ b[..., 3:] + a[..., 3:]], dim=-1)


def relative_extrinsics(w2c: torch.Tensor, reference: int = 0) -> torch.Tensor:
    """Express every pose of a set relative to one reference view: T_i ∘ T_ref^-1.

    w2c: (..., N, 3, 4) world-to-camera matrices; returns (..., N, 3, 4) maps from the reference
    camera's frame to camera i's frame; the reference becomes [I | 0].
    Why: a rigid change of the object's world frame, x' = G x, turns every T_i into T_i G^-1, and
    T_i G^-1 (T_ref G^-1)^-1 = T_i T_ref^-1. Objaverse objects have arbitrary world frames, so the
    model sees only what it can learn from: where each camera is relative to the first image.
    Not invariant to a change of world *scale* (translations scale); Objaverse renders normalise
    every object to a unit box, and the stand-in uses a fixed orbit radius.
    """
    if w2c.shape[-2:] != (3, 4):
        raise ValueError(f"w2c must be (..., N, 3, 4), got {tuple(w2c.shape)}")
    ref_inv = invert_rigid(w2c[..., reference:reference + 1, :, :])  # (..., 1, 3, 4)
    return compose(w2c, ref_inv.expand_as(w2c))


def flatten_extrinsics(pose: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) -> (..., 12), row-major: the camera task condition `task_cond`."""
    return pose.reshape(*pose.shape[:-2], CAMERA_COND_DIM)


def camera_condition(w2c: torch.Tensor) -> torch.Tensor:
    """(..., N, 3, 4) world-to-camera -> (..., N, 12) relative to the first view: ready for task_cond."""
    return flatten_extrinsics(relative_extrinsics(w2c, reference=0))


def look_at_w2c(eye: np.ndarray, target: np.ndarray | None = None, up: np.ndarray | None = None) -> np.ndarray:
    """World-to-camera (3, 4) of a camera at `eye` looking at `target` (Blender/OpenGL axes, -z forward)."""
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64)
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)  # Blender: z up
    eye = np.asarray(eye, dtype=np.float64)
    back = eye - target
    back /= np.linalg.norm(back)                      # camera +z points away from the target
    right = np.cross(up, back)
    if np.linalg.norm(right) < 1e-8:                  # looking straight along `up`: any right works
        right = np.cross(np.array([0.0, 1.0, 0.0]), back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    rotation = np.stack([right, cam_up, back])        # rows: camera axes in world coordinates
    return np.concatenate([rotation, -rotation @ eye[:, None]], axis=1)


def orbit_w2c(azimuths_deg: np.ndarray, elevations_deg: np.ndarray, radius: float) -> np.ndarray:
    """(V,) azimuths and elevations (degrees) on a sphere around the origin -> (V, 3, 4) world-to-camera."""
    poses = []
    for azimuth, elevation in zip(np.radians(azimuths_deg), np.radians(elevations_deg)):
        eye = radius * np.array([math.cos(elevation) * math.cos(azimuth),
                                 math.cos(elevation) * math.sin(azimuth),
                                 math.sin(elevation)])
        poses.append(look_at_w2c(eye))
    return np.stack(poses)


def random_rigid(rng: np.random.Generator, max_translation: float = 1.0) -> np.ndarray:
    """A uniformly random rotation (QR of a Gaussian matrix, sign-fixed) plus a translation: (3, 4)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))  # makes the distribution uniform (Haar)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]       # a reflection is not a rigid motion
    t = rng.uniform(-max_translation, max_translation, size=(3, 1))
    return np.concatenate([q, t], axis=1)
