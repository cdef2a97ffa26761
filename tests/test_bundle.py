"""A checkpoint knows its encoders (issue 13): training records the feature cache's EncoderSpec, every loader
rebuilds exactly those encoders, and a cache or fine-tuning data of other encoders is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from m2m_pipeline.bundle import load_bundle
from m2m_pipeline.data import get_preset
from m2m_pipeline.data.features import encoder_spec
from m2m_pipeline.data.procedural import build_procedural_mis
from m2m_pipeline.network import M2MConfig
from m2m_pipeline.training import TrainConfig, train


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _features(root, cfg):
    features = build_procedural_mis(cfg, root, splits=["train"], progress=False, device="cpu")["train"]
    return sorted(str(p) for p in features.glob("*.tar"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train feature shards of the tiny preset with the default seed 0 and with mis_seed 7 (another random DINO
    stand-in, as `settings.mis: {seed: 7}` builds in Dagster)."""
    root = tmp_path_factory.mktemp("bundle")
    seeded = get_preset("tiny").replace(seed=7)
    return {"default": _features(root / "s0", get_preset("tiny")), "seeded": _features(root / "s7", seeded),
            "seeded_cfg": seeded}


@pytest.fixture(scope="module")
def seeded_dino_checkpoint(caches, tmp_path_factory):
    """An M2M-DINO trained 2 steps on the seed-7 cache, its weights then scaled up so the output depends
    strongly on the DINO tokens (an untrained ISA's null value is zero)."""
    out = tmp_path_factory.mktemp("ckpt")
    result = train(M2MConfig.preset("tiny", "dino"), TrainConfig.preset("tiny", steps=2, checkpoint_every=0),
                   caches["seeded"], out / "run", progress=False)
    bundle = load_bundle(result.checkpoint_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in bundle.net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return bundle.net.save_pretrained(out / "noisy")


def test_checkpoint_records_the_cache_encoders(caches, seeded_dino_checkpoint):
    bundle = load_bundle(seeded_dino_checkpoint)
    assert bundle.spec == encoder_spec(caches["seeded_cfg"])
    assert bundle.spec.dino_random["seed"] == 7
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    trained_with = encoder_spec(caches["seeded_cfg"]).build_dino().encode(images)
    default = encoder_spec(get_preset("tiny")).build_dino().encode(images)
    assert (trained_with - default).abs().max() > 0.1  # the seed changes the tokens: a guess would be wrong
    assert torch.equal(bundle.dino.encode(images), trained_with)


def test_generate_conditions_on_the_training_encoder(caches, seeded_dino_checkpoint, tmp_path):
    """`m2m generate` on a mis_seed-7 checkpoint equals sampling with the seed-7 DINO stand-in, not seed 0's."""
    from m2m_pipeline.cli import main
    from m2m_pipeline.encoders import PixelAutoencoder
    from m2m_pipeline.sampling import generate_images
    from m2m_pipeline.visualize import to_uint8

    context = tmp_path / "context"
    context.mkdir()
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(context / f"{k}.png")
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(seeded_dino_checkpoint), "--context",
                                       str(context), "-k", "2", "--steps", "2", "--guidance", "3",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    cli_images = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "out" / f"generated_{k:03d}.png")))
                              for k in range(2)])

    from m2m_pipeline.cli import _read_images

    images, _ = _read_images([context], 16)
    net = load_bundle(seeded_dino_checkpoint).net

    def sample(cfg):
        out = generate_images(net, images, 2, PixelAutoencoder(), encoder_spec(cfg).build_dino(), steps=2,
                              guidance_scale=3.0, seed=0)
        return torch.from_numpy(to_uint8(out[0]))

    assert torch.equal(cli_images, sample(caches["seeded_cfg"]))
    assert not torch.equal(cli_images, sample(get_preset("tiny")))


def test_a_cache_of_other_encoders_is_refused(caches, seeded_dino_checkpoint, tmp_path):
    bundle = load_bundle(seeded_dino_checkpoint)
    bundle.check_cache(caches["seeded"])
    with pytest.raises(ValueError, match="other encoders than the checkpoint.*DINO"):
        bundle.check_cache(caches["default"])
    with pytest.raises(ValueError, match="other encoders than these feature shards"):
        train(bundle.net.config, TrainConfig.preset("tiny", steps=1, checkpoint_every=0), caches["default"],
              tmp_path / "finetune", net=bundle.net, progress=False)


def test_m2m_self_ignores_the_dino_stand_in(caches, tmp_path):
    """M2M-Self never uses DINO tokens: a cache differing only in its DINO stand-in is accepted."""
    result = train(M2MConfig.preset("tiny", "self"), TrainConfig.preset("tiny", steps=1, checkpoint_every=0),
                   caches["seeded"], tmp_path / "run", progress=False)
    bundle = load_bundle(result.checkpoint_dir)
    assert bundle.dino is None and bundle.context_encoder is None
    bundle.check_cache(caches["default"])


def test_a_checkpoint_without_a_record_falls_back_with_a_warning(tmp_path):
    from m2m_pipeline.network import M2MUNet

    path = M2MUNet(M2MConfig.preset("tiny", "dino")).save_pretrained(tmp_path / "old")
    with pytest.warns(UserWarning, match="does not record its encoders"):
        bundle = load_bundle(path)
    assert bundle.spec == encoder_spec(get_preset("tiny"))
