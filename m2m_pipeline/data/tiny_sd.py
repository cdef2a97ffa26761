"""A tiny random Stable Diffusion folder (diffusers layout) for tests and CPU benchmarks.

Same component classes and tokenizer as SD 2.1-base (the real CLIP BPE from open_clip's package, so
prompts tokenize exactly as with the real model), with widths small enough to run in milliseconds.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch


def write_clip_tokenizer_files(directory: Path) -> None:
    """vocab.json + merges.txt of CLIP's BPE, rebuilt from the copy bundled with open_clip (no hub)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    tokenizer = SimpleTokenizer()
    vocab = dict(tokenizer.encoder)
    # HF names the special tokens <|startoftext|>/<|endoftext|>; open_clip <start_of_text>/<end_of_text>.
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def random_clip_text_encoder(hidden_size: int, layers: int = 2, heads: int = 4):
    """A randomly initialised CLIPTextModel with CLIP's vocabulary and 77 positions (SD's text encoder, small)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="gelu",
    ))


def clip_tokenizer(scratch: Path):
    """SD's CLIPTokenizer (the real BPE, 77 tokens) built in `scratch` from open_clip's copy; `scratch` is emptied."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(scratch)
    tokenizer = CLIPTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return tokenizer


def build_tiny_stable_diffusion(path: str | os.PathLike, seed: int = 0, sample_size: int = 8) -> Path:
    """Save a random SD pipeline to `path`: 8x8 latents (16 px images), 2-level U-Net, 2-layer CLIP."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        norm_num_groups=8, use_linear_projection=True,
    )
    with torch.no_grad():
        # Small output head, as ADM/DiT zero-initialise theirs: the untrained model's noise predictions are
        # then O(0.03) like a trained model's guidance term, instead of O(0.3) amplified 7.5x by CFG.
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2,
    )
    text_encoder = random_clip_text_encoder(32)
    tokenizer = clip_tokenizer(path / "_tokenizer_src")
    # SD 2.1-base ships a PNDM config; the generator swaps in Euler from it, as Sec. 4 does.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path
