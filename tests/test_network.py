"""Layer 1: the M2M network - shapes, causality (no leak), variants, SD import, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from m2m_pipeline.network import ImageSetAttnProcessor, M2MConfig, M2MUNet
from m2m_pipeline.weights import WeightsNotFoundError


def make_net(variant: str, task: str = "none", spatial_bias: bool = False) -> M2MUNet:
    net = M2MUNet(M2MConfig.preset("tiny", variant, task=task, spatial_bias=spatial_bias)).eval()
    # Fresh init has zero null values and zero-initialised task projections; perturb them so every path
    # through Image-Set Attention carries signal and a leak would show.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(k in name for k in ("null_v", "cond_to", "dino_task_proj", "conv_out", "spatial_bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return net


def inputs(net: M2MUNet, b: int, n: int):
    cfg = net.config
    z_t = torch.randn(b, n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if cfg.variant == "self":
        context = torch.randn(b, n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    else:
        context = torch.randn(b, n, cfg.dino_tokens, cfg.dino_dim)
    t = torch.randint(0, 1000, (b, n))
    return z_t, t, context


@pytest.mark.parametrize("variant", ["self", "dino"])
@pytest.mark.parametrize("n", [1, 3])
def test_forward_backward_shapes(variant, n):
    net = make_net(variant).train()
    z_t, t, context = inputs(net, 2, n)
    eps = net(z_t, t, context)
    assert eps.shape == z_t.shape
    eps.square().mean().backward()
    isa = net.isa_layers[0]
    assert isa.processor.null_v.grad is not None and isa.to_out[0].weight.grad is not None
    if n > 1:  # with one image there is no context, so Q/K/null_k get no gradient (by design)
        assert isa.to_q.weight.grad is not None and isa.to_k.weight.grad is not None
        assert isa.processor.null_k.grad is not None


@pytest.mark.parametrize("variant", ["self", "dino"])
@pytest.mark.parametrize("n,spatial_bias", [(1, False), (2, False), (3, False), (4, False), (5, False),
                                            (6, False), (3, True), (5, True)])
def test_no_leak_across_images(variant, n, spatial_bias):
    """eps[:, i] depends only on z_t[:, i], t and context[:, :i] (design-notes 3), with or without the
    spatial bias of task models."""
    net = make_net(variant, spatial_bias=spatial_bias)
    z_t, t, context = inputs(net, 2, n)
    with torch.no_grad():
        eps = net(z_t, t, context)
        for i in range(n):
            z2, c2 = z_t.clone(), context.clone()
            z2[:, [j for j in range(n) if j != i]] += torch.randn_like(z2[:, [j for j in range(n) if j != i]])
            c2[:, i:] = torch.randn_like(c2[:, i:]) * 3
            eps2 = net(z2, t, c2)
            assert (eps2[:, i] - eps[:, i]).abs().max() <= 1e-6, f"image {i} of {n} sees what it should not"
        if n > 1:  # and the context does matter: changing an earlier image changes later predictions
            c3 = context.clone()
            c3[:, 0] = torch.randn_like(c3[:, 0]) * 3
            assert (net(z_t, t, c3)[:, 1:] - eps[:, 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["self", "dino"])
@pytest.mark.parametrize("spatial_bias", [False, True])
def test_one_masked_attention_call_equals_one_call_per_image(variant, spatial_bias, monkeypatch):
    """Image-Set Attention's batched block-causal path (small token counts) and its per-image path (paper
    size) give the same predictions, with some sets' context dropped (the rows-without-context path)."""
    from m2m_pipeline.network import image_set_attention

    net = make_net(variant, spatial_bias=spatial_bias)
    z_t, t, context = inputs(net, 3, 4)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        batched = net(z_t, t, context, drop_image=drop)
        monkeypatch.setattr(image_set_attention, "BATCHED_MASK_ELEMENTS", 0)
        per_image = net(z_t, t, context, drop_image=drop)
    torch.testing.assert_close(batched, per_image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_first_image_and_dropped_condition_are_defined(variant):
    net = make_net(variant)
    z_t, t, context = inputs(net, 3, 1)
    with torch.no_grad():
        eps_first = net(z_t, t, context)
        eps_none = net(z_t, t, None)  # no context at all: null token only
        drop = torch.tensor([True, True, True])
        eps_drop = net(z_t, t, context, drop_image=drop)
    for e in (eps_first, eps_none, eps_drop):
        assert torch.isfinite(e).all()
    # The first image attends to the null token alone, whatever the context holds.
    torch.testing.assert_close(eps_first, eps_none, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_drop, eps_none, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_drop_image_is_per_set(variant):
    net = make_net(variant)
    z_t, t, context = inputs(net, 2, 3)
    with torch.no_grad():
        full = net(z_t, t, context)
        dropped = net(z_t, t, context, drop_image=torch.tensor([False, True]))
        none = net(z_t, t, None)
    # 1e-5, not 1e-6: the clean pass runs on 1 set instead of 2, and CPU kernels round per batch shape.
    torch.testing.assert_close(dropped[0], full[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(dropped[1], none[1], rtol=0, atol=1e-6)


def test_self_stream_matches_joint_forward_semantics():
    """Two passes (clean record, noisy attend) equal the paper's joint [z_0; z_t] forward: the clean stream
    is unchanged by Image-Set Attention, so its hidden states equal a plain pass with attn2 contributing 0."""
    net = make_net("self")
    cfg = net.config
    z_0 = torch.randn(1, 2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kv = net.encode_context(z_0)
    # Re-encoding one image alone gives the same keys: the clean stream never mixes images.
    kv1 = net.encode_context(z_0[:, 1:2])
    for k_all, k_one in zip(kv.k, kv1.k):
        torch.testing.assert_close(k_all[:, 1:2], k_one, rtol=0, atol=1e-5)  # batch-shape rounding only


def test_task_condition_reaches_target_and_context():
    for variant in ("self", "dino"):
        for task, cond in (("camera", torch.randn(2, 3, 12)), ("position", torch.arange(3.0).repeat(2, 1))):
            net = make_net(variant, task)
            z_t, t, context = inputs(net, 2, 3)
            with torch.no_grad():
                a = net(z_t, t, context, cond)
                b = net(z_t, t, context, cond, drop_task=torch.tensor([True, True]))
                c = net(z_t, t, context, torch.zeros_like(cond) + 5)
            assert (a - b).abs().max() > 1e-5, (variant, task)
            assert (a - c).abs().max() > 1e-5, (variant, task)
            # Still causal with a task condition: changing later conditions leaves image 0 unchanged.
            cond2 = cond.clone()
            cond2[:, 1:] += 3
            with torch.no_grad():
                d = net(z_t, t, context, cond2)
            torch.testing.assert_close(d[:, 0], a[:, 0], rtol=0, atol=1e-6)


def test_image_set_attention_replaces_every_cross_attention():
    for variant, kv_dim in (("self", None), ("dino", 32)):
        net = M2MUNet(M2MConfig.preset("tiny", variant))
        blocks = [m for m in net.unet.modules() if isinstance(m, BasicTransformerBlock)]
        assert blocks and len(blocks) == len(net.isa_layers)
        for block in blocks:
            assert isinstance(block.attn2.processor, ImageSetAttnProcessor)
            assert block.attn2.to_k.in_features == (kv_dim or block.attn2.query_dim)


def _tiny_sd_unet(path):
    cfg = M2MConfig.preset("tiny")
    unet = UNet2DConditionModel(**{**cfg.unet_kwargs(), "cross_attention_dim": 24})
    unet.save_pretrained(path / "unet")
    return unet


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_from_stable_diffusion_keeps_every_other_tensor(tmp_path, variant):
    sd = _tiny_sd_unet(tmp_path)
    base = M2MConfig.preset("paper", variant)  # the SD folder's dimensions must win over the paper preset's
    net = M2MUNet.from_stable_diffusion(tmp_path, base)
    assert net.config.block_out_channels == (16, 32) and net.config.variant == variant
    sd_state = sd.state_dict()
    m2m_state = {k.removeprefix("unet."): v for k, v in net.state_dict().items() if k.startswith("unet.")}
    text_keys = {k for k in sd_state if ".attn2." in k}
    assert text_keys, "the tiny SD U-Net should have text cross-attention"
    for k, v in sd_state.items():
        if k in text_keys:
            continue
        assert torch.equal(m2m_state[k], v), k
    # No text cross-attention left: every attn2 tensor is new (to_k takes image features, not 24-d text).
    for k in m2m_state:
        if ".attn2.to_k." in k:
            assert m2m_state[k].shape[1] != 24
    assert all(isinstance(a.processor, ImageSetAttnProcessor) for a in net.isa_layers)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    net = make_net("dino", task="camera")
    net.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = M2MUNet.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == net.config
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_weights_paths_are_explained(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not download"):
        M2MUNet.from_stable_diffusion(tmp_path / "nope")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "nope")):
        M2MUNet.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_bad_input_names_expected_shape(variant):
    net = make_net(variant)
    z_t, t, context = inputs(net, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, W\)"):
        net(z_t[:, :, :2], t, context)
    with pytest.raises(ValueError, match="float"):
        net(z_t.long(), t, context)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        net(z_t, torch.zeros(5), context)
    bad_ctx = context[..., :-1] if variant == "dino" else context[:, :, :2]
    with pytest.raises(ValueError, match="context"):
        net(z_t, t, bad_ctx)
    with pytest.raises(ValueError, match="context holds 1 images"):
        net(z_t, t, context[:, :1])


def test_config_presets_and_validation():
    assert M2MConfig.preset("paper").block_out_channels == (320, 640, 1280, 1280)
    assert M2MConfig.preset("paper").dino_dim == 1536
    with pytest.raises(ValueError, match="unknown preset"):
        M2MConfig.preset("huge")
    with pytest.raises(ValueError, match="variant"):
        M2MConfig.preset("tiny", "clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_size"):
        M2MConfig.preset("tiny", sample_size=-1)
    cfg = M2MConfig.preset("demo", "dino", task="position")
    assert M2MConfig.from_dict(cfg.to_dict()) == cfg
    n_params = sum(p.numel() for p in M2MUNet(M2MConfig.preset("demo")).parameters())
    assert 1_000_000 <= n_params <= 5_000_000


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_paper_preset_builds_on_meta_with_sd_parameter_count(variant):
    """SD-2.1-base U-Net (865,910,724 parameters) minus its text cross-attention plus Image-Set Attention."""
    with torch.device("meta"):
        net = M2MUNet(M2MConfig.preset("paper", variant))
        sd = UNet2DConditionModel(**M2MConfig.preset("paper").unet_kwargs())
    sd_total = sum(p.numel() for p in sd.parameters())
    assert sd_total == 865_910_724
    text = sum(p.numel() for k, p in sd.named_parameters() if ".attn2." in k)
    isa = sum(p.numel() for k, p in net.named_parameters() if ".attn2." in k)
    assert sum(p.numel() for p in net.parameters()) == sd_total - text + isa
    assert len(net.isa_layers) == 16


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_patchified_network_runs_the_unet_on_space_to_depth_patches(variant):
    """patch_size p: the U-Net sees (C p^2, H / p, W / p); output is back in (C, H, W); still causal."""
    cfg = M2MConfig.preset("tiny", variant, patch_size=2)
    net = M2MUNet(cfg).eval()
    assert net.unet.config.in_channels == 12 and net.unet.config.sample_size == 8
    z_t, t, context = inputs(net, 2, 3)
    with torch.no_grad():
        eps = net(z_t, t, context)
        # the same U-Net called on patches by hand, for the first image (no context: the null key only)
        first = net(z_t[:, :1], t[:, :1], context[:, :1])
        z2 = z_t.clone()
        z2[:, 1:] += torch.randn_like(z2[:, 1:])
        assert (net(z2, t, context)[:, 0] - eps[:, 0]).abs().max() <= 1e-6
    assert eps.shape == z_t.shape
    torch.testing.assert_close(first[:, 0], eps[:, 0], atol=1e-5, rtol=0)
    patches = torch.nn.functional.pixel_unshuffle(z_t[:, 0], 2)
    assert torch.equal(torch.nn.functional.pixel_shuffle(patches, 2), z_t[:, 0])
    with pytest.raises(ValueError, match="patch_size"):
        M2MConfig.preset("tiny", variant, patch_size=3)
