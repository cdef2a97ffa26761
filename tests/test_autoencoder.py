"""The CPU presets' autoencoder: trained, saved as an SD-style `vae/` folder, loaded by the paper's loader."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from m2m_pipeline.autoencoder import (
    GRID_NAME,
    REPORT_NAME,
    AutoencoderConfig,
    oracle_reconstruction_accuracy,
    read_report,
    train_autoencoder,
)
from m2m_pipeline.data.config import get_preset
from m2m_pipeline.data.features import encoder_tag
from m2m_pipeline.data.shapes import render_dataset
from m2m_pipeline.encoders import VaeAutoencoder, load_autoencoder
from m2m_pipeline.network import M2MConfig


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "autoencoder"
    report = train_autoencoder(AutoencoderConfig.preset("tiny", steps=4), out, progress=False)
    return out, report


def test_saved_as_a_stable_diffusion_style_folder_and_loaded_by_the_paper_loader(tiny_autoencoder):
    out, report = tiny_autoencoder
    assert (out / "vae" / "config.json").is_file() and (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))  # safetensors + JSON only
    assert (out / GRID_NAME).is_file() and read_report(out)["steps"] == 4 == report["steps"]
    ae = load_autoencoder("vae", out)  # the same call the feature caches make for SD's VAE
    assert isinstance(ae, VaeAutoencoder) and ae.downsample == 4 and ae.latent_channels == 4
    x, _ = render_dataset(8, 16, seed=5)
    z = ae.encode(x)
    assert z.shape == (8, 4, 4, 4) and ae.decode(z).shape == (8, 3, 16, 16)


def test_scaling_factor_gives_unit_variance_latents(tiny_autoencoder):
    out, report = tiny_autoencoder
    ae = VaeAutoencoder.from_pretrained(out)
    assert ae.scaling_factor == pytest.approx(report["scaling_factor"])
    # measured on the held-out images; other images of the same world come out close to unit variance too
    x, _ = render_dataset(256, 16, seed=11)
    assert 0.8 < float(ae.encode(x).std()) < 1.25


def test_training_is_seeded(tmp_path):
    cfg = AutoencoderConfig.preset("tiny", steps=2, train_images=64, heldout_images=16)
    a = train_autoencoder(cfg, tmp_path / "a", progress=False)
    b = train_autoencoder(cfg, tmp_path / "b", progress=False)
    assert a["heldout_mse"] == b["heldout_mse"] and a["scaling_factor"] == b["scaling_factor"]


def test_training_lowers_the_reconstruction_error(tmp_path):
    cfg = AutoencoderConfig.preset("tiny", train_images=256, heldout_images=64)
    short = train_autoencoder(cfg.__class__(**{**cfg.to_dict(), "steps": 1}), tmp_path / "a", progress=False)
    longer = train_autoencoder(cfg.__class__(**{**cfg.to_dict(), "steps": 60, "lr": 3e-3}), tmp_path / "b",
                               progress=False)
    assert longer["heldout_mse"] < 0.7 * short["heldout_mse"]


def test_presets_match_the_networks_that_diffuse_their_latents():
    for ae_preset, net_preset in (("tiny", "tiny-latent"), ("demo", "demo")):
        ae, net = AutoencoderConfig.preset(ae_preset), M2MConfig.preset(net_preset)
        assert net.autoencoder == "vae" and ae.image_size == net.image_size
        assert ae.latent_shape == (net.in_channels, net.sample_size, net.sample_size)


def test_bad_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="image_size"):
        AutoencoderConfig(image_size=30, block_out_channels=(8, 16, 16))
    with pytest.raises(ValueError, match="steps"):
        AutoencoderConfig(steps=0)
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        AutoencoderConfig.preset("huge")


def test_feature_cache_tag_follows_the_autoencoder_weights(tiny_autoencoder, tmp_path):
    out, _ = tiny_autoencoder
    cfg = get_preset("tiny").replace(autoencoder="vae", autoencoder_path=str(out))
    before = encoder_tag(cfg)
    assert "missing" not in before
    retrained = tmp_path / "retrained"
    train_autoencoder(AutoencoderConfig.preset("tiny", steps=1, seed=1), retrained, progress=False)
    assert encoder_tag(cfg.replace(autoencoder_path=str(retrained))) != before  # a new autoencoder: stale caches


def test_oracle_reconstruction_accuracy_reports_both(tiny_autoencoder):
    from m2m_pipeline.evaluation.oracle import train_oracle

    out, _ = tiny_autoencoder
    oracle = train_oracle(16, out_dir=None, progress=False, min_accuracy=None, train_images=128,
                          heldout_images=32, epochs=1)
    res = oracle_reconstruction_accuracy(out, oracle, num_images=64)
    assert set(res["reconstruction"]) == set(res["original"]) == set(oracle.attributes)
    assert res["images"] == 64 and all(0.0 <= v <= 1.0 for v in res["reconstruction"].values())


def test_cli_trains_and_reports(tmp_path):
    from m2m_pipeline.cli import main

    out = tmp_path / "ae"
    result = CliRunner().invoke(main, ["train-autoencoder", "--preset", "tiny", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out PSNR" in result.output and json.loads((out / REPORT_NAME).read_text())["steps"] == 2
    bad = CliRunner().invoke(main, ["train-autoencoder", "--preset", "tiny", "--steps", "0", "--out", str(out)])
    assert bad.exit_code == 2 and "--steps" in bad.output


def test_decode_of_encode_is_close_after_training(tmp_path):
    """Not a quality bar (that is the demo's 99% oracle check): the round trip is a real reconstruction."""
    cfg = AutoencoderConfig.preset("tiny", steps=80, lr=3e-3, train_images=256, heldout_images=64)
    train_autoencoder(cfg, tmp_path / "ae", progress=False)
    ae = VaeAutoencoder.from_pretrained(tmp_path / "ae")
    x, _ = render_dataset(32, 16, seed=3)
    assert torch.nn.functional.mse_loss(ae.decode(ae.encode(x)), x) < torch.nn.functional.mse_loss(
        torch.zeros_like(x) + x.mean(), x)
