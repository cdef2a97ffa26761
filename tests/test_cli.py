"""The `m2m` console script end to end on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from m2m_pipeline.cli import main


def test_help_documents_every_option():
    runner = CliRunner()
    for cmd in ("train", "generate", "demo", "evaluate"):
        result = runner.invoke(main, [cmd, "--help"])
        assert result.exit_code == 0
    gen_help = runner.invoke(main, ["generate", "--help"]).output
    for opt in ("--checkpoint", "--context", "--num-images", "--guidance", "--window", "--seed", "--out"):
        assert opt in gen_help


@pytest.mark.slow
def test_train_then_generate_from_user_images(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--preset", "tiny", "--variant", "dino", "--steps", "6", "--out",
                             str(tmp_path / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ckpt = tmp_path / "run" / "final"
    assert (ckpt / "model.safetensors").is_file()
    # The user's own images: any size, any mode (greyscale, RGBA).
    imgs = tmp_path / "mine"
    imgs.mkdir()
    Image.fromarray(np.random.randint(0, 255, (40, 60), dtype=np.uint8), "L").save(imgs / "a.png")
    Image.fromarray(np.random.randint(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(imgs / "b.png")
    r = runner.invoke(main, ["generate", "--checkpoint", str(ckpt), "--context", str(imgs), "-k", "2", "--steps",
                             "3", "--out", str(tmp_path / "gen")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "gen" / "grid.png").is_file() and (tmp_path / "gen" / "generated_001.png").is_file()


def test_generate_bad_context_path(tmp_path):
    from m2m_pipeline.network import M2MConfig, M2MUNet

    M2MUNet(M2MConfig.preset("tiny")).save_pretrained(tmp_path / "ckpt")
    r = CliRunner().invoke(main, ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--context",
                                  str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "nothing" in r.output


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "P", "P-transparent", "RGBA", "LA", "CMYK", "RGB"])
def test_generate_reads_any_image_mode(tmp_path, mode):
    """User images of any size and mode become (1, n, 3, S, S) in [-1, 1] with the right content."""
    from m2m_pipeline.cli import _read_images

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit: same picture, 65535 full scale
    elif mode == "P-transparent":
        img = Image.fromarray(np.stack([grey] * 3, -1)).convert("P")
        img.info["transparency"] = 0
    else:  # RGBA / LA come out fully opaque: the same picture as the grey one
        img = Image.fromarray(grey).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    x, files = _read_images([tmp_path], 16)
    assert files == [path] and x.shape == (1, 1, 3, 16, 16)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    if mode in ("L", "I;16", "RGBA", "LA", "RGB"):  # lossless modes: the same picture as the 8-bit grey one
        ref, _ = _read_images([_save(tmp_path / "ref", Image.fromarray(grey))], 16)
        assert torch.allclose(x, ref, atol=2 / 255)


def _save(folder, img):
    folder.mkdir()
    img.save(folder / "ref.png")
    return folder


def test_transparent_pixels_become_white(tmp_path):
    from m2m_pipeline.cli import _read_images

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    x, _ = _read_images([tmp_path / "t.png"], 8)
    assert torch.allclose(x, torch.ones_like(x))


def test_mis_stage_commands_chain_without_dagster(tmp_path):
    """`m2m captions` -> `m2m mis` (two workers, a shard range) -> `m2m features`: the same shards and manifests
    the library functions write, the encoders recorded."""
    import json as _json

    from click.testing import CliRunner

    from m2m_pipeline.cli import main
    from m2m_pipeline.data import read_manifest

    runner = CliRunner()
    table = tmp_path / "captions.jsonl"
    r = runner.invoke(main, ["captions", "--preset", "tiny", "--out", str(table)])
    assert r.exit_code == 0 and "kept 16 of 16" in r.output, r.output
    for rank in (0, 1):
        r = runner.invoke(main, ["mis", "--preset", "tiny", "--captions", str(table), "--out", str(tmp_path / "mis"),
                                 "--shards", "0:2", "--rank", str(rank), "--world-size", "2"])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "mis").glob("*.tar")) == ["mis-000000.tar", "mis-000001.tar"]
    r = runner.invoke(main, ["features", "--preset", "tiny", "--mis", str(tmp_path / "mis"), "--out",
                             str(tmp_path / "features")])
    assert r.exit_code == 0, r.output
    assert _json.loads(r.stdout.splitlines()[-1])["built"] == 2
    manifest = read_manifest(tmp_path / "features" / "mis-000000.tar")
    assert manifest["encoder_spec"]["dino_random"]["seed"] == 0 and manifest["encoder_spec"]["autoencoder"] == "pixel"
    bad = runner.invoke(main, ["mis", "--preset", "tiny", "--captions", str(table), "--out", str(tmp_path / "m2"),
                               "--shards", "3:1"])
    assert bad.exit_code == 2 and "--shards" in bad.output
