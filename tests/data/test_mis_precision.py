"""compute.dtype in MIS generation (m2m_pipeline/precision.py): the SD generator's weights in that dtype."""

from __future__ import annotations

import pytest
import torch

from m2m_pipeline.data import get_preset, make_generator


def sd_config(tiny_sd_path, **changes):
    return get_preset("tiny").replace(generator="stable-diffusion", model_path=str(tiny_sd_path), resolution=16,
                                      num_inference_steps=2, images_per_set=2, **changes)


def test_bf16_generation_runs_and_is_finite(tiny_sd_path, sd_captions):
    generator = make_generator(sd_config(tiny_sd_path), device="cpu", dtype="bfloat16")
    assert generator.pipeline.unet.dtype == torch.bfloat16 and generator.generation_params()["dtype"] == "bfloat16"
    sets = generator.generate(sd_captions[:1])
    assert sets[0].images.shape == (2, 3, 16, 16) and torch.isfinite(sets[0].images).all()
    assert make_generator(sd_config(tiny_sd_path), device="cpu").pipeline.unet.dtype == torch.float32  # auto on CPU


def test_the_compute_dtype_and_the_mis_dtype_must_agree(tiny_sd_path):
    with pytest.raises(ValueError, match="MISConfig.dtype=float32 contradicts the compute dtype bfloat16"):
        make_generator(sd_config(tiny_sd_path, dtype="float32"), device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        make_generator(sd_config(tiny_sd_path), device="cpu", dtype="float16")
