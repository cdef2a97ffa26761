"""Training length per variant (Sec. 7.1.1, Appendix A): the subset each variant draws and the derived steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training_scale import write_feature_shards

from m2m_pipeline.network import M2MConfig
from m2m_pipeline.training import SUBSET_RULE, TrainConfig, draw_subset, train

MICRO = M2MConfig.preset("tiny", image_size=8, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)


def feature_shards(root: Path, sizes: list[int]) -> list[str]:
    """Feature shards with `sizes[i]` sets in shard i (the shared writer of tests/test_training_scale.py)."""
    return write_feature_shards(root, sets=sizes)


def test_the_paper_preset_derives_each_variants_steps():
    paper = TrainConfig.preset("paper")
    assert paper.subset_sets == {"self": 9_000_000, "dino": 6_000_000} and paper.epochs == 1
    assert paper.global_batch_size == 256
    self_, dino = paper.for_variant("self"), paper.for_variant("dino")
    assert (self_.subset_sets, self_.steps) == (9_000_000, 35_157)   # ceil(9e6 / 256)
    assert (dino.subset_sets, dino.steps) == (6_000_000, 23_438)     # ceil(6e6 / 256)
    # derived, not typed in: the steps follow the subset, the epochs and the global batch
    assert TrainConfig.preset("paper", epochs=2).for_variant("dino").steps == 46_875
    assert TrainConfig.preset("paper", global_batch_size=512).for_variant("self").steps == 17_579
    assert TrainConfig.preset("paper", subset_sets=1000).steps == 4
    # typed steps replace the epoch arithmetic (and say so: epochs 0) and its subset, unless one is given too
    quick = TrainConfig.preset("paper", steps=30).for_variant("self")
    assert (quick.steps, quick.epochs, quick.subset_sets) == (30, 0, 0)
    capped = TrainConfig.preset("paper", steps=30, subset_sets={"self": 90, "dino": 60}).for_variant("dino")
    assert (capped.steps, capped.epochs, capped.subset_sets) == (30, 0, 60)
    # the checkpoint's train_config reloads to the same config
    assert TrainConfig(**self_.to_dict()) == self_
    # the CPU presets keep their step counts
    assert (TrainConfig.preset("tiny").steps, TrainConfig.preset("demo").steps) == (50, 8000)
    assert TrainConfig.preset("tiny").subset_sets == 0 and TrainConfig.preset("tiny").for_variant("dino").steps == 50


def test_contradictory_lengths_are_refused():
    with pytest.raises(ValueError, match="contradicts"):
        TrainConfig(steps=10, subset_sets=1000, epochs=1, global_batch_size=256)
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig(steps=0, subset_sets=1000, epochs=1)
    with pytest.raises(ValueError, match="names every variant"):
        TrainConfig(subset_sets={"self": 10})
    with pytest.raises(ValueError, match="subset_sets"):
        TrainConfig(subset_sets=-1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)


def test_the_subset_is_a_seeded_draw_of_whole_shards(tmp_path):
    urls = feature_shards(tmp_path, [3] * 10)
    chosen, record = draw_subset(urls, 7, seed=0)
    assert len(chosen) == 3 and chosen == sorted(chosen) and set(chosen) <= set(urls)  # 9 >= 7 sets, by name
    assert record["rule"] == SUBSET_RULE and record["sets"] == 9 and record["requested_sets"] == 7
    assert (record["of_sets"], record["of_shards"], record["seed"]) == (30, 10, 0)
    assert draw_subset(list(reversed(urls)), 7, seed=0) == (chosen, record)  # the listing order does not matter
    other, other_record = draw_subset(urls, 7, seed=1)  # another seed, another draw (for these shards)
    assert other != chosen and other_record["shards_sha256"] != record["shards_sha256"]
    bigger, _ = draw_subset(urls, 15, seed=0)
    assert set(chosen) <= set(bigger)  # one seed: the smaller subset (M2M-DINO's) within the larger one
    everything, whole = draw_subset(urls, 0, seed=0)
    assert everything == urls and whole["rule"] == "all" and whole["sets"] == 30
    with pytest.raises(ValueError, match="hold only 30 sets"):
        draw_subset(urls, 31, seed=0)


def test_a_tiny_checkpoint_records_its_subset(tmp_path):
    urls = feature_shards(tmp_path / "features", [4, 4, 4, 4])
    tc = TrainConfig.preset("tiny", subset_sets={"self": 8, "dino": 4}, epochs=1, global_batch_size=4,
                            batch_size=2, n_images=2, checkpoint_every=0, log_every=1)
    assert tc.steps == 0 and tc.for_variant("self").steps == 2 and tc.for_variant("dino").steps == 1
    result = train(MICRO, tc, urls, tmp_path / "run", progress=False, device="cpu")
    assert result.steps == 2  # M2M-Self's own: ceil(8 x 1 / 4)
    state = json.loads((tmp_path / "run" / "checkpoint-0000002" / "train_state.json").read_text())
    subset = state["data_subset"]
    assert subset == result.data_subset and subset["rule"] == SUBSET_RULE and subset["seed"] == 0
    assert (subset["requested_sets"], subset["sets"], subset["shards"], subset["of_sets"]) == (8, 8, 2, 16)
    assert subset["shards_sha256"] == draw_subset(urls, 8, 0)[1]["shards_sha256"]
    assert state["train_config"]["subset_sets"] == 8 and state["train_config"]["steps"] == 2
    # a resume on another subset (seed 5 draws shards 1 and 3, seed 0 drew 0 and 3) is refused, naming it
    other = TrainConfig.preset("tiny", subset_sets=8, epochs=2, global_batch_size=4, batch_size=2, n_images=2,
                               checkpoint_every=0, log_every=1, seed=5)
    with pytest.raises(ValueError, match="another subset"):
        train(MICRO, other, urls, tmp_path / "run", progress=False, device="cpu", resume_from="latest")
