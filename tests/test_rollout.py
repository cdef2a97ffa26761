"""Rollout context (issue 15): the first image stays real, images 1 .. N-2 of the chosen sets are the model's own
generations from the images before them, image N-1 and the other sets are untouched; fraction 0 is today's training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.rollout import RolloutConfig, rollout_context
from m2m_pipeline.sampling import generate


def test_rollout_replaces_the_middle_context_of_the_chosen_sets_only():
    torch.manual_seed(0)
    net = M2MUNet(M2MConfig.preset("tiny", "self")).train()
    z_0 = torch.randn(4, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = RolloutConfig(fraction=0.5, steps=2, guidance_scale=2.0)
    out = rollout_context(net, z_0, cfg, torch.Generator().manual_seed(2))
    assert net.training  # mode restored
    rolled = [b for b in range(4) if not torch.equal(out[b], z_0[b])]
    assert rolled and len(rolled) < 4
    for b in range(4):
        assert torch.equal(out[b, 0], z_0[b, 0]) and torch.equal(out[b, 3], z_0[b, 3])
    b = rolled[0]
    net.eval()
    seeds = torch.randint(0, 2**31 - 1, (len(rolled),), generator=_after_mask(4, 0.5, 2)).tolist()
    first = generate(net, z_0[b : b + 1, :1], 1, steps=2, guidance_scale=2.0, window=4, seed=[seeds[0] + 1],
                     progress=False)
    torch.testing.assert_close(out[b, 1], first[0, 0])  # image 1 is the model's sample after the real image 0
    assert torch.equal(rollout_context(net, z_0, RolloutConfig(fraction=0.0), torch.Generator()), z_0)


def _after_mask(b: int, fraction: float, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.rand(b, generator=g)  # the set mask rollout_context draws first
    return g


def test_rollout_training_runs_and_is_refused_for_dino(tmp_path):
    from m2m_pipeline.training import TrainConfig, train

    data = [{"latents": torch.randn(2, 4, 3, 16, 16)} for _ in range(3)]
    tc = dataclasses.replace(TrainConfig.preset("tiny"), steps=2, checkpoint_every=0, n_images=4,
                             rollout=RolloutConfig(fraction=1.0, steps=1))
    result = train(M2MConfig.preset("tiny", "self"), tc, data, tmp_path / "self", progress=False, device="cpu")
    assert result.steps == 2
    assert TrainConfig(**tc.to_dict()).rollout == tc.rollout  # what a checkpoint's train_config reloads to
    dino = [{"latents": torch.randn(2, 4, 3, 16, 16), "dino": torch.randn(2, 4, 5, 32)} for _ in range(3)]
    with pytest.raises(ValueError, match="rollout is defined for M2M-Self only"):
        train(M2MConfig.preset("tiny", "dino"), tc, dino, tmp_path / "dino", progress=False, device="cpu")
    with pytest.raises(ValueError, match="RolloutConfig"):
        RolloutConfig(fraction=2.0)
