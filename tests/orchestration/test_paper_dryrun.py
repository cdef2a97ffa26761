"""`make paper-dryrun`'s small-shape twin: the Dagster paper job's own ops, in-process, on random weights in the
released SD-2.1-base / DINOv2-giant layouts (narrow networks, the paper's 512 px), through both checkpoints."""

from __future__ import annotations

import json

import pytest

from m2m_pipeline.orchestration import dryrun


def test_dryrun_captions_cover_every_split():
    from m2m_pipeline.data.captions import caption_hash, split_of
    from m2m_pipeline.data.shapes import attributes_of
    from m2m_pipeline.data.tokens import normalise_caption

    captions = dryrun.split_captions(0.001, 0.001)
    splits = [split_of(caption_hash(normalise_caption(c)), 0.001, 0.001) for c in captions]
    assert splits == ["train", "validation", "test", "test"]
    assert all(attributes_of(c) for c in captions)  # the shapes oracle parses them


def test_dryrun_settings_are_checked():
    from m2m_pipeline.orchestration.resources import M2MSettings

    with pytest.raises(ValueError, match="eval_preset: unknown preset 'nope'"):
        M2MSettings(eval_preset="nope")
    with pytest.raises(ValueError, match="mis.images: not a MISConfig field"):
        M2MSettings(mis={"images": 6})


@pytest.mark.slow
def test_small_paper_dryrun_through_training(tmp_path, capsys):
    stages = ["raw_captions", "filtered_captions", "mis_shards", "feature_caches", "m2m_self_checkpoint",
              "m2m_dino_checkpoint"]
    assert dryrun.main(["--out", str(tmp_path), "--scale", "small", "--device", "cpu", "--stages", *stages]) == 0
    table = capsys.readouterr().out
    assert all(f"| {s} |" in table for s in stages) and "(failed)" not in table
    mis = json.loads(next((tmp_path / "assets/paper/mis/train").glob("mis-*.json")).read_text())
    features = json.loads(next((tmp_path / "assets/paper/features/train").glob("mis-*.json")).read_text())
    assert mis["num_samples"] == 1 and features["dino_features"] == "online" and features["dino_shape"] is None
    assert features["latents_shape"] == [6, 4, 64, 64]  # 6 images per set at 512 px through the SD-layout VAE
    dino = json.loads((tmp_path / "models/paper/m2m_dino/final/config.json").read_text())
    assert dino["encoder_spec"]["dino_path"] == str(tmp_path / "models/dinov2-giant")
    assert (tmp_path / "models/paper/m2m_self/final/model.safetensors").is_file()
