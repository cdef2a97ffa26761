"""`m2m plan`: FLOPs and activation memory counted on the meta device, micro-batch arithmetic, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.plan import Cluster, SavedBytes, checkpointed_blocks, count_flops, micro_batch, training_profile


def test_micro_batch_is_the_largest_divisor_that_fits():
    gib = 2**30
    cluster = Cluster(gpus=8, gpu_memory_gib=80, headroom_gib=4)
    params = int(16 * gib / 20)  # 16 GiB of weights, grads, AdamW, EMA
    mb = micro_batch(int(4.4 * gib), params, cluster, global_batch=256)
    assert mb["fits"] == 13 and mb["micro_batch"] == 8 and mb["grad_accum"] == 4 and mb["global_batch"] == 256
    assert micro_batch(int(100 * gib), params, cluster, 256)["micro_batch"] == 0  # nothing fits: said, not hidden
    with pytest.raises(ValueError, match="utilisation"):
        Cluster(utilisation=0)


def test_meta_counts_equal_real_counts_on_a_tiny_network():
    """The planner's meta-device figures are those of real tensors (same FLOPs, same saved tensors)."""
    torch.manual_seed(0)
    cfg = M2MConfig.preset("tiny-latent", "dino")
    real = M2MUNet(cfg).train()
    with torch.device("meta"):
        meta = M2MUNet(cfg).train()
    shapes = ((1, 3, cfg.in_channels, cfg.sample_size, cfg.sample_size), (1, 3, cfg.dino_tokens, cfg.dino_dim))
    counts = []
    for net, device in ((real, "cpu"), (meta, "meta")):
        z, ctx = (torch.randn(s, device=device) for s in shapes)
        t = torch.zeros(1, 3, dtype=torch.long, device=device)
        with sdpa_kernel(SDPBackend.MATH):  # the kernel meta tensors dispatch to; CPU would pick a fused one
            with SavedBytes(checkpointed_blocks(net)) as saved:
                net(z, t, ctx)
            counts.append((count_flops(lambda: net(z, t, ctx)), saved.total(), saved.block_max))
    assert counts[0] == counts[1] and counts[0][0] > 0 and 0 < counts[0][2] < counts[0][1]


def test_training_profile_orders_the_variants():
    self_, dino = (training_profile(M2MConfig.preset("tiny-latent", v), 5) for v in ("self", "dino"))
    for p in (self_, dino):
        assert 0 < p["activation_bytes_checkpointed"] < p["activation_bytes"]
        assert p["train_flops"] == 4 * p["forward_flops"] > 0
    assert self_["forward_flops"] > dino["forward_flops"]  # M2M-Self runs its context through the U-Net


@pytest.mark.slow
def test_plan_cli_on_the_paper_preset():
    proc = subprocess.run([sys.executable, "-m", "m2m_pipeline.cli", "plan", "--gpus", "8"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 x 4 -> 256" in proc.stdout and "240.8 TB" in proc.stdout and "MIS generation" in proc.stdout
    assert "5.3 GB / 771.6 MB" in proc.stdout and "DINO store chosen: online" in proc.stdout and "14 %" in proc.stdout
    assert "= 35,157 | ceil(6,000,000 x 1 / 256) = 23,438 |" in proc.stdout  # Sec. 7.1.1's subsets, one epoch


def test_the_plan_shows_each_variants_subset_and_steps(monkeypatch):
    """Sec. 7.1.1 / Appendix A: M2M-Self 9M sets, M2M-DINO 6M, one epoch at 256; the steps derived per variant.
    (The SD and DINOv2-giant FLOP counts, seconds on the meta device, are stubbed: they do not enter here.)"""
    from m2m_pipeline import plan
    from m2m_pipeline.data.config import get_preset
    from m2m_pipeline.training import TrainConfig

    monkeypatch.setattr(plan, "sd_generation_flops_per_image", lambda steps: {"unet": 1, "vae_decode": 1, "total": 2})
    monkeypatch.setattr(plan, "dino_flops_per_image", lambda: 1)
    result = plan.make_plan("tiny-latent", get_preset("paper"), TrainConfig.preset("paper"), Cluster(gpus=8))
    runs = {v: result["variants"][v]["train"] for v in ("self", "dino")}
    assert (runs["self"]["subset_sets"], runs["self"]["steps"]) == (9_000_000, 35_157)
    assert (runs["dino"]["subset_sets"], runs["dino"]["steps"]) == (6_000_000, 23_438)
    assert runs["self"]["rule"] == "seeded-shard-draw" and runs["self"]["seed"] == 0 and runs["self"]["epochs"] == 1
    text = plan.format_plan(result)
    assert "| training subset (Sec. 7.1.1: rule, seed) | 9,000,000 of 12,200,000 sets (seeded-shard-draw, seed 0) | " \
           "6,000,000 of 12,200,000 sets (seeded-shard-draw, seed 0) |" in text
    assert "| ceil(9,000,000 x 1 / 256) = 35,157 | ceil(6,000,000 x 1 / 256) = 23,438 |" in text
    hours = {v: result["variants"][v]["train_gpu_hours"] for v in ("self", "dino")}
    flops = {v: result["variants"][v]["train_flops"] for v in ("self", "dino")}
    assert hours["self"] / hours["dino"] == pytest.approx(35_157 * flops["self"] / (23_438 * flops["dino"]))
    with pytest.raises(ValueError, match="more than the 1,000 MIS sets"):
        plan.make_plan("tiny-latent", get_preset("paper"), TrainConfig.preset("paper"), Cluster(gpus=8),
                       plan.PlanInputs(num_sets=1000))


def test_the_online_dino_store_reads_images_not_tokens():
    """Storage arithmetic of the two DINO stores on the tiny-latent shapes (no FLOP counting of SD needed)."""
    from m2m_pipeline.data.config import get_preset
    from m2m_pipeline.plan import PlanInputs, storage

    mis = get_preset("paper")
    cfg = M2MConfig.preset("paper", "dino")
    st = storage(mis, cfg, 1000, PlanInputs())
    assert st["dino_image"] == 257 * 1536 * 2 and st["latent"] == 4 * 64 * 64 * 2
    assert st["features_set_images"] == 25 * st["image"] and st["features_set_images"] < st["features_set_dino"] / 8
    assert mis.dino_features == "online" and get_preset("demo").dino_features == "cache"
