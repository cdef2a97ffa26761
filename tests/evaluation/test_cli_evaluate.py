"""`m2m evaluate` end to end on the tiny preset: prints the table, writes the JSON report, clear errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from m2m_pipeline.cli import main
from m2m_pipeline.evaluation import fid as fid_module

FAST = ["--sets", "2", "--generated-images", "2", "--steps", "2", "--guidance", "2", "--quiet"]


def test_evaluate_prints_table_and_writes_report(tiny_checkpoint, tiny_test_split, quick_oracle_dir, tiny_clip_dir,
                                                 tmp_path):
    out = tmp_path / "report.json"
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), "--oracle", str(quick_oracle_dir), "--clip-model",
                                  f"local-dir:{tiny_clip_dir}", "--out", str(out), *FAST], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for row in ("fid", "inception_score", "clip_text_image", "clip_image_image", "consistency_content",
                "consistency_style", "caption_agreement", "n=1", "n=2", "sets 2", "W=8 with the first 4 anchored"):  # the default policy
        assert row in r.output, row
    report = json.loads(out.read_text())
    assert len(report["per_position"]["fid"]) == 2 and report["provenance"]["num_sets"] == 2
    assert report["provenance"]["oracle"]["dir"] == str(quick_oracle_dir)
    assert (report["provenance"]["window"], report["provenance"]["anchors"]) == (8, 4)


def test_evaluate_without_inception_weights_names_the_file(tiny_checkpoint, tiny_test_split, monkeypatch, tmp_path):
    monkeypatch.setattr(fid_module, "CLEANFID_DEFAULT_DIR", tmp_path)
    monkeypatch.delenv(fid_module.INCEPTION_ENV, raising=False)
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), *FAST])
    assert r.exit_code != 0
    assert fid_module.INCEPTION_FILE in r.output and "--oracle" in r.output


def test_evaluate_bad_arguments(tiny_checkpoint, tiny_test_split):
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), "--fid-features", "oracle", *FAST])
    assert r.exit_code != 0 and "needs --oracle" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), "--generated-images", "0", "--fid-features", "none"])
    assert r.exit_code != 0 and "'--generated-images': 0 is not in the range" in r.output  # refused at parsing


def test_evaluate_report_is_the_evaluation_assets_report(tiny_checkpoint, tiny_test_split, quick_oracle_dir,
                                                         tmp_path):
    """`m2m evaluate --report smoke` prints what the smoke evaluation asset computes: the same library function
    (evaluate_checkpoint) with the profile's EvalSpec, so the same numbers for the same seeds."""
    from m2m_pipeline.evaluation.report import EVAL_PRESETS, evaluate_checkpoint
    from m2m_pipeline.orchestration.profiles import PROFILES

    assert PROFILES["smoke"].eval is EVAL_PRESETS["smoke"]  # the asset's sizes are the preset's, not a copy
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), "--oracle", str(quick_oracle_dir), "--report", "smoke",
                                  "--report-dir", str(tmp_path / "cli")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for text in ("position 1", "shape", "drift", "report:", "fid"):
        assert text in r.output, text
    direct = evaluate_checkpoint(tiny_checkpoint, tiny_test_split, quick_oracle_dir, tmp_path / "lib",
                                 EVAL_PRESETS["smoke"])
    from_cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert from_cli["verdict"] == json.loads(json.dumps(direct["verdict"]))
    assert from_cli["report"]["per_position"] == json.loads(json.dumps(direct["report"]["per_position"]))
    assert from_cli["drift"] == direct["drift"] and from_cli["context_count"] == direct["context_count"]
    assert direct["table"] in r.output


def test_evaluate_policy_window_4_is_the_papers_protocol(tiny_checkpoint, tiny_test_split, quick_oracle_dir):
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                  str(tiny_test_split), "--oracle", str(quick_oracle_dir), "--policy", "window-4",
                                  *FAST], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "W=4 (no anchors: the paper protocol)" in r.output
