"""The whole procedural MIS chain in one call: shapes-world caption TSV -> CLIP-length filter -> MIS shards ->
feature shards, per split (what `m2m demo`, `m2m train --data procedural` and the tests build). The Dagster
assets run the same steps one asset each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from m2m_pipeline.data.captions import SPLITS, filter_captions
from m2m_pipeline.data.config import MISConfig
from m2m_pipeline.data.features import build_feature_shards
from m2m_pipeline.data.generate import generate_mis, make_generator
from m2m_pipeline.data.shapes import write_shapes_caption_tsv


def build_procedural_mis(cfg: MISConfig, workdir: str | os.PathLike, splits: Sequence[str] = SPLITS,
                         progress: bool = True, device: str | None = None) -> dict[str, Path]:
    """WORKDIR/captions.tsv, filtered_captions.jsonl, mis/<split>/, features/<split>/; returns the feature folder
    of each split. Re-running skips what is complete (manifests)."""
    if cfg.generator != "shapes" or not cfg.num_captions:
        raise ValueError(f"MIS preset {cfg.name!r} is not procedural (generator {cfg.generator!r}, "
                         f"{cfg.num_captions} captions); use filter_captions / generate_mis on real captions")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tsv = write_shapes_caption_tsv(workdir / "captions.tsv", cfg.num_captions, seed=cfg.seed)
    table = workdir / "filtered_captions.jsonl"
    filter_captions([tsv], table, cfg, progress=progress)
    out = {}
    for split in splits:
        generate_mis(table, workdir / "mis" / split, make_generator(cfg, device), cfg, split=split, progress=progress)
        build_feature_shards(workdir / "mis" / split, workdir / "features" / split, cfg, device=device,
                             progress=progress)
        out[split] = workdir / "features" / split
    return out
