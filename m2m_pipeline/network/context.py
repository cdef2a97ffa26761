"""Context keys/values of Image-Set Attention, and the per-forward state handed to its processors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ContextKV:
    """Projected keys and values of context images at every Image-Set Attention layer.

    `k[l]`, `v[l]`: (B, n, S_l, inner_l) - B sets, n context images, S_l tokens per image at layer l.
    Each image's entries depend on that image (and its task condition) only, so entries can be
    computed once, cached, and concatenated or windowed along the image axis (docs/model.md "Network").
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_images(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def select_images(self, index: list[int]) -> "ContextKV":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.k[0].device)
        return ContextKV([k.index_select(1, idx) for k in self.k], [v.index_select(1, idx) for v in self.v])

    def select_rows(self, index: torch.Tensor) -> "ContextKV":
        return ContextKV([k.index_select(0, index) for k in self.k], [v.index_select(0, index) for v in self.v])

    @staticmethod
    def cat_images(parts: list["ContextKV"]) -> "ContextKV":
        if not parts:
            raise ValueError("ContextKV.cat_images needs at least one part")
        layers = range(len(parts[0].k))
        return ContextKV(
            [torch.cat([p.k[l] for p in parts], dim=1) for l in layers],
            [torch.cat([p.v[l] for p in parts], dim=1) for l in layers],
        )


@dataclass
class ImageSetCall:
    """What one U-Net forward tells its Image-Set Attention processors.

    It travels as the U-Net's `encoder_hidden_states`, the one argument diffusers routes to `attn2`
    only (and through gradient checkpointing) - exactly the layers this model replaces.
    """

    mode: Literal["record", "attend"]
    n: int                                    # images per set in this U-Net batch (rows = B * n)
    # record mode (M2M-Self clean stream): processors write their keys/values here
    record: ContextKV | None = None
    kv_cond: torch.Tensor | None = None       # (B*n, task_embed_dim) E(c_j) of the clean images, or None
    # attend mode (noisy stream)
    context: ContextKV | None = None
    ctx_index: torch.Tensor | None = None     # (B,) row of `context` for each set; -1 = image condition dropped
    first_position: int = 0                   # z_t[:, i] attends to context images [0, first_position + i)
    q_cond: torch.Tensor | None = None        # (B*n, task_embed_dim) E(c_i) of the targets, or None
