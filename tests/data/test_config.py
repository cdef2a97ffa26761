"""MIS presets: one place per default, validated on construction."""

from __future__ import annotations

import dataclasses

import pytest

from m2m_pipeline.data import MIS_PRESETS, MISConfig, get_preset


def test_presets():
    assert set(MIS_PRESETS) == {"tiny", "demo", "paper"}
    paper = get_preset("paper")
    assert (paper.generator, paper.model_name, paper.resolution, paper.images_per_set) == (
        "stable-diffusion", "stabilityai/stable-diffusion-2-1-base", 512, 25)
    assert (paper.scheduler, paper.guidance_scale, paper.num_inference_steps, paper.max_tokens) == (
        "EulerDiscreteScheduler", 7.5, 50, 77)
    assert paper.keep_latents and paper.autoencoder == "vae"
    demo = get_preset("demo")
    assert demo.generator == "shapes" and demo.resolution == 32 and demo.num_captions // demo.sets_per_shard >= 4
    assert get_preset("tiny").resolution == 16


def test_frozen_and_validated():
    cfg = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resolution = 8  # type: ignore[misc]
    assert cfg.replace(resolution=24).resolution == 24
    with pytest.raises(ValueError, match="images_per_set"):
        cfg.replace(images_per_set=0)
    with pytest.raises(ValueError, match="test_fraction"):
        MISConfig(name="x", test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown MIS preset 'huge'"):
        get_preset("huge")
