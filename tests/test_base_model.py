"""The CPU presets' text-to-image model: an SD pipeline folder that M2M starts from through the paper's loader."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from m2m_pipeline.autoencoder import AutoencoderConfig, train_autoencoder
from m2m_pipeline.base_model import (
    GRID_NAME,
    REPORT_NAME,
    BaseModelConfig,
    caption_accuracy,
    heldout_captions,
    read_report,
    train_base_model,
)
from m2m_pipeline.network import M2MConfig, M2MUNet


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    train_autoencoder(AutoencoderConfig.preset("tiny", steps=4), root / "autoencoder", progress=False)
    report = train_base_model(BaseModelConfig.preset("tiny", steps=6), root / "autoencoder", root / "base",
                              progress=False)
    return root, report


def test_saved_as_a_stable_diffusion_pipeline_folder(tiny_base):
    from diffusers import StableDiffusionPipeline

    root, report = tiny_base
    base = root / "base"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base / part).is_dir(), part
    assert not list(base.rglob("*.bin")) and not list(base.rglob("*.pkl"))  # safetensors + JSON only
    assert (base / GRID_NAME).is_file() and read_report(base)["steps"] == 6 == report["steps"]
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True, safety_checker=None)
    image = pipe(heldout_captions(BaseModelConfig.preset("tiny"))[:1], num_inference_steps=2,
                 output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    # the vae/ it carries is the autoencoder it was trained with, byte for byte
    assert (base / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (root / "autoencoder/vae/diffusion_pytorch_model.safetensors").read_bytes()


def test_m2m_starts_from_every_base_weight_but_the_image_set_attention(tiny_base):
    root, _ = tiny_base
    for variant in ("self", "dino"):
        preset = M2MConfig.preset("tiny-latent", variant)
        net = M2MUNet.from_stable_diffusion(root / "base", preset)
        assert net.config == preset  # the base is the preset's own U-Net: nothing of the M2M config changes
        base = load_file(str(root / "base/unet/diffusion_pytorch_model.safetensors"))
        ours = net.unet.state_dict()
        shared = [k for k in ours if ".attn2." not in k]
        assert shared and all(torch.equal(ours[k], base[k]) for k in shared)
        assert {k for k in base if ".attn2." not in k} == set(shared)  # nothing of the base left out


def test_training_learns_and_uses_the_budget(tmp_path, tiny_base):
    root, first = tiny_base
    history = train_base_model(BaseModelConfig.preset("tiny", steps=40, log_every=10), root / "autoencoder",
                               tmp_path / "b", progress=False)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    capped = train_base_model(BaseModelConfig.preset("tiny", steps=10_000, max_seconds=0.5), root / "autoencoder",
                              tmp_path / "c", progress=False)
    assert 0 < capped["steps"] < 10_000


def test_caption_accuracy_reads_the_named_attributes():
    from m2m_pipeline.data.shapes import VOCABULARIES, attributes_of

    class Perfect:  # the oracle's interface; reads the true labels back from a lookup
        attributes = tuple(VOCABULARIES)

        def predict(self, images):
            return {name: labels[:, i] for i, name in enumerate(VOCABULARIES)}

    captions = heldout_captions(BaseModelConfig.preset("tiny"))
    labels = torch.tensor([[attributes_of(c)[n] for n in VOCABULARIES] for c in captions])
    images = torch.zeros(len(captions), 3, 16, 16)
    assert caption_accuracy(Perfect(), images, captions) == {name: 1.0 for name in VOCABULARIES}
    labels = torch.roll(labels, 1, dims=0)  # every caption judged against another's attributes
    assert caption_accuracy(Perfect(), images, captions)["shape"] < 1.0


def test_bad_config_and_missing_report_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="BaseModelConfig.batch_size"):
        BaseModelConfig.preset("tiny", batch_size=0)
    with pytest.raises(ValueError, match="unknown base-model preset"):
        BaseModelConfig.preset("huge")
    with pytest.raises(FileNotFoundError, match="no trained base model"):
        read_report(tmp_path)


def test_cli_trains_and_reports(tmp_path, tiny_base):
    from m2m_pipeline.cli import main

    root, _ = tiny_base
    res = CliRunner().invoke(main, ["train-base-model", "--preset", "tiny", "--autoencoder", str(root / "autoencoder"),
                                    "--out", str(tmp_path / "cli"), "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert "base model: 3 steps" in res.output
    assert json.loads((tmp_path / "cli" / REPORT_NAME).read_text())["steps"] == 3
