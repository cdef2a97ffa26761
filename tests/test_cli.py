"""The `m2m` console script end to end on the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from m2m_pipeline.cli import main


def test_help_documents_every_option():
    runner = CliRunner()
    for cmd in ("train", "generate", "demo"):
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
