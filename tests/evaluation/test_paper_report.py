"""The paper profile's evaluation report (Table 1, Sec. 8.4) without the shapes world: clean-fid Inception FID /
IS and open_clip CLIP scores through the real loaders on random-weight files in the released layouts
(reference_layouts.build_inception / build_open_clip), no oracle anywhere."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from m2m_pipeline.evaluation.clip_score import ClipScorer
from m2m_pipeline.evaluation.fid import (
    INCEPTION_FILE,
    extract_features,
    extract_logits,
    inception_feature_network,
    inception_score,
)
from m2m_pipeline.evaluation.report import EVAL_PRESETS, EvalSpec, evaluate_checkpoint
from m2m_pipeline.reference_layouts import build_inception, build_open_clip

# Table 1 at toy sizes: 3 sets (FID needs two), 2 positions, 2 DDIM steps.
TINY_PAPER = EvalSpec(num_sets=3, context_images=4, generated_images=2, steps=2, guidance_scale=2.0,
                      drift_images=3, drift_sets=2, context_counts=(1, 2), benchmark_images=1, benchmark_steps=1,
                      benchmark_repeats=1, autoencoder_min_accuracy=None, scorers="paper", draw_seed=3)


def _fid_without_sqrtm(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID's mean and trace terms, without the matrix square root: scipy's sqrtm of a 2048 x 2048 matrix takes a
    minute per call on this shared CPU. A deterministic function of the same features, so the plumbing (which
    features reach which FID) is still tested; the real clean-fid path runs in the slow test below."""
    d = feats1.mean(0) - feats2.mean(0)
    return float(d @ d + feats1.var(0, ddof=1).sum() + feats2.var(0, ddof=1).sum())


@pytest.fixture
def cheap_fid(monkeypatch):
    from m2m_pipeline.evaluation import protocol

    monkeypatch.setattr(protocol, "fid_from_features", _fid_without_sqrtm)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return build_inception(tmp_path_factory.mktemp("inception"), "small")


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    return build_open_clip(tmp_path_factory.mktemp("clip") / "small", scale="small")


def test_inception_builder_has_clean_fids_interface(inception_file):
    """The file loads through clean-fid's InceptionV3W (torch.jit.load, .layers on 299 px) and the project's
    feature network: 2048-d pool features, 1008-way probabilities without output bias."""
    assert inception_file.name == INCEPTION_FILE
    net = inception_feature_network(inception_file)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    feats, logits = extract_features(images, net), extract_logits(images, net)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and np.isfinite(feats).all()
    assert np.allclose(np.exp(logits).sum(1), 1.0, atol=1e-4)  # log-probabilities of the 1008-way softmax
    assert len(net.info["weights_sha256"]) == 64 and inception_score(images, net) >= 1.0 - 1e-5
    base = torch.jit.load(str(inception_file))
    x = torch.rand(2, 3, 299, 299) * 255
    with_bias, without = base(x), base(x, no_output_bias=True)
    assert with_bias.shape == without.shape == (2, 1008) and not torch.allclose(with_bias, without)
    assert base(x, return_features=True).shape == (2, 2048)
    assert base.layers((x - 128) / 128).reshape(2, -1).shape == (2, 2048)


def test_open_clip_builder_loads_through_clip_scorer(small_clip):
    assert small_clip.model.startswith("local-dir:") and small_clip.pretrained is None
    scorer = ClipScorer(small_clip.model, small_clip.pretrained)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(scorer.image_image(images, images[:, None]), torch.full((2,), 100.0), atol=1e-3)
    assert len(scorer.info["weights_sha256"]) == 16  # hash of the written safetensors file
    # the embedding-level scores are the image-level ones (one definition for the streamed protocol)
    e = scorer.image_embeddings(images)
    assert torch.allclose(scorer.text_image(images, ["a", "b"]),
                          scorer.text_image_from_embeddings(e, scorer.text_embeddings(["a", "b"])), atol=1e-5)


@pytest.mark.slow
def test_full_scale_builders(tmp_path):
    """The released architectures: torchvision's Inception-v3 trunk in clean-fid's torchscript interface, and an
    open_clip model name + safetensors file loaded as pretrained=<file> (ViT-B-32 here, ViT-L-14 in the dry run)."""
    net = inception_feature_network(build_inception(tmp_path / "inception", "full"))
    assert extract_features(torch.rand(2, 3, 32, 32) * 2 - 1, net).shape == (2, 2048)
    clip = build_open_clip(tmp_path / "clip", model="ViT-B-32", scale="full")
    assert clip.model == "ViT-B-32" and clip.pretrained.suffix == ".safetensors"
    scorer = ClipScorer(clip.model, clip.pretrained)
    assert scorer.image_embeddings(torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_streamed_paper_protocol_equals_scoring_the_whole_arrays(tiny_checkpoint, tiny_test_split, inception_file,
                                                                 small_clip, cheap_fid):
    """run_paper_protocol keeps only features and embeddings per batch; its numbers are score_sets' on the
    whole arrays with the same scorers (same images: set i samples with seed + i whatever the batching)."""
    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.evaluation import protocol

    b = load_bundle(tiny_checkpoint)
    sets = protocol.load_test_sets(tiny_test_split, 3, 4)
    cfg = protocol.ProtocolConfig.paper(generated_images=2, steps=2, guidance_scale=2.0, batch_size=2)
    fid, clip = inception_feature_network(inception_file), ClipScorer(small_clip.model)
    per, ref, prec, gen = protocol.run_paper_protocol(b.net, b.autoencoder, sets, cfg, fid, clip, b.context_encoder,
                                                      keep=2, progress=False)
    preceding, generated = protocol.generate_for_protocol(b.net, b.autoencoder, sets, cfg, b.context_encoder, False)
    whole, whole_ref = protocol.score_sets(preceding, generated, sets.captions, None, protocol.Scorers(fid, clip),
                                           progress=False)
    assert set(per) == set(whole) == {"fid", "inception_score", "clip_text_image", "clip_image_image"}
    for name in per:
        assert per[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-3), name
    assert ref == pytest.approx(whole_ref, rel=1e-4, abs=1e-3)
    assert torch.equal(gen, generated[:2]) and torch.equal(prec, preceding[:2])


@pytest.mark.parametrize("fid", ["cheap", pytest.param("clean-fid", marks=pytest.mark.slow)])
def test_paper_report_end_to_end_without_the_oracle(tiny_checkpoint, tiny_test_split, inception_file, small_clip,
                                                    tmp_path, monkeypatch, fid):
    """The paper path never imports the shapes-world oracle: it runs with the module unimportable."""
    if fid == "cheap":
        from m2m_pipeline.evaluation import protocol

        monkeypatch.setattr(protocol, "fid_from_features", _fid_without_sqrtm)
    monkeypatch.setitem(sys.modules, "m2m_pipeline.evaluation.oracle", None)
    with pytest.raises(ImportError):
        import m2m_pipeline.evaluation.oracle  # noqa: F401
    res = evaluate_checkpoint(tiny_checkpoint, tiny_test_split, None, tmp_path, TINY_PAPER,
                              inception_weights=inception_file, clip_model=small_clip.model)
    record = json.loads((tmp_path / "report.json").read_text())
    assert record["kind"] == "paper"
    assert not {"verdict", "position1", "zero_shot_photos", "chance"} & set(record)
    per = record["report"]["per_position"]
    assert set(per) == {"fid", "inception_score", "clip_text_image", "clip_image_image"}
    assert all(len(v) == 2 and all(np.isfinite(v)) for v in per.values())
    # Table 1's row: exactly its four columns, mean +- population std over the positions
    assert list(record["table1"]) == ["FID", "IS", "CLIP-T", "CLIP-I"]
    for column, metric in (("FID", "fid"), ("IS", "inception_score"), ("CLIP-T", "clip_text_image"),
                           ("CLIP-I", "clip_image_image")):
        assert record["table1"][column] == pytest.approx({"mean": np.mean(per[metric]), "std": np.std(per[metric])})
    # the random draw is recorded: seed, candidates, the chosen keys' hash
    draw = record["test_sets"]
    assert draw["seed"] == 3 and draw["drawn"] == 3 and draw["candidates"] >= 3 and len(draw["keys_sha256"]) == 64
    assert len(record["drift"]["clip_image_image"]) == 3 and set(record["context_count"]) == {"1", "2"}
    p = record["report"]["provenance"]
    assert p["fid"]["network"].startswith("inception-v3") and p["clip"]["scale"] == "100 x cosine"
    for name in ("grid", "fid", "inception_score", "clip_text_image", "clip_image_image", "drift", "context_count",
                 "drift_grid"):
        assert (tmp_path / f"{name}.png").is_file(), name
    assert not (tmp_path / "zero_shot.png").exists()
    assert "clip_image_image" in res["table"] and "CLIP: local-dir:" in res["table"]


def test_paper_report_needs_its_scorers(tiny_checkpoint, tiny_test_split, tmp_path):
    with pytest.raises(ValueError, match="needs inception_weights"):
        evaluate_checkpoint(tiny_checkpoint, tiny_test_split, None, tmp_path, TINY_PAPER)
    with pytest.raises(ValueError, match="EvalSpec.scorers must be one of"):
        dataclasses.replace(TINY_PAPER, scorers="inception")
    with pytest.raises(ValueError, match="sweep"):
        dataclasses.replace(EVAL_PRESETS["demo"], scorers="paper")  # the sweep scores with the oracle


def test_evaluate_report_paper_from_the_terminal(tiny_checkpoint, tiny_test_split, inception_file, small_clip,
                                                 tmp_path, cheap_fid):
    """`m2m evaluate --report dryrun` (a paper-scorer preset) writes what the asset's evaluate_checkpoint writes."""
    from m2m_pipeline.cli import main

    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--test-shards", str(tiny_test_split), "--report",
            "dryrun", "--report-dir", str(tmp_path / "cli")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "--inception-weights" in r.output
    r = CliRunner().invoke(main, [*args, "--inception-weights", str(inception_file), "--clip-model",
                                  small_clip.model], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Table 1 row: FID" in r.output and "drawn with seed" in r.output
    direct = evaluate_checkpoint(tiny_checkpoint, tiny_test_split, None, tmp_path / "lib", EVAL_PRESETS["dryrun"],
                                 inception_weights=inception_file, clip_model=small_clip.model)
    from_cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert from_cli["table1"] == json.loads(json.dumps(direct["table1"]))
    assert from_cli["report"]["per_position"] == json.loads(json.dumps(direct["report"]["per_position"]))
    assert from_cli["test_sets"] == direct["test_sets"]


def test_evaluation_asset_call_builds_the_paper_scorers_from_resolved(tiny_checkpoint, tiny_test_split,
                                                                      inception_file, small_clip, tmp_path,
                                                                      monkeypatch, cheap_fid):
    """orchestration.evaluation.evaluate_variant (what the report asset runs) hands the settings' resolved
    Inception and CLIP files to the library; the oracle stays unimportable throughout."""
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.orchestration.evaluation import evaluate_variant
    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import ComputeResource, Resolved

    monkeypatch.setitem(sys.modules, "m2m_pipeline.evaluation.oracle", None)
    r = Resolved(profile=PROFILES["paper"], root=tmp_path, mis=get_preset("tiny"), net_preset="tiny",
                 train_preset="tiny", train_overrides={}, eval=TINY_PAPER, caption_source="shapes",
                 inception_weights=inception_file, clip_model=small_clip.model, clip_pretrained=None)
    res = evaluate_variant(r, "self", tiny_checkpoint, tiny_test_split, None, tmp_path / "out",
                           ComputeResource(device="cpu"))
    assert res["kind"] == "paper" and list(res["table1"]) == ["FID", "IS", "CLIP-T", "CLIP-I"]
    assert res["report"]["provenance"]["fid"]["weights"] == str(inception_file)


class _RecordingRun:
    """What _log_report calls on an MLflow run."""

    def __init__(self):
        self.metrics, self.params, self.artifacts = {}, {}, []

    def log_metrics(self, values, step=None):
        self.metrics.update({(k, step): v for k, v in values.items()})

    def log_params(self, values):
        self.params.update(values)

    def log_artifact(self, path):
        self.artifacts.append(str(path))


def test_report_asset_metadata_and_mlflow_for_the_paper_kind(tiny_checkpoint, tiny_test_split, inception_file,
                                                              small_clip, tmp_path, cheap_fid):
    """The report asset's metadata and MLflow logging take the paper report (no position1 / verdict)."""
    from m2m_pipeline.orchestration.assets import _log_report, _report_metadata

    res = evaluate_checkpoint(tiny_checkpoint, tiny_test_split, None, tmp_path, TINY_PAPER,
                              inception_weights=inception_file, clip_model=small_clip.model)
    meta = _report_metadata(res, TINY_PAPER, "self")
    assert "| M2M-self |" in meta["table1"].value and "position1" not in meta
    assert {"FID_mean", "IS_mean", "CLIP-T_mean", "CLIP-I_mean", "draw_seed", "candidate_sets"} <= set(meta)
    assert all("data:image/png;base64," in meta[k].value for k in ("grid", "fid", "clip_image_image", "drift"))
    run = _RecordingRun()
    _log_report(run, res, tmp_path)
    assert ("table1/FID_mean", None) in run.metrics and ("eval/clip_image_image", 2) in run.metrics
    assert ("drift/clip_image_image", 3) in run.metrics and run.params["test_sets.seed"] == 3
    assert str(tmp_path / "report.json") in run.artifacts
