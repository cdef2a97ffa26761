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


# ---------------------------------------------------------------- every front-end starts the paper model from SD

def test_paper_sized_unet_needs_init_or_from_scratch():
    from m2m_pipeline.training import initial_network

    paper = M2MConfig.preset("paper", "dino")
    with pytest.raises(ValueError, match="--from-scratch"):
        initial_network(None, paper)
    with pytest.warns(UserWarning, match="from random weights"):
        assert initial_network(None, paper, from_scratch=True) is None
    assert initial_network(None, M2MConfig.preset("tiny")) is None  # CPU presets: random weights, no warning
    with pytest.raises(ValueError, match="not both"):
        initial_network("models/sd", paper, from_scratch=True)


def test_cli_train_paper_preset_without_init_is_refused():
    proc = subprocess.run([sys.executable, "-m", "m2m_pipeline.cli", "train", "--preset", "paper", "--out",
                           "/nonexistent/out", "--data", "/nonexistent/*.tar"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--from-scratch" in proc.stderr, proc.stderr


def _paper_repo(root: Path) -> Path:
    """A repo with what the paper profile's settings check for: captions, a (tiny, random) SD-2.1-base folder
    in the real layout, a DINOv2 folder."""
    from m2m_pipeline.data.tiny_sd import build_tiny_stable_diffusion

    (root / "data" / "cc12m").mkdir(parents=True)
    (root / "data" / "cc12m" / "part-0.tsv").write_text("u\ta caption\n")
    build_tiny_stable_diffusion(root / "models" / "stable-diffusion-2-1-base")
    (root / "models" / "dinov2-giant").mkdir(parents=True)
    from m2m_pipeline.reference_layouts import build_inception, build_open_clip

    build_inception(root / "models" / "inception", scale="small")  # the paper's scorers, checked at resolve
    build_open_clip(root / "models" / "clip", scale="small")
    return root / "models" / "stable-diffusion-2-1-base"


# The paper profile's scorer settings for the repo _paper_repo writes
PAPER_SCORERS = {"inception_weights": "models/inception/inception-2015-12-05.pt", "clip_model": "local-dir:models/clip"}


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_dagster_paper_training_starts_from_the_sd_folder(tmp_path, monkeypatch, variant):
    """The paper profile's training asset path (settings -> Resolved -> training_launch.run_training, in-process)
    hands train() a network whose every non-Image-Set-Attention tensor is the SD folder's, at step 0."""
    from safetensors.torch import load_file

    import m2m_pipeline.training as training
    from m2m_pipeline.orchestration import training_launch
    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import ComputeResource, M2MSettings
    from m2m_pipeline.tracking import NullRun

    sd_dir = _paper_repo(tmp_path)
    r = M2MSettings(repo_dir=str(tmp_path), **PAPER_SCORERS).resolve(PROFILES["paper"])
    assert r.init_from == sd_dir and not r.from_scratch
    seen = {}
    monkeypatch.setattr(training, "train", lambda *a, net=None, **k: seen.setdefault("net", net))
    monkeypatch.setattr(training_launch, "summarise", lambda result, out: {})
    training_launch.run_training(None, r, variant, [], tmp_path / "out", ComputeResource(), NullRun())
    ours = seen["net"].unet.state_dict()
    sd = load_file(str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    shared = [k for k in sd if ".attn2." not in k]
    assert shared and all(torch.equal(ours[k], sd[k]) for k in shared)
    assert seen["net"].config.variant == variant

    scratch = M2MSettings(repo_dir=str(tmp_path), train_from_scratch=True, **PAPER_SCORERS).resolve(PROFILES["paper"])
    assert scratch.init_from is None and scratch.from_scratch
    with pytest.warns(UserWarning, match="from random weights"):
        training_launch.run_training(None, scratch, variant, [], tmp_path / "out2", ComputeResource(), NullRun())
