"""Fixtures: a throw-away project (git + DVC + local remote) and resources pointing into it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC repo holding this project's dvc.yaml, with the local remote under its .state/."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / ".gitignore").write_text("/.state/\n/assets/*\n/models/*\n")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    (root / ".dvc" / "config").write_text(
        "[core]\n    analytics = false\n    remote = local\n['remote \"local\"']\n    url = ../.state/dvc-remote\n")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    # dvc.yaml's code deps: the library files, so `dvc commit` finds every dep it hashes
    for dep in ("m2m_pipeline",):
        shutil.copytree(REPO / dep, root / dep, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "init"], root)
    return root


def resources_for(root: Path, dvc_on: bool = True, **settings: object) -> dict[str, object]:
    from m2m_pipeline.orchestration.resources import (
        ComputeResource,
        DVCResource,
        M2MSettings,
        MLflowResource,
    )

    return {
        "settings": M2MSettings(repo_dir=str(root), **settings),
        "compute": ComputeResource(device="cpu"),
        "mlflow": MLflowResource(repo_dir=str(root)),
        "dvc": DVCResource(repo_dir=str(root), mode="local" if dvc_on else "off"),
    }


@pytest.fixture
def smoke_assets() -> dict[str, object]:
    from m2m_pipeline.orchestration.assets import build_profile_assets
    from m2m_pipeline.orchestration.profiles import PROFILES

    assets = build_profile_assets(PROFILES["smoke"])
    by_name: dict[str, object] = {}
    for a in assets:
        for key in a.keys:
            by_name[key.path[-1]] = a
    return by_name


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("M2M_DVC", raising=False)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
