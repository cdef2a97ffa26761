"""Shared fixtures for the evaluation tests: a quickly trained 16 px oracle (seconds, not the full recipe)."""

from __future__ import annotations

import pytest

from m2m_pipeline.evaluation.oracle import AttributeOracle, train_oracle

QUICK = {"train_images": 3000, "heldout_images": 500, "epochs": 4}  # ~5-10 s; full recipe: test_oracle_full_accuracy


@pytest.fixture(scope="session")
def quick_oracle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle") / "oracle16"
    train_oracle(16, out_dir=out, progress=False, min_accuracy=None, **QUICK)
    return out


@pytest.fixture(scope="session")
def quick_oracle(quick_oracle_dir) -> AttributeOracle:
    return AttributeOracle.load(quick_oracle_dir)
