import numpy as np
import pytest
import torch

from m2m_pipeline.tasks.cameras import (
    camera_condition,
    compose,
    invert_rigid,
    orbit_w2c,
    random_rigid,
    relative_extrinsics,
)


def _world_change(w2c: torch.Tensor, g: np.ndarray) -> torch.Tensor:
    """Poses of the same cameras after moving the world by x' = G x: T_i' = T_i G^-1."""
    g_inv = invert_rigid(torch.from_numpy(g))
    return compose(w2c, g_inv.expand_as(w2c))


def test_reference_is_identity_and_shapes():
    w2c = torch.from_numpy(orbit_w2c(np.arange(0, 360, 30.0), np.full(12, 20.0), radius=2.0))
    rel = relative_extrinsics(w2c)
    assert rel.shape == (12, 3, 4)
    torch.testing.assert_close(rel[0], torch.eye(3, 4, dtype=torch.float64))
    assert camera_condition(w2c[None]).shape == (1, 12, 12)


@pytest.mark.parametrize("seed", range(5))
def test_relative_poses_invariant_to_world_frame(seed):
    rng = np.random.default_rng(seed)
    w2c = torch.from_numpy(np.stack([random_rigid(rng, 2.0) for _ in range(5)]))  # arbitrary cameras
    moved = _world_change(w2c, random_rigid(rng, 3.0))
    assert not torch.allclose(moved, w2c, atol=1e-3)  # the absolute poses did change
    torch.testing.assert_close(relative_extrinsics(moved), relative_extrinsics(w2c), atol=1e-12, rtol=0)


def test_relative_pose_maps_reference_camera_to_target_camera():
    rng = np.random.default_rng(0)
    w2c = torch.from_numpy(np.stack([random_rigid(rng) for _ in range(3)]))
    x_world = torch.randn(3, dtype=torch.float64)
    x_ref = w2c[0, :, :3] @ x_world + w2c[0, :, 3]
    rel = relative_extrinsics(w2c)
    for i in range(3):
        torch.testing.assert_close(rel[i, :, :3] @ x_ref + rel[i, :, 3], w2c[i, :, :3] @ x_world + w2c[i, :, 3])


def test_orbit_cameras_look_at_origin():
    w2c = orbit_w2c(np.array([0.0, 123.0]), np.array([20.0, -10.0]), radius=2.0)
    for pose in w2c:
        origin_cam = pose[:, 3]                    # the origin in camera coordinates
        np.testing.assert_allclose(origin_cam, [0, 0, -2.0], atol=1e-12)  # straight ahead (-z), 2 away
        np.testing.assert_allclose(pose[:, :3] @ pose[:, :3].T, np.eye(3), atol=1e-12)
