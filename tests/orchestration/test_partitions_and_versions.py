"""Concurrent MIS partitions under the multiprocess executor, idempotent re-materialization, and DVC
restoring a previous revision's shards and checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from m2m_pipeline.orchestration.profiles import PROFILES

from .conftest import REPO, dvc, resources_for, run

DAGSTER = str(Path(sys.executable).parent / "dagster")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def range_tags() -> dict[str, str]:
    return {"dagster/asset_partition_range_start": "0",
            "dagster/asset_partition_range_end": str(PROFILES["smoke"].num_partitions - 1)}


@pytest.mark.slow
def test_two_partitions_concurrently_then_noop(project: Path, smoke_assets) -> None:
    res = resources_for(project)
    # the unpartitioned inputs the partitions share (the captions and autoencoder jobs)
    assert materialize([smoke_assets[n] for n in ("raw_captions", "filtered_captions", "autoencoder")],
                       resources=res).success
    env = {**os.environ, "M2M_REPO_DIR": str(project), "DAGSTER_HOME": str(project / ".state" / "dagster"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    Path(env["DAGSTER_HOME"]).mkdir(parents=True)
    shutil.copy(REPO / "m2m_pipeline/orchestration/dagster.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    # create the instance's SQLite storages once: two runs creating them at the same moment race in alembic
    run([DAGSTER, "instance", "migrate"], project, env=env)
    procs = [subprocess.Popen([DAGSTER, "job", "execute", "-m", "m2m_pipeline.definitions", "-j",
                               "m2m_smoke_mis_job", "-c", str(REPO / "m2m_pipeline/configs/smoke.yaml"),
                               "--tags", json.dumps({"dagster/partition": key})],
                              cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for key in ("0", "1")]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0 and "RUN_SUCCESS" in log, log[-4000:]

    from m2m_pipeline.data import validate_feature_shard, validate_mis_shard

    world = PROFILES["smoke"].num_partitions
    mis = project / "assets/smoke/mis"
    shards = sorted(mis.glob("*/mis-*.tar"))
    assert {int(s.stem.split("-")[1]) % world for s in shards} == {0, 1}
    for shard in shards:
        assert validate_mis_shard(shard).passed, shard
        assert validate_feature_shard(project / "assets/smoke/features" / shard.parent.name / shard.name).passed
    assert not list((project / "assets").rglob("*.tmp"))
    status = dvc("status", "mis_shards@smoke", "feature_caches@smoke", cwd=project)
    assert "up to date" in status, status  # the later commit holds both runs' shards

    # re-materializing a finished partition is a no-op...
    before = {s: (s.stat().st_mtime_ns, sha(s)) for s in shards}
    result = materialize([smoke_assets["mis_shards"]], resources=res, partition_key="0")
    meta = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert meta["shards_written"].value == 0 and meta["shards_skipped"].value == meta["shards"].value > 0
    assert {s: (s.stat().st_mtime_ns, sha(s)) for s in shards} == before
    # ...unless forced (same bytes: generation is reproducible)
    result = materialize([smoke_assets["mis_shards"]], resources=res, partition_key="0",
                         run_config={"ops": {"smoke__mis_shards": {"config": {"force": True}}}})
    meta = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert meta["shards_written"].value == meta["shards"].value > 0
    assert {s: sha(s) for s in shards} == {s: h for s, (_, h) in before.items()}


@pytest.mark.slow
def test_dvc_checkout_restores_previous_revision(project: Path, smoke_assets) -> None:
    chain = [smoke_assets[n] for n in ("raw_captions", "filtered_captions", "autoencoder", "mis_shards",
                                       "latent_cache", "attribute_oracle", "base_model", "m2m_self_checkpoint")]
    shard = project / "assets/smoke/mis/train/mis-000000.tar"
    model = project / "models/smoke/m2m_self/final/model.safetensors"

    def version(commit_message: str, **settings: object) -> tuple[str, str]:
        result = materialize(chain, resources=resources_for(project, **settings), tags=range_tags(),
                             instance=DagsterInstance.ephemeral(),
                             run_config={"ops": {"smoke__mis_shards": {"config": {"force": True}}}})
        assert result.success
        run(["git", "add", "dvc.lock"], project)
        run(["git", "commit", "-q", "-m", commit_message], project)
        return sha(shard), sha(model)

    first = version("v1", train={"steps": 2}, mis={"seed": 0})
    second = version("v2: new image seed, more steps", train={"steps": 3}, mis={"seed": 1})
    assert first[0] != second[0] and first[1] != second[1]

    shutil.rmtree(project / ".dvc" / "cache")  # restore from the remote the assets pushed to
    run(["git", "checkout", "-q", "HEAD~1"], project)
    dvc("pull", "--force", "mis_shards@smoke", "m2m_self_checkpoint@smoke", cwd=project)
    assert (sha(shard), sha(model)) == first
    run(["git", "checkout", "-q", "main"], project)
    dvc("pull", "--force", "mis_shards@smoke", "m2m_self_checkpoint@smoke", cwd=project)
    assert (sha(shard), sha(model)) == second
