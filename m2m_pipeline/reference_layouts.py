"""Random-weight folders in the exact layouts of `stabilityai/stable-diffusion-2-1-base` and
`facebook/dinov2-giant`, for the paper-shape dry run (`make paper-dryrun`), the GPU check
(`benchmarks/gpu_check.py`) and their CI tests, where no hub and no real weights exist.

The paper's scorers too: `build_inception` (clean-fid's Inception torchscript file) and `build_open_clip`
(an open_clip CLIP in safetensors), so the paper profile's evaluation runs through the real loaders.

`scale="full"` uses the published architectures (the U-Net is the paper preset's, `M2MConfig.preset("paper")`,
whose U-Net fields are SD-2.1-base's — one home; the VAE, CLIP text encoder, scheduler and DINOv2-giant
configs below are copied from the released config files). `scale="small"` keeps every component class, file
and key of the layout with narrow widths, so the same loaders run in seconds. Weights are random: timings and
memory are those of the real models, outputs are noise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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


# --- The paper's scorers (docs/evaluation.md, Sec. 8.4): clean-fid's Inception and an open_clip CLIP
class InceptionTorchScript(nn.Module):
    """clean-fid's view of the StyleGAN2-ADA Inception file (see build_inception)."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        features = self.layers(x).reshape(x.shape[0], 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


def build_inception(path: str | os.PathLike, scale: Scale = "full", seed: int = 0) -> Path:
    """A random-weight TorchScript file `<path>/inception-2015-12-05.pt` with the interface clean-fid's
    `InceptionV3W` uses on the released StyleGAN2-ADA file: `torch.jit.load`, `.layers(x)` on 299 px inputs
    normalised to [-1, 1] -> (B, 2048, 1, 1) pool features, and `forward(img, return_features=False,
    use_fp16=False, no_output_bias=False)` on [0, 255] images (resized to 299 inside) -> 1008-way softmax
    probabilities (or the 2048-d features). "full": torchvision's Inception-v3 trunk (Conv2d_1a .. Mixed_7c +
    average pool, the released architecture's size); "small": a tiny conv net with the same outputs.
    TorchScript is the format clean-fid loads (the released file is one); nothing here is pickled by us."""
    from m2m_pipeline.evaluation.fid import INCEPTION_FILE
    from m2m_pipeline.io import atomic_write_bytes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if scale == "full":
            from torchvision.models import inception_v3

            m = inception_v3(weights=None, aux_logits=False, init_weights=True)
            layers = nn.Sequential(m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1, m.Conv2d_3b_1x1,
                                   m.Conv2d_4a_3x3, m.maxpool2, m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a,
                                   m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e, m.Mixed_7a, m.Mixed_7b,
                                   m.Mixed_7c, m.avgpool)
        else:
            layers = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.ReLU(), nn.Conv2d(8, 2048, 1),
                                   nn.AdaptiveAvgPool2d(1))
        module = torch.jit.script(InceptionTorchScript(layers).eval())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.jit.save(module, buf)
    atomic_write_bytes(path / INCEPTION_FILE, buf.getvalue())
    return path / INCEPTION_FILE


# docs/evaluation.md: the paper does not name its CLIP; the reports use OpenAI's ViT-L/14 (open_clip's
# "ViT-L-14-quickgelu": OpenAI trained it with QuickGELU) - the model CLIP scores are usually computed with.
PAPER_CLIP_MODEL = "ViT-L-14-quickgelu"
# "small": every open_clip CLIP part (ViT image tower, text transformer, projections) at toy widths.
SMALL_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class ClipWeights(NamedTuple):
    """What `ClipScorer` (and settings.clip_model / clip_pretrained) take to load a built CLIP."""

    model: str               # an open_clip model name, or local-dir:/path
    pretrained: Path | None  # the weights file for a model name; None with local-dir:


def build_open_clip(path: str | os.PathLike, model: str = PAPER_CLIP_MODEL, scale: Scale = "full",
                    seed: int = 0) -> ClipWeights:
    """A random-init open_clip model saved locally in safetensors (open_clip's load_checkpoint reads
    .safetensors; no pickle): `<path>/open_clip_model.safetensors` + `<path>/open_clip_config.json`.
    "full": `open_clip.create_model(model)`, loadable as (model, pretrained=<the file>) like downloaded
    weights; "small": the SMALL_CLIP config, loadable as model='local-dir:<path>'."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from m2m_pipeline.io import atomic_write_bytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if scale == "full":
            cfg = open_clip.get_model_config(model)
            if cfg is None:
                raise ValueError(f"open_clip has no model config {model!r}; choose from open_clip.list_models()")
            net = open_clip.create_model(model, pretrained=None)
        else:
            cfg = SMALL_CLIP
            net = open_clip.CLIP(**SMALL_CLIP)
    weights = path / "open_clip_model.safetensors"
    tmp = path / ".open_clip_model.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    atomic_write_bytes(path / "open_clip_config.json",
                       json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=1).encode())
    return ClipWeights(model, weights) if scale == "full" else ClipWeights(f"local-dir:{path}", None)
