"""Layer 3: objective and training loop in a temp dir."""

from __future__ import annotations

import json

import pytest
import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.objective import DropConfig, M2MObjective, sample_drops
from m2m_pipeline.training import TrainConfig, train


def colour_sets(num: int, b: int = 4, n: int = 3, size: int = 16):
    """Sets whose images share a colour: learnable structure for a few-step loss test."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num):
        colour = torch.rand(b, 1, 3, 1, 1, generator=g) * 2 - 1
        noise = torch.randn(b, n, 3, size, size, generator=g) * 0.1
        out.append({"latents": (colour + noise).clamp(-1, 1)})
    return out


def test_drops_without_task_follow_p():
    drop_image, drop_task = sample_drops(20_000, False, DropConfig(), torch.Generator().manual_seed(0))
    assert drop_task is None and abs(drop_image.float().mean().item() - 0.10) < 0.01


def test_drops_with_task_train_all_three_branches_of_eq7():
    di, dt = sample_drops(40_000, True, DropConfig(), torch.Generator().manual_seed(0))
    both, task_only, image_only = (di & dt).float().mean(), (~di & dt).float().mean(), (di & ~dt).float().mean()
    for share in (both, task_only, image_only):
        assert abs(share.item() - 0.05) < 0.006
    assert abs((~di & ~dt).float().mean().item() - 0.85) < 0.01


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_is_mse_over_all_images(prediction_type):
    cfg = M2MConfig.preset("tiny", prediction_type=prediction_type)

    class Zero(torch.nn.Module):
        config = cfg

        def forward(self, z_t, t, context, task_cond=None, **kw):
            return torch.zeros_like(z_t)

    objective = M2MObjective(cfg)
    loss = objective(Zero(), torch.zeros(8, 4, 3, 16, 16), torch.zeros(8, 4, 3, 16, 16),
                     generator=torch.Generator().manual_seed(0))
    # eps ~ N(0, 1): E||eps - 0||^2 / numel = 1; with z_0 = 0, v = sqrt(a_t) eps: E over uniform t of a_t
    expected = 1.0 if prediction_type == "epsilon" else objective.scheduler.alphas_cumprod.mean().item()
    assert abs(loss.item() - expected) < 0.03, (loss.item(), expected)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_tiny_training_lowers_loss_and_checkpoints(tmp_path, variant):
    data = colour_sets(8)
    if variant == "dino":
        for batch in data:
            batch["dino"] = torch.randn(4, 3, 5, 32)
    tc = TrainConfig.preset("tiny")  # 50 steps
    result = train(M2MConfig.preset("tiny", variant), tc, data, tmp_path, progress=False)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    # v-prediction (tiny preset): ~0.55 -> ~0.41 in 50 steps; an untrained net stays at ~1x
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "checkpoint-0000025" / "model.safetensors").is_file()
    state = json.loads((result.checkpoint_dir / "train_state.json").read_text())
    assert state["step"] == 50 and state["train_config"]["lr"] == tc.lr
    net = M2MUNet.from_pretrained(result.checkpoint_dir)
    assert net.config.variant == variant


def test_metrics_callback(tmp_path):
    seen = []
    train(M2MConfig.preset("tiny"), TrainConfig.preset("tiny", steps=10, log_every=5, checkpoint_every=0),
          colour_sets(2), tmp_path, on_metrics=lambda m, s: seen.append((s, sorted(m))), progress=False)
    names = ["grad_norm", "loss", "lr", "skipped_steps"]
    assert seen == [(5, names), (10, names)]


def test_nan_batch_is_skipped_and_counted(tmp_path):
    data = colour_sets(4)
    data[1] = {"latents": torch.full_like(data[1]["latents"], float("nan")), "key": ["shard-1/bad"]}
    seen = []
    result = train(M2MConfig.preset("tiny"), TrainConfig.preset("tiny", steps=8, log_every=8, checkpoint_every=0),
                   data, tmp_path, on_metrics=lambda m, s: seen.append(m), progress=False)
    # 8 applied steps over a cycle of 4 batches with batch 1 bad: batches 0..10 are drawn, 1, 5 and 9 skipped.
    assert seen[-1]["skipped_steps"] == 3.0 and result.skipped_steps == 3
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))


def test_persistent_nan_aborts_naming_step_and_data(tmp_path):
    data = [{"latents": torch.full((2, 3, 3, 16, 16), float("nan")), "key": ["mis-000007/set-42"]}]
    # `steps` counts applied updates, so every retry is optimizer step 1 (docs/training.md)
    with pytest.raises(FloatingPointError, match=r"3 non-finite .* in a row, last at step 1, data \['mis-000007/set-42'\]"):
        train(M2MConfig.preset("tiny"), TrainConfig.preset("tiny", steps=10, max_bad_steps=3), data, tmp_path,
              progress=False)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown training preset"):
        TrainConfig.preset("galaxy")
    assert TrainConfig.preset("paper").lr == 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_caps_low_noise_steps(prediction_type):
    cfg = M2MConfig.preset("tiny", prediction_type=prediction_type)
    objective = M2MObjective(cfg, snr_gamma=5.0)
    t = torch.tensor([[0, 50, 200, 500, 900]])
    a = objective.scheduler.alphas_cumprod[t[0]]
    snr = a / (1 - a)
    want = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(objective.min_snr_weights(t)[0], want.float())
    # the weight is capped where SNR > gamma (low noise) and below 1 everywhere
    assert objective.min_snr_weights(t).max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="snr_gamma"):
        M2MObjective(cfg, snr_gamma=-1.0)


def test_snr_gamma_zero_is_the_plain_loss_and_weighting_changes_it():
    cfg = M2MConfig.preset("tiny")
    net = M2MUNet(cfg)
    z = torch.randn(2, 3, 3, 16, 16)
    plain = M2MObjective(cfg)(net, z, z, generator=torch.Generator().manual_seed(1))
    zero = M2MObjective(cfg, snr_gamma=0.0)(net, z, z, generator=torch.Generator().manual_seed(1))
    weighted = M2MObjective(cfg, snr_gamma=5.0)(net, z, z, generator=torch.Generator().manual_seed(1))
    assert plain.item() == zero.item() and weighted.item() < plain.item()
