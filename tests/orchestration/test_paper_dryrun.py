"""`make paper-dryrun`'s small-shape twin: the Dagster paper job's own ops, in-process, on random weights in the
released SD-2.1-base / DINOv2-giant layouts (narrow networks, the paper's 512 px), through both checkpoints."""

from __future__ import annotations

import json

import pytest

from m2m_pipeline.orchestration import dryrun


def test_dryrun_captions_cover_every_split_and_are_not_the_shapes_grammar():
    from m2m_pipeline.data.captions import caption_hash, split_of
    from m2m_pipeline.data.shapes import attributes_of
    from m2m_pipeline.data.tokens import normalise_caption

    captions = dryrun.split_captions(0.001, 0.001)
    splits = [split_of(caption_hash(normalise_caption(c)), 0.001, 0.001) for c in captions]
    assert splits == ["train", "validation", "test", "test"]
    for caption in captions:  # ordinary real-world text: the shapes grammar cannot parse any of it
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            attributes_of(caption)


def test_dryrun_runs_every_op_of_the_paper_job():
    """The stage list is the job's own op list: an asset added to the paper profile joins the dry run."""
    from m2m_pipeline.definitions import defs

    ops = {node.name.removeprefix("paper__") for node in defs.resolve_job_def("m2m_paper_job").graph.nodes}
    stages = dryrun.job_stages()
    assert set(stages) == ops and len(stages) == len(ops)
    # the chain's ends and the stages this dry run exists for are there
    for op in ("raw_captions", "mis_shards", "feature_caches", "m2m_self_checkpoint", "m2m_dino_checkpoint",
               "m2m_self_evaluation_report", "m2m_dino_evaluation_report", "coco_zero_shot", "nvs_checkpoint",
               "procedure_checkpoint", "nvs_evaluation", "procedure_evaluation", "dataset_version"):
        assert op in stages, op
    assert stages.index("mis_shards") < stages.index("feature_caches") < stages.index("m2m_dino_checkpoint") \
        < stages.index("m2m_dino_evaluation_report")
    assert not {"attribute_oracle", "learnability"} & ops  # the shapes world has no place in the paper job


def test_dryrun_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit):
        dryrun.main(["--out", "/nonexistent-dryrun", "--stages", "nope"])
    assert "'nope' is not an op of m2m_paper_job" in capsys.readouterr().err


def test_dryrun_settings_are_checked():
    from m2m_pipeline.orchestration.resources import M2MSettings

    with pytest.raises(ValueError, match="eval_preset: unknown preset 'nope'"):
        M2MSettings(eval_preset="nope")
    with pytest.raises(ValueError, match="mis.images: not a MISConfig field"):
        M2MSettings(mis={"images": 6})


@pytest.mark.slow
def test_small_paper_dryrun_runs_the_whole_job(tmp_path, capsys):
    """CI's twin of `make paper-dryrun`: every op of m2m_paper_job, small shapes, on real-world captions."""
    assert dryrun.main(["--out", str(tmp_path), "--scale", "small", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {s} |" in table for s in dryrun.job_stages()) and "(failed)" not in table
    mis = json.loads(next((tmp_path / "assets/paper/mis/train").glob("mis-*.json")).read_text())
    features = json.loads(next((tmp_path / "assets/paper/features/train").glob("mis-*.json")).read_text())
    assert mis["num_samples"] == 1 and features["dino_features"] == "online" and features["dino_shape"] is None
    assert features["latents_shape"] == [6, 4, 64, 64]  # 6 images per set at 512 px through the SD-layout VAE
    dino = json.loads((tmp_path / "models/paper/m2m_dino/final/config.json").read_text())
    assert dino["encoder_spec"]["dino_path"] == str(tmp_path / "models/dinov2-giant")
    assert (tmp_path / "models/paper/m2m_self/final/model.safetensors").is_file()
    for variant in ("self", "dino"):  # Table 1's row per variant, from Inception and CLIP, no oracle
        report = json.loads((tmp_path / f"assets/paper/evaluation/m2m_{variant}/report.json").read_text())
        assert report["kind"] == "paper" and set(report["table1"]) == {"FID", "IS", "CLIP-T", "CLIP-I"}
        per = report["report"]["per_position"]
        assert set(per) == {"fid", "inception_score", "clip_text_image", "clip_image_image"}
        assert all(len(values) == 1 for values in per.values())  # the dryrun preset's one position
        assert report["report"]["provenance"]["window"] == 4 and report["report"]["provenance"]["anchors"] == 0
        assert "oracle" not in json.dumps(report).lower() and "verdict" not in report
        coco = json.loads((tmp_path / f"assets/paper/evaluation/coco_zero_shot/m2m_{variant}/report.json").read_text())
        assert coco["variant"] == variant and coco["clip_image_image"]
    for task in ("nvs", "procedure"):  # both task fine-tunes (Figs. 7-8) trained and evaluated
        assert (tmp_path / f"models/paper/{task}/final/model.safetensors").is_file()
        assert json.loads((tmp_path / f"assets/paper/evaluation/{task}/metrics.json").read_text())
