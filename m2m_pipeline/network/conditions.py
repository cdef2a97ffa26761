"""Task-condition embedders E(c_C) of Sec. 6.2 / 8.5: camera extrinsics (NVS) and step position (procedures)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class CameraEmbedder(nn.Module):
    """Sec. 8.5.1: 'a straightforward MLP' on the camera extrinsic (3x4, relative to a reference view)."""

    def __init__(self, camera_dim: int, embed_dim: int):
        super().__init__()
        self.camera_dim = camera_dim
        self.mlp = nn.Sequential(nn.Linear(camera_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c: (B, N, camera_dim) or (B, N, 3, 4) -> (B, N, embed_dim)."""
        if c.ndim == 4:
            c = c.flatten(2)
        if c.ndim != 3 or c.shape[-1] != self.camera_dim:
            raise ValueError(f"camera condition must be (B, N, {self.camera_dim}) or (B, N, 3, 4), got {tuple(c.shape)}")
        return self.mlp(c.float())


class PositionEmbedder(nn.Module):
    """Sec. 8.5.2: sinusoidal encoding of the step position, then an MLP (diffusers' timestep modules)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.sinusoid = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(embed_dim, embed_dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c: (B, N) step positions -> (B, N, embed_dim)."""
        if c.ndim != 2:
            raise ValueError(f"position condition must be (B, N) step indices, got {tuple(c.shape)}")
        b, n = c.shape
        e = self.sinusoid(c.reshape(-1).float())  # (B*N, embed_dim)
        return self.mlp(e).view(b, n, -1)


def build_task_embedder(task: str, embed_dim: int, camera_dim: int = 12) -> nn.Module | None:
    if task == "none":
        return None
    if task == "camera":
        return CameraEmbedder(camera_dim, embed_dim)
    if task == "position":
        return PositionEmbedder(embed_dim)
    raise ValueError(f"unknown task condition {task!r}")
