"""Random-weight folders in the exact layouts of `stabilityai/stable-diffusion-2-1-base` and
`facebook/dinov2-giant`, for the paper-shape dry run (`make paper-dryrun`), the GPU check
(`benchmarks/gpu_check.py`) and their CI tests, where no hub and no real weights exist.

`scale="full"` uses the published architectures (the U-Net is the paper preset's, `M2MConfig.preset("paper")`,
whose U-Net fields are SD-2.1-base's — one home; the VAE, CLIP text encoder, scheduler and DINOv2-giant
configs below are copied from the released config files). `scale="small"` keeps every component class, file
and key of the layout with narrow widths, so the same loaders run in seconds. Weights are random: timings and
memory are those of the real models, outputs are noise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

Scale = Literal["full", "small"]

# --- SD-2.1-base's released component configs (vae/, text_encoder/, scheduler/ config.json)
SD21_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768)
SD21_TEXT: dict[str, Any] = dict(  # OpenCLIP ViT-H/14's text tower, penultimate layer (23 of 24 kept)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    projection_dim=512, max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
    pad_token_id=1)
SD21_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon")
# --- facebook/dinov2-giant config.json and preprocessor_config.json
DINOV2_GIANT: dict[str, Any] = dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True,
    patch_size=14, image_size=518, layerscale_value=1.0, drop_path_rate=0.0, layer_norm_eps=1e-6)
DINOV2_PROCESSOR: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 224, "width": 224},
    do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def sd21_unet_kwargs(scale: Scale) -> dict[str, Any]:
    from m2m_pipeline.network import M2MConfig

    kw = M2MConfig.preset("paper").unet_kwargs()
    if scale == "small":  # same block types and levels, narrow
        kw.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4], norm_num_groups=8,
                  cross_attention_dim=64, sample_size=8, layers_per_block=1)
    return kw


def build_sd21_base(path: str | os.PathLike, scale: Scale = "full", seed: int = 0) -> Path:
    """A random StableDiffusionPipeline folder laid out like stable-diffusion-2-1-base (unet/, vae/,
    text_encoder/, tokenizer/, scheduler/, model_index.json; safetensors)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from m2m_pipeline.data.tiny_sd import clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    vae_kw, text_kw = dict(SD21_VAE), dict(SD21_TEXT)
    if scale == "small":
        vae_kw.update(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1, sample_size=64)
        text_kw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=32)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_kw), text_encoder=CLIPTextModel(CLIPTextConfig(**text_kw)),
        tokenizer=clip_tokenizer(path / "_tokenizer_src"), unet=UNet2DConditionModel(**sd21_unet_kwargs(scale)),
        scheduler=PNDMScheduler(**SD21_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def build_dinov2_giant(path: str | os.PathLike, scale: Scale = "full", seed: int = 0) -> Path:
    """A random Dinov2Model folder laid out like facebook/dinov2-giant (config.json, model.safetensors,
    preprocessor_config.json: resize 256, centre crop 224 -> 257 tokens)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = Path(path)
    kw = dict(DINOV2_GIANT)
    if scale == "small":  # one layer, giant's width: the tokens M2M-DINO's paper preset expects (257 x 1536)
        kw.update(num_hidden_layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**kw))
    model.save_pretrained(path, safe_serialization=True)
    BitImageProcessor(**DINOV2_PROCESSOR).save_pretrained(path)
    return path
