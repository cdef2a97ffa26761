"""Training loader (Sec. 7.1.1): N-image examples, random subset and order, seeded, split over ranks/workers."""

from __future__ import annotations

import torch

from m2m_pipeline.data import MISExamples, make_loader, read_manifest
from m2m_pipeline.data.loader import expand_shards


def all_keys(features) -> set[str]:
    return {k for shard in expand_shards(features) for k in read_manifest(shard)["keys"]}


def test_examples_have_the_documented_keys(tiny_mis):
    example = next(iter(MISExamples(tiny_mis["features"], n_images=5, shuffle_buffer=4)))
    assert set(example) == {"key", "shard", "shard_pass", "caption", "indices", "latents", "dino", "attributes"}
    assert example["latents"].shape == (5, 3, 16, 16) and example["latents"].dtype == torch.float32
    assert example["dino"].ndim == 3 and example["dino"].shape[0] == 5 and example["dino"].dtype == torch.float32
    indices = example["indices"].tolist()
    assert len(set(indices)) == 5 and all(0 <= i < 25 for i in indices)
    assert [p["index"] for p in example["attributes"]["images"]] == indices  # per-image truth follows the draw
    assert example["attributes"]["names"]["shape"] in example["caption"]


def test_subset_and_order_are_random_but_seeded(tiny_mis):
    def draws(seed, epoch=0):
        dataset = MISExamples(tiny_mis["features"], n_images=5, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return [(e["key"], tuple(e["indices"].tolist())) for e in dataset]

    a, b = draws(0), draws(0)
    assert a == b
    assert draws(1) != a and draws(0, epoch=1) != a
    assert len({indices for _, indices in a}) == len(a)       # every example draws anew
    assert any(list(ix) != sorted(ix) for _, ix in a)         # order is drawn too, not just the subset
    assert sorted(k for k, _ in a) == sorted(all_keys(tiny_mis["features"]))  # one pass = each set once


def test_ranks_and_workers_partition_the_shards(tiny_mis, monkeypatch):
    expected = all_keys(tiny_mis["features"])
    seen: list[str] = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.extend(e["key"] for e in MISExamples(tiny_mis["features"], shuffle_buffer=0))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert sorted(seen) == sorted(expected)
    loader = make_loader(tiny_mis["features"], n_images=3, batch_size=2, num_workers=2, shuffle_buffer=2)
    batches = list(loader)
    keys = [k for batch in batches for k in batch["key"]]
    assert sorted(keys) == sorted(expected)
    assert batches[0]["latents"].shape == (2, 3, 3, 16, 16) and batches[0]["dino"].shape[:2] == (2, 3)


def test_repeat_streams_forever_with_fresh_epochs(tiny_mis):
    dataset = MISExamples(tiny_mis["features"], n_images=2, repeat=True, shuffle_buffer=0)
    n = len(all_keys(tiny_mis["features"]))
    stream = iter(dataset)
    taken = [next(stream)["key"] for _ in range(2 * n + 1)]
    assert sorted(taken[:n]) == sorted(taken[n : 2 * n])
