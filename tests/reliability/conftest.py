"""Fixtures for the fault-injection tests (docs/reliability.md): one tiny MIS build (train and test splits, MIS and
feature shards) and one tiny training run, built once per session; every test damages its own copy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """captions.tsv -> captions.jsonl -> mis/{train,test} -> features/{train,test} of the tiny shapes preset."""
    from m2m_pipeline.data import build_feature_shards, filter_captions, generate_mis, get_preset, make_generator
    from m2m_pipeline.data import write_shapes_caption_tsv

    cfg = get_preset("tiny")
    root = tmp_path_factory.mktemp("built")
    write_shapes_caption_tsv(root / "captions.tsv", cfg.num_captions, cfg.seed)
    filter_captions(root / "captions.tsv", root / "captions.jsonl", cfg, progress=False)
    generator = make_generator(cfg)
    for split in ("train", "test"):
        generate_mis(root / "captions.jsonl", root / "mis" / split, generator, cfg, split=split, progress=False)
        build_feature_shards(root / "mis" / split, root / "features" / split, cfg, device="cpu", progress=False)
    return root


@pytest.fixture
def data(built, tmp_path) -> Path:
    """A private copy of the tiny build."""
    shutil.copytree(built, tmp_path / "built")
    return tmp_path / "built"


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A 4-step micro training run: checkpoint-0000002/, checkpoint-0000004/, final/."""
    from test_training_scale import MICRO, list_data, micro_config

    from m2m_pipeline.training import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(MICRO, micro_config(steps=4, checkpoint_every=2), list_data(), out, progress=False, device="cpu")
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the micro training run."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


COLLECTED: list[str] = []  # node ids of every reliability test collected, before -k / -m deselect any


def pytest_itemcollected(item) -> None:
    if "tests/reliability/" in item.nodeid:
        COLLECTED.append(item.nodeid.split("tests/reliability/", 1)[1])
