"""Relative spatial-position bias for Image-Set Attention (not in the paper; used by task fine-tuning).

Image-Set Attention, like SD's text cross-attention it replaces, has no positional signal: a query can find
"the same place in the previous image" only through whatever absolute position the convolutions' padding
leaks into the features. Tasks whose targets are geometric edits of the context (novel views, procedure
steps) need exactly that lookup. This module adds to every attention logit a learned function of the
displacement between the query's and the key's positions in the image (a continuous position bias as in
Swin Transformer V2, Liu et al. 2022, hand-written because diffusers has none for cross-attention):

    logit(i, j) += MLP_h(log-spaced (x_i - x_j, y_i - y_j)),   coordinates normalised to [-1, 1]

Normalised coordinates make it work across grids (a 16x16 query grid against 4x4 DINO patches). Tokens
that are not on the grid (DINO's CLS token) get no bias. The MLP's last layer starts at zero, so a model
with the bias computes exactly the model without it until training moves it (tested), and its hidden
layer is random, so gradients reach that last layer from step 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def token_grid(s: int) -> tuple[int, int]:
    """(leading non-grid tokens, grid side) of a sequence of `s` tokens: a square grid in row-major order
    (diffusers' flattened feature maps), optionally after one CLS token (DINOv2's last hidden states)."""
    for lead in (0, 1):
        g = math.isqrt(s - lead)
        if g > 0 and g * g == s - lead:
            return lead, g
    raise ValueError(f"spatial bias: {s} tokens are neither a square grid nor a CLS token plus a square grid")


def token_centres(s: int) -> tuple[int, torch.Tensor]:
    """(leading non-grid tokens, (g*g, 2) token centres (x, y) in [-1, 1])."""
    lead, g = token_grid(s)
    c = (torch.arange(g, dtype=torch.float64) + 0.5) / g * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return lead, torch.stack([x.flatten(), y.flatten()], dim=1)


class SpatialBias(nn.Module):
    """bias(s_q, s_k) -> (heads, s_q, s_k) additive attention logits for one context image."""

    def __init__(self, heads: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, heads, bias=False))
        nn.init.zeros_(self.mlp[2].weight)
        self._index: dict[tuple[int, int, torch.device], tuple[int, torch.Tensor, torch.Tensor]] = {}

    def _displacements(self, s_q: int, s_k: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The distinct query-key displacements (U, 2) and, per (query, grid key) pair, which one it is:
        the MLP runs on U points (at most (2g - 1)^2 for equal grids) instead of s_q * s_k pairs. Cached per
        grid pair and device: geometry only, so it is built (and copied to the device) once."""
        key = (s_q, s_k, device)
        if key not in self._index:
            lead_q, pq = token_centres(s_q)
            if lead_q:
                raise ValueError(f"spatial bias: queries must be a square grid, got {s_q} tokens")
            lead_k, pk = token_centres(s_k)
            d = (pq[:, None] - pk[None]).reshape(-1, 2).round(decimals=9)  # (s_q * g_k^2, 2)
            unique, inverse = torch.unique(d, dim=0, return_inverse=True)
            # log-spaced, as Swin V2: fine resolution near zero displacement, where copying happens
            unique = torch.sign(unique) * torch.log2(1 + 8 * unique.abs()) / math.log2(9)
            self._index[key] = (lead_k, unique.float().to(device), inverse.view(s_q, -1).to(device))
        return self._index[key]

    def forward(self, s_q: int, s_k: int, dtype: torch.dtype) -> torch.Tensor:
        weight = self.mlp[0].weight
        lead_k, unique, inverse = self._displacements(s_q, s_k, weight.device)
        table = self.mlp(unique.to(weight.dtype))  # (U, heads)
        bias = table[inverse].permute(2, 0, 1)  # (heads, s_q, g_k^2)
        if lead_k:
            bias = torch.cat([bias.new_zeros(bias.shape[0], s_q, lead_k), bias], dim=2)
        return bias.to(dtype)  # (heads, s_q, s_k)
