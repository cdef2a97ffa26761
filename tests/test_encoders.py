"""Encoders load with from_pretrained(local path); tiny random models saved with save_pretrained."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from m2m_pipeline.encoders import (
    DinoEncoder,
    PixelAutoencoder,
    VaeAutoencoder,
    load_autoencoder,
)
from m2m_pipeline.weights import WeightsNotFoundError


def test_pixel_autoencoder_is_identity():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    ae = load_autoencoder("pixel")
    assert isinstance(ae, PixelAutoencoder) and torch.equal(ae.decode(ae.encode(x)), x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.rand(2, 8, 8))


def test_vae_wrapper_uses_config_scaling_factor(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    ae = VaeAutoencoder.from_pretrained(tmp_path)
    assert ae.scaling_factor == 0.5 and ae.latent_channels == 4 and ae.downsample == 2
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (1, 4, 8, 8)
    torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * 0.5)
    assert ae.decode(z).shape == (1, 3, 16, 16)


def test_dino_wrapper_matches_image_processor(tmp_path):
    cfg = Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    Dinov2Model(cfg).save_pretrained(tmp_path)
    proc = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                             do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc.save_pretrained(tmp_path)
    enc = DinoEncoder.from_pretrained(tmp_path)
    assert enc.image_size == 28 and enc.resize_size == 32 and enc.num_tokens == 5 and enc.hidden_size == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # already at the resize size: preprocessing = crop + normalise
    ours = enc.preprocess(x)
    theirs = proc(images=list(((x + 1) / 2).clamp(0, 1)), return_tensors="pt", do_rescale=False)["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert enc.encode(x).shape == (2, 5, 32)


def test_random_dino_is_seeded():
    a, b = DinoEncoder.random(seed=3), DinoEncoder.random(seed=3)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x)) and a.encode(x).shape == (1, 17, 96)


def test_missing_paths_say_no_download(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not download"):
        VaeAutoencoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(WeightsNotFoundError, match="does not download"):
        DinoEncoder.from_pretrained("facebook/dinov2-giant-not-here")
