"""Materialize the smoke chain with test resources in a throw-away project: outputs, checks, metadata,
MLflow runs (parent + nested, same metric names for both variants) and DVC versioning."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from m2m_pipeline.orchestration.profiles import PROFILES

from .conftest import dvc, resources_for

KEYS = lambda *names: [AssetKey(["smoke", n]) for n in names]


def chain(smoke_assets) -> list:
    seen, out = set(), []
    for a in smoke_assets.values():
        if id(a) not in seen:
            seen.add(id(a))
            out.append(a)
    return out


def range_tags() -> dict[str, str]:
    last = str(PROFILES["smoke"].num_partitions - 1)
    return {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": last}


@pytest.mark.slow
def test_smoke_chain_materializes(project: Path, smoke_assets) -> None:
    instance = DagsterInstance.ephemeral()
    from m2m_pipeline.orchestration.assets import build_profile_assets

    every = build_profile_assets(PROFILES["smoke"])  # assets and the separately defined checks
    result = materialize(every, resources=resources_for(project, train={"steps": 4}, eval={"steps": 2}),
                         instance=instance, tags=range_tags())
    assert result.success
    mats = {m.asset_key.path[-1]: m.metadata
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}
    assert mats["filtered_captions"]["kept"].value == 16
    assert mats["mis_shards"]["sets"].value == 16 and mats["mis_shards"]["images"].value == 400
    assert "data:image/png;base64," in mats["mis_shards"]["preview"].value
    assert "data:image/png;base64," in mats["m2m_self_evaluation_report"]["grid"].value
    for figure in ("drift", "context_count", "zero_shot"):
        assert "data:image/png;base64," in mats["m2m_dino_evaluation_report"][figure].value
    assert "| colour |" in mats["m2m_self_evaluation_report"]["position1"].value
    assert "M2M-self" in mats["learnability"]["table"].value and "M2M-dino" in mats["learnability"]["table"].value
    assert "data:image/png;base64," in mats["sampling_benchmark"]["fig9"].value
    assert mats["m2m_dino_checkpoint"]["steps"].value == 4
    for meta in mats.values():
        assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
        assert meta["dvc_hash"].value and meta["dvc_hash"].value != "-"
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(checks) == 5 and all(c.passed for c in checks)
    assert (project / "models/smoke/m2m_self/final/model.safetensors").exists()
    assert (project / "assets/smoke/evaluation/m2m_dino/grid.png").exists()

    # MLflow: one parent for the Dagster run, a nested run per asset, same metric names for both variants
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / '.state/mlflow/mlflow.db'}")
    exp = client.get_experiment_by_name("m2m")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{result.run_id}'")
    parents = [r for r in runs if r.data.tags.get("m2m.parent") == "true"]
    assert len(parents) == 1
    nested = {r.data.tags["dagster.asset_key"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") ==
              parents[0].info.run_id}
    # one per core-chain asset (the task assets are tested on their own) and one for the reconstruction check
    assert len(nested) == 14 and "smoke/autoencoder:reconstructions_keep_attributes" in nested, sorted(nested)
    self_run, dino_run = nested["smoke/m2m_self_checkpoint"], nested["smoke/m2m_dino_checkpoint"]
    # both variants start from the profile's base model (Sec. 6.1), which its own asset trained
    assert self_run.data.params["init_from"] == dino_run.data.params["init_from"] == "models/smoke/base_model"
    assert "data:image/png;base64," in mats["base_model"]["samples"].value
    assert set(self_run.data.metrics) == set(dino_run.data.metrics) >= {"train/loss", "train/final_loss"}
    assert self_run.data.tags["dvc.outs"] and self_run.data.tags["git.commit"]
    tags = range_tags()
    partitions = f'{tags["dagster/asset_partition_range_start"]}...{tags["dagster/asset_partition_range_end"]}'
    assert nested["smoke/mis_shards"].data.tags["dagster.partition_key"] == partitions
    assert len(client.get_metric_history(self_run.info.run_id, "train/loss")) >= 1
    assert any(a.path == "grid.png" for a in client.list_artifacts(nested["smoke/m2m_self_evaluation_report"]
                                                                    .info.run_id))
    # DVC: every smoke stage committed and pushed
    status = dvc("status", "--with-deps", "sampling_benchmark@smoke", "m2m_self_evaluation_report@smoke",
                 "m2m_dino_evaluation_report@smoke", "learnability@smoke", cwd=project)
    assert "up to date" in status, status


@pytest.mark.slow
def test_blocking_check_stops_the_chain(project: Path, smoke_assets, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MIS shard that fails its validator fails the blocking check: the feature caches never run."""
    from m2m_pipeline import data
    from m2m_pipeline.data.validators import ValidationResult

    res = resources_for(project, dvc_on=False)
    assert materialize([smoke_assets["raw_captions"], smoke_assets["filtered_captions"]], resources=res).success

    def broken(shard, *args, **kwargs):
        result = ValidationResult("mis_shard_integrity", str(shard))
        result.fail(f"{shard}: sample abc: 24 images, expected 25")
        return result

    monkeypatch.setattr(data, "validate_mis_shard", broken)
    result = materialize([smoke_assets["mis_shards"], smoke_assets["latent_cache"]], resources=res,
                         partition_key="0", raise_on_error=False)
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert [c.passed for c in checks] == [False]
    assert not result.success
    assert not (project / "assets/smoke/features").exists()


@pytest.mark.slow
def test_training_through_dagster_pipes(project: Path, smoke_assets) -> None:
    """launcher: subprocess trains in a child process via Dagster Pipes (the accelerate path's twin)."""
    from m2m_pipeline.orchestration.resources import ComputeResource

    res = resources_for(project, dvc_on=False, train={"steps": 2})
    tags = range_tags()
    first = [smoke_assets[n] for n in ("raw_captions", "filtered_captions", "autoencoder", "mis_shards",
                                         "latent_cache", "attribute_oracle", "base_model")]
    assert materialize(first, resources=res, tags=tags).success
    res["compute"] = ComputeResource(device="cpu", launcher="subprocess")
    result = materialize([smoke_assets["m2m_self_checkpoint"]], resources=res)
    assert result.success
    meta = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert meta["steps"].value == 2
    assert (project / "models/smoke/m2m_self/final/model.safetensors").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / '.state/mlflow/mlflow.db'}")
    assert client.get_metric_history(meta["mlflow_run_id"].value, "train/loss")  # logged by the child
