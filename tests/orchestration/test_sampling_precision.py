"""compute.dtype reaches the samplers of the evaluation assets: the report asset's call and the COCO spec carry it
into every generate() call (EvalSpec.precision -> ProtocolConfig / SamplingSpec), while scorers stay float32."""

from __future__ import annotations

import dataclasses

import pytest

from m2m_pipeline.evaluation.report import EVAL_PRESETS


def test_evaluate_variant_samples_in_the_runs_compute_dtype(tmp_path, monkeypatch):
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.evaluation import report
    from m2m_pipeline.orchestration.evaluation import evaluate_variant
    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import ComputeResource, Resolved

    seen = {}
    monkeypatch.setattr(report, "evaluate_checkpoint", lambda *a, **k: seen.setdefault("ev", a[4]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    r = Resolved(profile=PROFILES["smoke"], root=tmp_path, mis=get_preset("tiny"), net_preset="tiny",
                 train_preset="tiny", train_overrides={}, eval=EVAL_PRESETS["smoke"], caption_source="shapes")
    evaluate_variant(r, "self", ckpt, tmp_path, tmp_path, tmp_path / "out", ComputeResource(device="cpu",
                                                                                            dtype="bfloat16"))
    assert seen["ev"].precision == "bfloat16" and EVAL_PRESETS["smoke"].precision == "float32"


def test_protocol_and_studies_pass_the_precision_to_generate(monkeypatch):
    import torch

    from m2m_pipeline.evaluation import protocol, studies

    calls = []

    def fake_generate(net, context, k, **kwargs):
        calls.append(kwargs["precision"])
        b = context.shape[0]
        return torch.zeros(b, k, *context.shape[2:])

    monkeypatch.setattr("m2m_pipeline.sampling.generate", fake_generate)
    monkeypatch.setattr(studies, "generate", fake_generate)
    net = type("Net", (), {"device": torch.device("cpu")})()
    context = torch.zeros(2, 4, 4, 8, 8)
    studies.continue_sets(net, context, 1, studies.SamplingSpec(precision="bfloat16"))
    sets = protocol.TestSets(context, ["a", "b"], ["k0", "k1"], None, [])
    ae = type("AE", (), {"decode": staticmethod(lambda z: torch.zeros(len(z), 3, 8, 8))})()
    protocol.generate_for_protocol(net, ae, sets, protocol.ProtocolConfig(precision="bfloat16", generated_images=1),
                                   progress=False)
    assert calls == ["bfloat16", "bfloat16"]


def test_dryrun_preset_is_the_paper_preset_cut_down():
    paper, dry = EVAL_PRESETS["paper"], EVAL_PRESETS["dryrun"]
    same = ("scorers", "context_policy", "guidance_scale", "context_images", "precision")
    assert all(getattr(dry, f) == getattr(paper, f) for f in same)
    assert dry.num_sets == 2 and dry.generated_images == 1 and dry.steps == 1
    with pytest.raises(ValueError):
        dataclasses.replace(dry, num_sets=0)
