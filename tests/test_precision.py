"""One precision setting (m2m_pipeline/precision.py) for training and sampling: bf16 autocast runs on CPU and gives
finite outputs, float32 is the identity, float16 on CPU is refused; compute.dtype reaches the TrainConfig."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.precision import accelerate_precision, autocast_context
from m2m_pipeline.sampling import generate
from m2m_pipeline.training import TrainConfig, train

MICRO = M2MConfig.preset("tiny", image_size=8, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)


def test_float32_is_the_identity_and_float16_is_refused_on_cpu():
    assert isinstance(autocast_context("cpu", "float32"), nullcontext)
    assert isinstance(autocast_context("cpu", torch.float32), nullcontext)
    with autocast_context("cpu", "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        autocast_context("cpu", "float16")
    assert [accelerate_precision(d) for d in ("float32", "bfloat16", "float16", "auto")] == ["no", "bf16", "fp16", "auto"]


def test_bf16_training_step_runs_in_bf16_and_is_finite(tmp_path):
    net = M2MUNet(MICRO)
    seen = []
    net.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    g = torch.Generator().manual_seed(0)
    data = [{"latents": torch.randn(2, 2, 3, 8, 8, generator=g)} for _ in range(2)]
    tc = TrainConfig.preset("tiny", steps=2, batch_size=2, n_images=2, checkpoint_every=0, log_every=1,
                            mixed_precision="bf16")
    result = train(MICRO, tc, data, tmp_path, net=net, progress=False, device="cpu")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert torch.bfloat16 in seen and all(p.dtype == torch.float32 for p in net.parameters())  # fp32 master weights
    with pytest.raises(ValueError, match="TrainConfig.mixed_precision: float16 is not supported on CPU"):
        train(MICRO, TrainConfig.preset("tiny", steps=1, mixed_precision="fp16"), data, tmp_path / "fp16",
              progress=False, device="cpu")


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_bf16_sampling_is_finite_and_float32_is_unchanged(variant):
    torch.manual_seed(0)
    cfg = M2MConfig.preset("tiny", variant)
    net = M2MUNet(cfg).eval()
    context = torch.randn(2, 2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    proj = torch.randn(cfg.in_channels * cfg.sample_size ** 2, cfg.dino_tokens * cfg.dino_dim) * 0.01
    encoder = None if variant == "self" else (lambda z: (z.flatten(1) @ proj.to(z.dtype)).view(
        z.shape[0], cfg.dino_tokens, cfg.dino_dim))
    common = {"context_encoder": encoder, "steps": 3, "guidance_scale": 2.0, "seed": 0, "progress": False}
    plain = generate(net, context, 2, **common)
    fp32 = generate(net, context, 2, precision="float32", **common)
    bf16 = generate(net, context, 2, precision="bfloat16", **common)
    assert torch.equal(plain, fp32)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()  # latents stay fp32 for the scheduler
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().max() < 0.5 * fp32.abs().max()  # autocast took effect


def test_compute_dtype_becomes_the_training_precision(tmp_path):
    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import ComputeResource, M2MSettings
    from m2m_pipeline.orchestration.training_launch import train_configs

    r = M2MSettings(repo_dir=str(tmp_path)).resolve(PROFILES["smoke"])
    _, tc = train_configs(r, "self", ComputeResource(device="cpu", dtype="bfloat16"))
    assert tc.mixed_precision == "bf16"
    _, tc = train_configs(r, "self", ComputeResource(device="cpu"))
    assert tc.mixed_precision == "auto"  # dtype auto: the TrainConfig's own
    clash = M2MSettings(repo_dir=str(tmp_path), train={"mixed_precision": "no"}).resolve(PROFILES["smoke"])
    with pytest.raises(ValueError, match="compute.config.dtype=bfloat16 contradicts"):
        train_configs(clash, "self", ComputeResource(device="cpu", dtype="bfloat16"))
    with pytest.raises(ValueError, match="resources.compute.config.dtype: float16 is not supported on CPU"):
        ComputeResource(device="cpu", dtype="float16")
