"""The Sec. 8.4 protocol end to end on an untrained tiny checkpoint and the tiny test split."""

from __future__ import annotations

import json
import math

import pytest

from m2m_pipeline.bundle import load_bundle
from m2m_pipeline.evaluation.clip_score import ClipScorer
from m2m_pipeline.evaluation.consistency import chance_levels
from m2m_pipeline.evaluation.fid import oracle_feature_network
from m2m_pipeline.evaluation.protocol import (
    EvaluationReport,
    ProtocolConfig,
    Scorers,
    load_test_sets,
    run_protocol,
)

FAST = {"generated_images": 3, "steps": 2, "guidance_scale": 2.0, "batch_size": 2}


def test_protocol_defaults_follow_the_paper_with_the_anchored_window():
    cfg = ProtocolConfig()
    assert (cfg.context_images, cfg.generated_images, cfg.steps, cfg.guidance_scale) == (4, 10, 50, 7.5)
    assert (cfg.window, cfg.anchors) == (8, 4)  # DEFAULT_POLICY anchors-4 (issue 15)
    paper = ProtocolConfig.paper(steps=3)
    assert (paper.window, paper.anchors, paper.steps) == (4, 0, 3)
    with pytest.raises(ValueError, match="unknown context policy 'w4'"):
        ProtocolConfig.with_policy("w4")


def test_protocol_end_to_end(tiny_checkpoint, tiny_test_split, quick_oracle, quick_oracle_dir, tiny_clip_dir, tmp_path):
    b = load_bundle(tiny_checkpoint)
    net, autoencoder, encoder = b.net, b.autoencoder, b.context_encoder
    sets = load_test_sets(tiny_test_split, num_sets=None, context_images=4)
    assert sets.latents.shape[1:] == (4, 3, 16, 16) and sets.attributes is not None
    cfg = ProtocolConfig.paper(**FAST)
    scorers = Scorers(oracle_feature_network(quick_oracle), ClipScorer(f"local-dir:{tiny_clip_dir}"), quick_oracle,
                      str(quick_oracle_dir))
    report = run_protocol(net, autoencoder, sets, cfg, scorers, encoder, checkpoint=tiny_checkpoint, progress=False)

    expected = {"fid", "inception_score", "clip_text_image", "clip_image_image", "consistency_shape",
                "consistency_colour", "consistency_background", "consistency_background_colour",
                "consistency_content", "consistency_style", "caption_agreement"}
    assert set(report.per_position) == expected
    for name, values in report.per_position.items():
        assert len(values) == 3, name
        assert all(math.isfinite(v) for v in values), (name, values)
    assert all(0 <= v <= 1 for v in report.per_position["consistency_style"])
    assert report.summary["fid"]["mean"] == pytest.approx(sum(report.per_position["fid"]) / 3)
    p = report.provenance
    assert p["num_sets"] == len(sets.keys) and p["window"] == 4 and p["steps"] == 2 and p["generated_images"] == 3
    assert p["fid"]["network"] == "attribute-oracle" and p["clip"]["scale"] == "100 x cosine"
    assert len(p["checkpoint_sha256"]) == 64 and p["seeds"] == f"0..{len(sets.keys) - 1}"
    assert report.reference["chance"] == chance_levels()
    # JSON round trip and the printed table.
    data = json.loads(report.to_json(tmp_path / "report.json").read_text())
    assert data["per_position"]["fid"] == report.per_position["fid"]
    assert EvaluationReport.from_json(tmp_path / "report.json").table() == report.table()
    table = report.table()
    assert "consistency_style" in table and "n=3" in table and "W=4 (no anchors: the paper protocol)" in table


def test_protocol_results_do_not_depend_on_batching(tiny_checkpoint, tiny_test_split, quick_oracle):
    b = load_bundle(tiny_checkpoint)
    net, autoencoder, encoder = b.net, b.autoencoder, b.context_encoder
    sets = load_test_sets(tiny_test_split, num_sets=3, context_images=4)
    reports = [run_protocol(net, autoencoder, sets, ProtocolConfig(**{**FAST, "batch_size": bs}),
                            Scorers(oracle=quick_oracle), encoder, progress=False) for bs in (1, 3)]
    assert reports[0].per_position == reports[1].per_position


def test_unconditional_option_drops_the_context(tiny_checkpoint, tiny_test_split, quick_oracle):
    b = load_bundle(tiny_checkpoint)
    net, autoencoder, encoder = b.net, b.autoencoder, b.context_encoder
    sets = load_test_sets(tiny_test_split, num_sets=2, context_images=4)
    report = run_protocol(net, autoencoder, sets, ProtocolConfig(**FAST, unconditional=True),
                          Scorers(oracle=quick_oracle), encoder, progress=False)
    assert report.provenance["window"] == 0 and report.provenance["unconditional"] is True
    assert "UNCONDITIONAL" in report.table()


def test_protocol_needs_a_metric(tiny_checkpoint, tiny_test_split):
    b = load_bundle(tiny_checkpoint)
    net, autoencoder = b.net, b.autoencoder
    sets = load_test_sets(tiny_test_split, num_sets=1, context_images=4)
    with pytest.raises(ValueError, match="no metric configured"):
        run_protocol(net, autoencoder, sets, ProtocolConfig(**FAST), Scorers(), progress=False)
    with pytest.raises(ValueError, match="need"):
        load_test_sets(tiny_test_split, num_sets=1, context_images=99)
