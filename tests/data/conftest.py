"""Shared fixtures for the MIS data tests: the tricky caption TSV, a tiny SD folder, a tiny MIS build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2m_pipeline.data import (  # noqa: E402
    Caption,
    build_feature_shards,
    filter_captions,
    generate_mis,
    get_preset,
    make_generator,
    write_shapes_caption_tsv,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session")
def tricky_tsv() -> Path:
    return FIXTURES / "captions_tricky.tsv"


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    from m2m_pipeline.data.tiny_sd import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def sd_generator(tiny_sd_path):
    from m2m_pipeline.data.stable_diffusion import StableDiffusionSetGenerator

    # 4 steps keep the suite fast; the default (50) is asserted separately on an unused instance.
    return StableDiffusionSetGenerator.from_pretrained(tiny_sd_path, resolution=16, num_inference_steps=4,
                                                       keep_latents=True, device="cpu")


SD_CAPTIONS = [Caption("aaaa0001", "a red dog on a beach"), Caption("aaaa0002", "a blue cat sleeping on a sofa")]


@pytest.fixture
def sd_captions() -> list[Caption]:
    return list(SD_CAPTIONS)


@pytest.fixture
def shapes_captions() -> list[Caption]:
    return [
        Caption("c0", "a red triangle on a striped purple background"),
        Caption("c1", "an image of a blue circle over a plain black backdrop"),
        Caption("c2", "white cross, checkered grey background"),
        Caption("c3", "a picture showing a yellow square in front of a dotted brown wall"),
        Caption("c4", "a green circle on a plain grey background"),
    ]


@pytest.fixture(scope="session")
def tiny_mis(tmp_path_factory, tiny_cfg) -> dict[str, Path]:
    """A complete tiny MIS build (captions -> shards -> features), shared read-only by many tests."""
    root = tmp_path_factory.mktemp("tiny-mis")
    write_shapes_caption_tsv(root / "captions.tsv", tiny_cfg.num_captions, tiny_cfg.seed)
    filter_captions(root / "captions.tsv", root / "captions.jsonl", tiny_cfg, progress=False)
    generate_mis(root / "captions.jsonl", root / "mis", make_generator(tiny_cfg), tiny_cfg, progress=False)
    build_feature_shards(root / "mis", root / "features", tiny_cfg, device="cpu", progress=False)
    return {"root": root, "table": root / "captions.jsonl", "mis": root / "mis", "features": root / "features"}
