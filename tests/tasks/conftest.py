"""Small procedural datasets written once per test session (a few objects / procedures: well under a second)."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2m_pipeline.tasks.polyhedra import write_polyhedra
from m2m_pipeline.tasks.procedures import write_procedures


@pytest.fixture(scope="session")
def polyhedra_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("objaverse")
    write_polyhedra(root, n_objects=6, seed=3)
    return root


@pytest.fixture(scope="session")
def procedures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vgsi")
    write_procedures(root, n_procedures=9, seed=3)
    return root
