"""Random-weight folders in the real layouts of SD-2.1-base and DINOv2-giant load through the project's loaders."""

from __future__ import annotations

import json

import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.reference_layouts import DINOV2_GIANT, build_dinov2_giant, build_sd21_base, sd21_unet_kwargs


def test_full_scale_configs_are_the_released_ones():
    kw = sd21_unet_kwargs("full")
    assert kw["block_out_channels"] == [320, 640, 1280, 1280] and kw["cross_attention_dim"] == 1024
    assert kw["sample_size"] == 64 and kw["attention_head_dim"] == [5, 10, 20, 20]  # SD-2.1-base's unet config
    assert M2MConfig.preset("paper").dino_dim == DINOV2_GIANT["hidden_size"]  # the tokens M2M-DINO expects


def test_small_sd21_folder_loads_everywhere(tmp_path):
    from diffusers import StableDiffusionPipeline

    path = build_sd21_base(tmp_path / "sd", scale="small")
    names = {p.name for p in path.iterdir()}
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= names
    assert not list(path.rglob("*.bin")) and list((path / "unet").glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True)
    assert pipe.tokenizer.model_max_length == 77 and pipe.scheduler.config.steps_offset == 1
    net = M2MUNet.from_stable_diffusion(path, M2MConfig.preset("paper", "self"))
    assert net.config.block_out_channels == (32, 32, 64, 64) and net.config.variant == "self"


def test_small_dinov2_folder_gives_257_tokens(tmp_path):
    from m2m_pipeline.encoders import DinoEncoder

    path = build_dinov2_giant(tmp_path / "dino", scale="small")
    assert json.loads((path / "config.json").read_text())["use_swiglu_ffn"] is True
    encoder = DinoEncoder.from_pretrained(path)
    tokens = encoder.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert tokens.shape == (2, 257, 1536)  # resize 256, crop 224, patch 14: CLS + 16 x 16; giant's width
