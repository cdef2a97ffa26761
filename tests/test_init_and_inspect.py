"""Paper initialisation (Sec. 6.1): SD (EMA) U-Net weights, Image-Set Attention from scratch; parameter counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.network.inspect import count_parameters, report


def tiny_sd_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**M2MConfig.preset("tiny").unet_kwargs(), "cross_attention_dim": 24})


def non_text_equal(net: M2MUNet, sd: UNet2DConditionModel) -> bool:
    m2m = {k.removeprefix("unet."): v for k, v in net.state_dict().items() if k.startswith("unet.")}
    return all(torch.equal(m2m[k], v) for k, v in sd.state_dict().items() if ".attn2." not in k)


def test_ema_subfolder_is_preferred(tmp_path):
    raw, ema = tiny_sd_unet(0), tiny_sd_unet(1)
    raw.save_pretrained(tmp_path / "unet")
    ema.save_pretrained(tmp_path / "unet_ema")
    net = M2MUNet.from_stable_diffusion(tmp_path, M2MConfig.preset("tiny"))
    assert non_text_equal(net, ema) and not non_text_equal(net, raw)
    assert net.init_source.endswith("unet_ema")
    assert non_text_equal(M2MUNet.from_stable_diffusion(tmp_path, M2MConfig.preset("tiny"), prefer_ema=False), raw)


def test_ema_weight_variant_is_preferred(tmp_path):
    raw, ema = tiny_sd_unet(0), tiny_sd_unet(1)
    raw.save_pretrained(tmp_path / "unet")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
              str(tmp_path / "unet" / "diffusion_pytorch_model.ema.safetensors"))
    net = M2MUNet.from_stable_diffusion(tmp_path, M2MConfig.preset("tiny", "dino"))
    assert non_text_equal(net, ema) and "variant ema" in net.init_source


def test_image_set_attention_starts_from_scratch(tmp_path):
    sd = tiny_sd_unet(0)
    sd.save_pretrained(tmp_path / "unet")
    a = M2MUNet.from_stable_diffusion(tmp_path, M2MConfig.preset("tiny"))
    torch.manual_seed(123)
    b = M2MUNet.from_stable_diffusion(tmp_path, M2MConfig.preset("tiny"))
    isa = [k for k in a.state_dict() if ".attn2.to_q." in k]
    assert isa and all(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in isa)  # fresh random init
    sd_q = {k: v for k, v in sd.state_dict().items() if ".attn2.to_q." in k}
    assert all(not torch.equal(a.state_dict()["unet." + k], v) for k, v in sd_q.items())  # not SD's text attn


def test_paper_parameter_count_is_sd_minus_text_plus_image_set_attention():
    self_, dino = count_parameters(M2MConfig.preset("paper", "self")), count_parameters(M2MConfig.preset("paper", "dino"))
    assert self_.sd_unet == dino.sd_unet == 865_910_724  # SD-2.1-base's U-Net
    assert self_.balance_ok and dino.balance_ok
    assert (self_.m2m, dino.m2m) == (865_157_444, 878_715_204)
    text = report("paper")
    assert "865,910,724" in text and "865,157,444" in text and "878,715,204" in text


@pytest.mark.slow
def test_inspect_command_prints_the_counts():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "m2m_pipeline.network.inspect", "--preset", "paper"], cwd=root,
                         capture_output=True, text=True, timeout=300, check=False, env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "865,157,444" in out.stdout and "878,715,204" in out.stdout
