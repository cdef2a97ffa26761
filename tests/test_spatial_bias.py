"""The relative spatial-position bias of Image-Set Attention (task models; network/spatial_bias.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.network.context import ContextKV, ImageSetCall
from m2m_pipeline.network.image_set_attention import ImageSetAttnProcessor
from m2m_pipeline.network.spatial_bias import SpatialBias, token_grid


def test_token_grid_reads_square_grids_and_a_cls_token():
    assert token_grid(256) == (0, 16)
    assert token_grid(17) == (1, 4)  # DINO: CLS + 4x4 patches
    assert token_grid(257) == (1, 16)  # DINOv2 at 224 px
    with pytest.raises(ValueError, match="11 tokens"):
        token_grid(11)


def _same_place_bias(bias: SpatialBias, c: float) -> None:
    """Set the MLP to c * (1 - |dx'| - |dy'|): a peak of c at zero displacement (|x| = relu(x) + relu(-x))."""
    with torch.no_grad():
        for p in bias.mlp.parameters():
            p.zero_()
        first, last = bias.mlp[0], bias.mlp[2]
        first.weight[:4] = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
        first.bias[4] = 1.0
        last.weight[:, :4] = -c
        last.weight[:, 4] = c


def test_bias_is_zero_at_init_and_translation_invariant():
    bias = SpatialBias(heads=2)
    assert bias(16, 16, torch.float32).abs().max() == 0
    torch.manual_seed(0)
    with torch.no_grad():
        bias.mlp[2].weight.normal_()
    b = bias(16, 16, torch.float32).view(2, 4, 4, 4, 4)  # (h, yq, xq, yk, xk)
    # a function of the displacement only: shifting query and key together changes nothing
    assert torch.allclose(b[:, :3, :3, :3, :3], b[:, 1:, 1:, 1:, 1:])
    assert b.std() > 0
    cls = bias(16, 5, torch.float32)  # keys: CLS + 2x2 grid, queries: 4x4
    assert cls.shape == (2, 16, 5) and cls[:, :, 0].abs().max() == 0 and cls[:, :, 1:].abs().max() > 0


def test_same_place_bias_makes_image_set_attention_copy_the_previous_image():
    """The mechanism the tasks need: with content logits at zero, a same-place bias makes each query read
    the context token at its own position (and without the bias it reads the average)."""
    c, s = 8, 16  # channels, tokens (4x4)
    attn = Attention(query_dim=c, cross_attention_dim=c, heads=1, dim_head=c, bias=False, out_bias=False)
    proc = ImageSetAttnProcessor(0, c, c, heads=1, task_embed_dim=None, clean_stream_cond=True, spatial_bias=True)
    with torch.no_grad():
        attn.to_q.weight.zero_()  # content logits 0: only positions decide
        attn.to_out[0].weight.copy_(torch.eye(c))
    attn.set_processor(proc)
    v = torch.randn(1, 1, s, c)  # (B, n_c, S, inner): the context image's values
    call = ImageSetCall("attend", 1, context=ContextKV([torch.randn(1, 1, s, c)], [v]), first_position=1)
    x = torch.randn(1, s, c)
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=call)
        _same_place_bias(proc.spatial_bias, c=30.0)
        copied = attn(x, encoder_hidden_states=call)
    assert torch.allclose(copied[0], v[0, 0], atol=1e-4)
    assert torch.allclose(plain[0], v[0, 0].mean(0, keepdim=True).expand(s, c) * s / (s + 1), atol=1e-5)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_model_with_zero_bias_computes_the_model_without(variant):
    torch.manual_seed(0)
    plain = M2MUNet(M2MConfig.preset("tiny", variant)).eval()
    biased = M2MUNet(M2MConfig.preset("tiny", variant, spatial_bias=True)).eval()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("spatial_bias" in k for k in missing)
    cfg = plain.config
    z_t = torch.randn(2, 3, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    context = torch.randn_like(z_t) if variant == "self" else torch.randn(2, 3, cfg.dino_tokens, cfg.dino_dim)
    t = torch.randint(0, 1000, (2, 3))
    with torch.no_grad():
        assert torch.allclose(biased(z_t, t, context), plain(z_t, t, context), atol=1e-6)
