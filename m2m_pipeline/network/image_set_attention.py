"""Image-Set Attention (Sec. 5.1, 5.2, Fig. 3) as a diffusers attention processor.

It replaces the text cross-attention (`attn2`) of every transformer block. Noisy image i attends to every
token of the clean context images j < i (causal image-set mask) plus a learned null key/value
(docs/model.md "Network"), so the first image and the unconditional branch have a defined, NaN-free target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from m2m_pipeline.network.context import ImageSetCall
from m2m_pipeline.network.spatial_bias import SpatialBias

# Largest block-causal mask (queries x keys of one head) built to run all noisy images in one attention call;
# above it (paper-size latents: 5 x 4096 queries) each image attends to its own context slice, mask-free.
BATCHED_MASK_ELEMENTS = 2**22


class ImageSetAttnProcessor(nn.Module):
    """Processor for one Image-Set Attention layer; the `Attention` module it serves owns Q/K/V/out weights.

    Two modes, chosen per forward by `ImageSetCall.mode`:
    - "record" (M2M-Self clean stream): project the clean hidden states to keys/values, store them, and
      return zeros so the clean stream passes the layer unchanged (z' = [z_c; z'_n]).
    - "attend" (noisy stream): causal attention over stored context keys/values.
    The causal mask is realised by slicing: queries of image i see exactly the first i context images, so
    no (N*HW) x (N*HW) mask is materialised and SDPA keeps its fused kernels.
    """

    def __init__(self, layer_index: int, query_dim: int, inner_dim: int, heads: int,
                 task_embed_dim: int | None, clean_stream_cond: bool, spatial_bias: bool = False):
        super().__init__()
        self.layer_index = layer_index
        self.heads = heads
        # Null token in projected space: the only key of image 1 and of the unconditional branch.
        self.null_k = nn.Parameter(torch.randn(inner_dim) * 0.02)
        self.null_v = nn.Parameter(torch.zeros(inner_dim))
        # Task condition E(c) added to the attention inputs (Sec. 6.2). No bias and zero init: a dropped
        # condition (E = 0) adds nothing, and fine-tuning starts from the pretrained model's function.
        self.cond_to_q = self._zero_linear(task_embed_dim, query_dim) if task_embed_dim else None
        self.cond_to_kv = self._zero_linear(task_embed_dim, query_dim) if task_embed_dim and clean_stream_cond else None
        # Optional relative-position logits (M2MConfig.spatial_bias; zero at init, spatial_bias.py says why).
        self.spatial_bias = SpatialBias(heads) if spatial_bias else None

    @staticmethod
    def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
        layer = nn.Linear(d_in, d_out, bias=False)
        nn.init.zeros_(layer.weight)
        return layer

    # ------------------------------------------------------------------ keys / values
    def project_context(self, attn: nn.Module, x: torch.Tensor, n: int,
                        cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B*n, S, D_kv) clean hidden states or DINO tokens -> k, v: (B, n, S, inner)."""
        if cond is not None and self.cond_to_kv is not None:
            x = x + self.cond_to_kv(cond)[:, None]
        k = rearrange(attn.to_k(x), "(b n) s c -> b n s c", n=n)
        v = rearrange(attn.to_v(x), "(b n) s c -> b n s c", n=n)
        return k, v

    # ------------------------------------------------------------------ diffusers entry point
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: ImageSetCall | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        call = encoder_hidden_states
        if not isinstance(call, ImageSetCall):
            raise TypeError("Image-Set Attention layers are driven by M2MUNet; call the M2MUNet, not its inner U-Net")
        if call.mode == "record":
            assert call.record is not None
            k, v = self.project_context(attn, hidden_states, call.n, call.kv_cond)
            call.record.k[self.layer_index], call.record.v[self.layer_index] = k, v
            return torch.zeros_like(hidden_states)
        return self._attend(attn, hidden_states, call)

    def _attend(self, attn: nn.Module, hidden_states: torch.Tensor, call: ImageSetCall) -> torch.Tensor:
        n, h = call.n, self.heads
        x = hidden_states  # (B*n, S_q, C)
        if call.q_cond is not None and self.cond_to_q is not None:
            x = x + self.cond_to_q(call.q_cond)[:, None]
        q = rearrange(attn.to_q(x), "(b n) s (h d) -> b n h s d", n=n, h=h)
        b, _, _, s_q, d = q.shape
        null_k = rearrange(self.null_k.to(q.dtype), "(h d) -> h d", h=h)
        null_v = rearrange(self.null_v.to(q.dtype), "(h d) -> h d", h=h)
        null_out = null_v[None, :, None, :].expand(b, h, s_q, d)  # softmax over the null key alone

        ctx = call.context
        keep = None if call.ctx_index is None else torch.nonzero(call.ctx_index >= 0).squeeze(1)
        has_context = ctx is not None and ctx.num_images > 0 and (keep is None or keep.numel() > 0)
        k_all = v_all = null_kh = null_vh = mask_all = None  # no context: every image attends to the null token
        if has_context:
            k_all, v_all = ctx.k[self.layer_index], ctx.v[self.layer_index]  # (B_ctx, n_c, S, inner)
            if keep is not None:
                k_all, v_all = k_all.index_select(0, call.ctx_index[keep]), v_all.index_select(0, call.ctx_index[keep])
            rows = k_all.shape[0]
            null_kh = null_k[None, :, None, :].expand(rows, h, 1, d)
            null_vh = null_v[None, :, None, :].expand(rows, h, 1, d)
            if self.spatial_bias is not None:  # built once for the most context images; image i slices it
                p_max = min(call.first_position + n - 1, k_all.shape[1])  # most context images any i sees
                bias = self.spatial_bias(s_q, k_all.shape[2], q.dtype)  # (h, S_q, S_k)
                mask_all = torch.cat([bias.new_zeros(h, s_q, 1), bias.repeat(1, 1, max(p_max, 1))],
                                     dim=2)  # (h, S_q, 1 + p_max*S_k); the null key has no position: bias 0

        if has_context and n * s_q * (1 + k_all.shape[1] * k_all.shape[2]) <= BATCHED_MASK_ELEMENTS:
            out = self._attend_batched(q, k_all, v_all, null_kh, null_vh, null_out, mask_all, call, keep)
        else:
            out = self._attend_per_image(q, k_all, v_all, null_kh, null_vh, null_out, mask_all, call, keep)
        out = rearrange(out, "b n h s d -> (b n) s (h d)")
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _attend_per_image(self, q, k_all, v_all, null_kh, null_vh, null_out, mask_all, call, keep) -> torch.Tensor:
        """One SDPA per noisy image over exactly its visible context: no mask, for large token counts."""
        n, h = call.n, self.heads
        outs = []
        for i in range(n):
            p = call.first_position + i  # context images visible to image i
            out_i = null_out
            if k_all is not None and p > 0:
                k_i = rearrange(k_all[:, :p], "b m s (h d) -> b h (m s) d", h=h)  # (B', h, p*S, d)
                v_i = rearrange(v_all[:, :p], "b m s (h d) -> b h (m s) d", h=h)
                q_i = q[:, i] if keep is None else q[:, i].index_select(0, keep)
                mask = None if mask_all is None else mask_all[:, :, : 1 + k_i.shape[2]]  # (h, S_q, 1 + p*S_k)
                a = F.scaled_dot_product_attention(
                    q_i, torch.cat([null_kh, k_i], dim=2), torch.cat([null_vh, v_i], dim=2), attn_mask=mask
                )  # (B', h, S_q, d)
                out_i = a if keep is None or keep.numel() == q.shape[0] else out_i.index_put((keep,), a)
            outs.append(out_i)
        return torch.stack(outs, dim=1)  # (B, n, h, S_q, d)

    def _attend_batched(self, q, k_all, v_all, null_kh, null_vh, null_out, mask_all, call, keep) -> torch.Tensor:
        """All noisy images in one SDPA with a block-causal additive mask (image i sees the null key and the
        first first_position + i context images). Same result as `_attend_per_image`; one fused call instead of
        n small ones and their key copies (the CPU demo's profile: docs/model.md "Training throughput")."""
        n, h = call.n, self.heads
        b, _, _, s_q, d = q.shape
        n_c, s_k = k_all.shape[1], k_all.shape[2]
        visible = (call.first_position + torch.arange(n, device=q.device)).clamp(max=n_c)  # (n,)
        key_image = torch.arange(n_c, device=q.device).repeat_interleave(s_k)  # (n_c*S_k,)
        allowed = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=q.device),
                             key_image[None, :] < visible[:, None]], dim=1)  # (n, 1 + n_c*S_k)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        mask = mask.repeat_interleave(s_q, dim=0)  # (n*S_q, 1 + n_c*S_k)
        if mask_all is not None:  # spatial bias: (h, S_q, 1 + p_max*S_k), the same for every context image
            bias = torch.cat([mask_all[:, :, :1], mask_all[:, :, 1 : 1 + s_k].repeat(1, 1, n_c)], dim=2)
            mask = mask[None] + bias.repeat(1, n, 1)  # (h, n*S_q, 1 + n_c*S_k)
        k = torch.cat([null_kh, rearrange(k_all, "b m s (h d) -> b h (m s) d", h=h)], dim=2)
        v = torch.cat([null_vh, rearrange(v_all, "b m s (h d) -> b h (m s) d", h=h)], dim=2)
        q_rows = q if keep is None else q.index_select(0, keep)
        a = F.scaled_dot_product_attention(rearrange(q_rows, "b n h s d -> b h (n s) d"), k, v, attn_mask=mask)
        a = rearrange(a, "b h (n s) d -> b n h s d", n=n)  # (B', n, h, S_q, d)
        if keep is None or keep.numel() == b:
            return a
        return null_out[:, None].expand(b, n, h, s_q, d).index_put((keep,), a)

