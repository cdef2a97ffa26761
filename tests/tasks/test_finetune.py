"""Task fine-tuning and evaluation (issue 5, items 3-5): base init, splits, metrics table, tiny end-to-end runs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.tasks.evaluate import (
    baseline_method,
    evaluate_finetune,
    heldout_batches,
    metrics_table,
    paired_comparison,
    paired_table,
    run_methods,
    summarize,
)
from m2m_pipeline.tasks.finetune import (
    FinetuneConfig,
    TaskEvalConfig,
    finetune,
    init_task_model,
    is_task_parameter,
    make_splits,
)
from m2m_pipeline.tasks.metrics import psnr


def perturbed_base(folder, variant: str, seed: int):
    """A tiny M2M without a task whose weights are all non-zero (a trained model's are): (path, net)."""
    torch.manual_seed(seed)
    net = M2MUNet(M2MConfig.preset("tiny", variant))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.save_pretrained(folder), net.eval()


@pytest.fixture
def base_checkpoint(tmp_path):
    return perturbed_base(tmp_path / "base", "self", seed=1)


@pytest.mark.parametrize("task,spatial_bias", [("camera", False), ("position", False), ("camera", True),
                                               ("position", True)])
def test_base_init_keeps_base_function_at_step_0(task, spatial_bias, base_checkpoint):
    path, base = base_checkpoint
    net = init_task_model(task, path, spatial_bias=spatial_bias).eval()
    assert any("spatial_bias" in k for k, _ in net.named_parameters()) == spatial_bias
    new = {k for k, _ in net.named_parameters()} - {k for k, _ in base.named_parameters()}
    assert new and all(is_task_parameter(k) for k in new)
    b, n = 2, 3
    g = torch.Generator().manual_seed(0)
    z_t, z_0 = torch.randn(b, n, 3, 16, 16, generator=g), torch.randn(b, n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (b, n), generator=g)
    cond = torch.randn(b, n, 12, generator=g) * 3 if task == "camera" else torch.tensor([[0.0, 4, 7], [2, 3, 9]])
    with torch.no_grad():
        expected = base(z_t, t, z_0)
        for drop in (None, torch.tensor([True, False])):  # any condition, kept or dropped: the base's output
            assert torch.allclose(net(z_t, t, z_0, cond, drop_task=drop), expected, atol=1e-6)
    # and the new parameters do learn: the task projections get gradients once the embedder is non-zero
    net.train()
    net(z_t, t, z_0, cond).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for k, p in net.named_parameters()
               if "cond_to_q" in k)
    if spatial_bias:  # and so does the zero-initialised last layer of the bias MLP, from step 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for k, p in net.named_parameters()
                   if "spatial_bias.mlp.2" in k)


def test_base_with_a_task_is_refused(tmp_path):
    path = M2MUNet(M2MConfig.preset("tiny", "self", task="camera")).save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="already has task 'camera'"):
        init_task_model("position", path)


def test_splits_are_disjoint_and_by_item(polyhedra_root, procedures_root):
    for task, root in (("camera", polyhedra_root), ("position", procedures_root)):
        s = make_splits(task, root, held_out=2, validation=1, seed=0)
        assert len(s.test) == 2 and len(s.validation) == 1
        assert not (set(s.train) & set(s.test)) and not (set(s.train) & set(s.validation))
        assert make_splits(task, root, 2, 1, seed=0) == s


def test_summary_and_table_on_a_known_case():
    values = {"a": {"psnr": torch.tensor([[10.0, 20.0], [30.0, 40.0]], dtype=torch.float64),
                    "progress_error": torch.tensor([[0.2, float("nan")], [1.0, 0.4]], dtype=torch.float64)}}
    row = summarize(values)["a"]
    assert row["psnr_mean"] == pytest.approx(25.0)        # item means 15 and 35
    assert row["psnr_std"] == pytest.approx(10.0)         # population std over items
    assert row["progress_error_mean"] == pytest.approx((0.2 + 0.7) / 2)  # the NaN image is skipped in the mean
    assert row["progress_fail"] == pytest.approx(0.25)
    assert row["progress_within_half_step"] == pytest.approx(0.5)  # 0.2 and 0.4; NaN is not within
    table = metrics_table(summarize(values))
    assert "| a | 2 | 25.000 ± 10.000 |" in table and "0.50" in table


def test_paired_comparison_on_a_known_case():
    values = {"base": {"psnr": torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]], dtype=torch.float64)},
              "m": {"psnr": torch.tensor([[11.0, 13.0], [21.0, 21.0], [30.0, 30.0]], dtype=torch.float64)}}
    p = paired_comparison(values, "base")["m"]
    assert p["diff_mean"] == pytest.approx(1.0)                       # item differences 2, 1, 0
    assert p["diff_se"] == pytest.approx(1.0 / 3 ** 0.5)               # sample std 1 over sqrt(3) items
    assert p["better"] == 2 and p["items"] == 3
    assert "+1.000 ± 0.577 (standard error), better on 2/3" in paired_table({"m": p})
    errors = {"base": {"progress_error": torch.tensor([[1.0], [1.0]])}, "m": {"progress_error": torch.tensor([[0.5], [2.0]])}}
    assert paired_comparison(errors, "base", "progress_error")["m"]["better"] == 1  # lower is better


def test_baselines_go_through_the_same_metrics(procedures_root):
    ec = TaskEvalConfig(context_images=3, target_images=2, batch_size=4)
    batches = heldout_batches("position", procedures_root, ["proc_000000/method_0", "proc_000001/method_0"], ec, 32)
    truth = lambda batch, seeds: batch["latents"][:, 3:]  # a perfect method
    values, _ = run_methods({"truth": truth, "repeat": baseline_method("position", ec)}, "position",
                                procedures_root, batches, ec, progress=False)
    assert torch.all(values["truth"]["psnr"] == 100.0)
    assert values["truth"]["progress_error"].max() < 0.25  # the attribute check reads true steps back
    last = batches[0]["latents"][:, 2:3]
    expected = psnr(last.expand(-1, 2, -1, -1, -1), batches[0]["latents"][:, 3:])
    assert torch.allclose(values["repeat"]["psnr"], expected.double())
    assert values["repeat"]["progress_error"].nanmean() > 0.75  # off by one step or more


@pytest.mark.slow
@pytest.mark.parametrize("task", ["camera", "position"])
def test_tiny_finetune_and_evaluation_end_to_end(task, polyhedra_root, procedures_root, base_checkpoint, tmp_path):
    root = polyhedra_root if task == "camera" else procedures_root
    cfg = FinetuneConfig.preset("tiny", task)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sweep_s_I=(1.0, 2.0), sweep_s_C=(1.0,)))
    result, splits = finetune(cfg, root, tmp_path / "run", base=base_checkpoint[0], progress=False)
    assert result.steps == cfg.train.steps and all(math.isfinite(x) for x in result.losses)
    report = evaluate_finetune(cfg, root, result.checkpoint_dir, tmp_path / "run" / "eval", base=base_checkpoint[0],
                               progress=False)
    assert set(report["summary"]) == {"fine-tuned", "before fine-tuning",
                                      "copy_input_view" if task == "camera" else "repeat_last_step"}
    for row in report["summary"].values():
        assert math.isfinite(row["psnr_mean"]) and math.isfinite(row["ssim_mean"]) and row["items"] == 2
    assert len(report["sweep"]) == 2 and report["sampler"]["s_I"] in (1.0, 2.0)
    for path in report["files"].values():
        assert path.is_file() and path.stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["test_keys"] == splits.test and saved["summary"] == report["summary"]
    assert set(saved["paired"]) == {"fine-tuned", "before fine-tuning"} and "paired over items" in report["table"]
    assert M2MUNet.from_pretrained(result.checkpoint_dir).config.spatial_bias  # the task presets' default
    val = evaluate_finetune(cfg, root, result.checkpoint_dir, tmp_path / "val", base=base_checkpoint[0],
                            progress=False, split="validation")  # following a run without test items
    assert val["validation_keys"] == splits.validation and "test_keys" not in val and val["sweep"] == []
    assert val["summary"]["fine-tuned"]["items"] == len(splits.validation)


def test_unit_guidance_takes_one_branch_with_the_same_images():
    from m2m_pipeline.sampling import generate
    from m2m_pipeline.tasks.evaluate import model_method

    torch.manual_seed(0)
    net = M2MUNet(M2MConfig.preset("tiny", "self", task="camera")).eval()
    with torch.no_grad():
        for p in net.parameters():  # non-zero task projections: the task branch differs from the image branch
            p.add_(torch.randn_like(p) * 0.05)
    batch = {"latents": torch.randn(2, 3, 3, 16, 16).clamp(-1, 1), "task_cond": torch.randn(2, 3, 12)}
    ec = TaskEvalConfig(context_images=1, target_images=2, steps=3)
    fast = model_method(net, ec, 1.0, 1.0)(batch, [0, 1])
    dual = generate(net, batch["latents"][:, :1], 2, task_cond=batch["task_cond"], steps=3, guidance_scale=1.0,
                    task_guidance_scale=1.0, seed=[0, 1], progress=False).clamp(-1, 1)
    assert torch.allclose(fast, dual, atol=1e-4)
    guided = model_method(net, ec, 2.0, 3.0)(batch, [0, 1])
    assert not torch.allclose(guided, dual, atol=1e-3)  # other scales do go through Eq. 7


@pytest.mark.slow
def test_cli_finetune_logs_an_mlflow_run(polyhedra_root, base_checkpoint, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from m2m_pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # the run goes to ./.state/mlflow, like the Dagster resource's local store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = CliRunner().invoke(main, ["finetune", "--task", "nvs", "--preset", "tiny", "--data", str(polyhedra_root),
                                    "--base", str(base_checkpoint[0]), "--out", "run", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert "| copy_input_view |" in out.output
    client = MlflowClient(f"sqlite:///{tmp_path / '.state/mlflow/mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("m2m-tasks").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["task"] == "camera"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2  # log_every 2 of 4 steps
    assert math.isfinite(run.data.metrics["test/fine-tuned/psnr_mean"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"grid.png", "psnr.png", "metrics.json"}
    assert json.loads((tmp_path / "run/splits.json").read_text())["test"]



@pytest.mark.slow
def test_cli_finetune_resumes_with_more_steps(procedures_root, base_checkpoint, tmp_path, monkeypatch):
    """`--resume` continues the newest checkpoint: a 2-step run extended to 4 steps has the first run's
    2 losses followed by 2 new ones, and trains on (checkpoint and final state agree)."""
    from click.testing import CliRunner

    from m2m_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["finetune", "--task", "procedures", "--preset", "tiny", "--data", str(procedures_root),
              "--base", str(base_checkpoint[0]), "--out", "run", "--threads", "1", "--no-evaluate",
              "--checkpoint-every", "2", "--max-seconds", "0"]
    first = CliRunner().invoke(main, common + ["--steps", "2"])
    assert first.exit_code == 0, first.output
    losses_2 = json.loads((tmp_path / "run/final/train_state.json").read_text())["losses"]
    second = CliRunner().invoke(main, common + ["--steps", "4", "--resume"])
    assert second.exit_code == 0, second.output
    state = json.loads((tmp_path / "run/final/train_state.json").read_text())
    assert state["step"] == 4 and state["losses"][:2] == losses_2 and len(state["losses"]) == 4


@pytest.fixture
def dino_base_checkpoint(tmp_path):
    return perturbed_base(tmp_path / "dino_base", "dino", seed=2)


def test_dino_base_init_keeps_base_function_at_step_0(dino_base_checkpoint):
    path, base = dino_base_checkpoint
    net = init_task_model("camera", path).eval()
    assert net.config.variant == "dino" and net.dino_task_proj is not None
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 3, base.config.dino_dim
    z_t = torch.randn(b, n, 3, 16, 16, generator=g)
    tokens = torch.randn(b, n, 5, d, generator=g)  # (B, N, S, D) DINO tokens of the clean images
    t = torch.randint(0, 1000, (b, n), generator=g)
    cond = torch.randn(b, n, 12, generator=g) * 3
    with torch.no_grad():
        assert torch.allclose(net(z_t, t, tokens, cond), base(z_t, t, tokens), atol=1e-6)


def test_dino_task_batches_carry_the_encoders_tokens(polyhedra_root, dino_base_checkpoint):
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.data.features import encoder_spec
    from m2m_pipeline.tasks.finetune import task_dataset, with_context_features

    net = init_task_model("camera", dino_base_checkpoint[0])
    plain = task_dataset("camera", polyhedra_root, ["poly_000000"], 3, 16)
    item = with_context_features(net, plain)[0]
    encoder = encoder_spec(get_preset("tiny")).build_dino()  # the base's features: the tiny preset's stand-in
    assert torch.equal(item["dino"], encoder.encode(plain[0]["latents"]))  # (N, S, D) of the same views
    assert item["dino"].shape[:2] == (3, encoder.num_tokens)
    self_net = init_task_model("camera", None, "tiny")
    assert "dino" not in with_context_features(self_net, plain)[0]  # M2M-Self attends to the images


@pytest.mark.slow
def test_tiny_dino_finetune_and_evaluation(polyhedra_root, dino_base_checkpoint, tmp_path):
    cfg = FinetuneConfig.preset("tiny", "camera")
    result, _ = finetune(cfg, polyhedra_root, tmp_path / "run", base=dino_base_checkpoint[0], progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    tuned = M2MUNet.from_pretrained(result.checkpoint_dir)
    assert tuned.config.variant == "dino" and tuned.config.task == "camera"
    # training moved the DINO task projection: the camera reaches the context tokens
    assert tuned.dino_task_proj.weight.abs().sum() > 0
    report = evaluate_finetune(cfg, polyhedra_root, result.checkpoint_dir, tmp_path / "run" / "eval",
                               base=dino_base_checkpoint[0], progress=False)
    assert report["sampler"]["variant"] == "dino"
    assert all(math.isfinite(row["psnr_mean"]) for row in report["summary"].values())
