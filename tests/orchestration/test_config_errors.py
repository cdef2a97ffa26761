"""Bad config fails before any work starts, with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import Failure, materialize

from m2m_pipeline.orchestration.profiles import PROFILES
from m2m_pipeline.orchestration.resources import (
    ComputeResource,
    DVCResource,
    M2MSettings,
    MLflowResource,
)

from .conftest import resources_for


@pytest.mark.parametrize("field,value", [("mis_preset", "huge"), ("net_preset", "galaxy"),
                                         ("train_preset", "forever"), ("profile", "giant")])
def test_unknown_preset_names_the_field(field: str, value: str) -> None:
    with pytest.raises(Exception, match=f"{field}.*{value}"):
        M2MSettings(**{field: value})


@pytest.mark.parametrize("group,field,cls", [("train", "steps", "TrainConfig"), ("train", "batch_size", "TrainConfig"),
                                             ("eval", "num_sets", "EvalSpec"), ("eval", "steps", "EvalSpec"),
                                             ("mis", "images_per_set", "MISConfig")])
def test_bad_overrides_name_the_field(group: str, field: str, cls: str, tmp_path: Path) -> None:
    """The settings' overrides are the library classes' own fields: an unknown one is refused at once naming
    the class's fields, a bad value when the profile is resolved, by the class's own check."""
    with pytest.raises(Exception, match=f"config.{group}.{field}x: not a {cls} field; choose from .*'{field}'"):
        M2MSettings(**{group: {f"{field}x": 3}})
    with pytest.raises(Failure, match=f"config.{group}: .*{field}"):
        M2MSettings(repo_dir=str(tmp_path), **{group: {field: -3}}).resolve(PROFILES["smoke"])


def test_overrides_reach_the_resolved_configs(tmp_path: Path) -> None:
    r = M2MSettings(repo_dir=str(tmp_path), train={"steps": 7, "lr": 2e-4}, eval={"context_policy": "window-4"},
                    mis={"seed": 5}).resolve(PROFILES["smoke"])
    assert r.train_overrides["steps"] == 7 and r.train_overrides["lr"] == 2e-4
    assert (r.eval.window, r.eval.anchors) == (4, 0) and r.mis.seed == 5


def test_other_resources_validate() -> None:
    with pytest.raises(Exception, match="compute.config.device"):
        ComputeResource(device="tpu")
    with pytest.raises(Exception, match="compute.config.num_processes"):
        ComputeResource(num_processes=0)
    with pytest.raises(Exception, match="autoencoder_threads must be >= 0"):
        ComputeResource(autoencoder_threads=-1)
    with pytest.raises(Exception, match="mlflow.config.tracking_uri"):
        MLflowResource(mode="production")
    with pytest.raises(Exception, match="dvc.config.remote"):
        DVCResource(mode="production", remote="local")


def test_compute_threads_scope_restores_the_thread_count() -> None:
    import torch

    before = torch.get_num_threads()
    with ComputeResource(autoencoder_threads=1).threads(1):
        assert torch.get_num_threads() == 1
    with ComputeResource().threads(0):  # 0: unchanged
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_missing_weights_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "data" / "cc12m").mkdir(parents=True)
    (tmp_path / "data" / "cc12m" / "part-0.tsv").write_text("u\ta caption\n")
    with pytest.raises(Failure, match="sd_model_path"):
        M2MSettings(repo_dir=str(tmp_path)).resolve(PROFILES["paper"])
    (tmp_path / "models" / "stable-diffusion-2-1-base").mkdir(parents=True)
    with pytest.raises(Failure, match="dino_path"):
        M2MSettings(repo_dir=str(tmp_path)).resolve(PROFILES["paper"])
    with pytest.raises(Failure, match="caption_source"):
        M2MSettings(repo_dir=str(tmp_path), caption_source="nowhere/*.tsv").resolve(PROFILES["smoke"])


def test_profile_mismatch_and_partition_change_fail(tmp_path: Path) -> None:
    with pytest.raises(Failure, match="config.profile is 'demo'"):
        M2MSettings(repo_dir=str(tmp_path), profile="demo").resolve(PROFILES["smoke"])
    with pytest.raises(Failure, match="mis_preset.*partitions"):
        M2MSettings(repo_dir=str(tmp_path), mis_preset="demo").resolve(PROFILES["smoke"])


def test_bad_run_config_fails_before_work(tmp_path: Path, smoke_assets) -> None:
    """A run whose config is bad writes nothing: the first step fails while its resources initialise."""
    res = resources_for(tmp_path, dvc_on=False)
    res["settings"] = M2MSettings.configure_at_launch()
    result = materialize([smoke_assets["raw_captions"], smoke_assets["filtered_captions"]], resources=res,
                         run_config={"resources": {"settings": {"config": {"repo_dir": str(tmp_path),
                                                                           "train": {"steps": -1}}}}},
                         raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure or e.is_failure)
    assert "config.train: TrainConfig.steps must be >= 1" in str(failure.event_specific_data)
    assert not (tmp_path / "assets").exists()
