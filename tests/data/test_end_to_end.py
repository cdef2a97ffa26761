"""The demo preset's code path end to end at reduced size: TSV -> filter -> shards -> features -> loader."""

from __future__ import annotations

import pytest

from m2m_pipeline.data import (
    build_feature_shards,
    filter_captions,
    generate_mis,
    get_preset,
    make_generator,
    make_loader,
    validate_caption_table,
    validate_feature_shard,
    validate_mis_shard,
    write_shapes_caption_tsv,
)


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path):
    cfg = get_preset("demo").replace(num_captions=96, sets_per_shard=16, feature_batch_size=100)
    write_shapes_caption_tsv(tmp_path / "captions.tsv", cfg.num_captions, cfg.seed)
    stats = filter_captions(tmp_path / "captions.tsv", tmp_path / "captions.jsonl", cfg, progress=False)
    assert stats.kept == 96 and validate_caption_table(tmp_path / "captions.jsonl").passed
    generator = make_generator(cfg)
    manifests = generate_mis(tmp_path / "captions.jsonl", tmp_path / "mis", generator, cfg, rank=0, world_size=2,
                             progress=False)
    manifests += generate_mis(tmp_path / "captions.jsonl", tmp_path / "mis", generator, cfg, rank=1, world_size=2,
                              progress=False)
    assert sum(m["num_samples"] for m in manifests) == stats.train
    assert all(validate_mis_shard(s).passed for s in (tmp_path / "mis").glob("*.tar"))
    build_feature_shards(tmp_path / "mis", tmp_path / "features", cfg, device="cpu", progress=False)
    assert all(validate_feature_shard(s).passed for s in (tmp_path / "features").glob("*.tar"))
    batch = next(iter(make_loader(tmp_path / "features", n_images=5, batch_size=8, shuffle_buffer=32)))
    assert batch["latents"].shape == (8, 5, 3, 32, 32)
    assert batch["dino"].shape == (8, 5, 1 + (32 // 8) ** 2, cfg.dino_hidden_size)
