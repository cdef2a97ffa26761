"""The code location loads; jobs, groups, partitions and checks are what the profiles say; run configs
validate against their jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, validate_run_config

from m2m_pipeline.orchestration.profiles import PROFILES

CONFIGS = Path(__file__).resolve().parents[2] / "m2m_pipeline" / "configs"
GROUPS = {
    "raw_captions": "captions", "filtered_captions": "captions", "mis_shards": "mis", "latent_cache": "features",
    "dino_features": "features", "m2m_self_checkpoint": "training", "m2m_dino_checkpoint": "training",
    "m2m_self_evaluation_report": "evaluation", "m2m_dino_evaluation_report": "evaluation",
    "sampling_benchmark": "evaluation", "attribute_oracle": "evaluation", "learnability": "evaluation",
}
SHAPES_ONLY = {"attribute_oracle", "learnability"}  # the shapes world's judge and verdict (RunProfile.shapes_world)


@pytest.fixture(scope="module")
def defs():
    from m2m_pipeline.definitions import defs

    return defs


def test_definitions_load(defs) -> None:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    for profile in PROFILES:
        for name, group in GROUPS.items():
            key = AssetKey([profile, name])
            if name in SHAPES_ONLY and not PROFILES[profile].shapes_world:
                assert not graph.has(key), key  # the paper profile is judged by Inception and CLIP
                continue
            assert graph.has(key), key
            assert graph.get(key).group_name == group
        for stage in ("", "_captions", "_mis", "_training", "_evaluation"):
            assert repo.has_job(f"m2m_{profile}{stage}_job")
    assert repo.has_job("m2m_smoke_job") and repo.has_job("m2m_demo_job")


def test_every_job_resolves(defs) -> None:
    """What `dagster dev` / the webserver does on load: resolve every job of every profile. `dagster job execute
    -j X` resolves only X, so a job selecting an asset its profile lacks (the paper profile's autoencoder job
    did) passed the smoke run and kept the UI from loading the code location."""
    from dagster import Definitions

    Definitions.validate_loadable(defs)
    jobs = {j.name for j in defs.get_repository_def().get_all_jobs()}
    # every profile with an oracle or an autoencoder to train has the job; the paper profile has neither
    assert {f"m2m_{p}_autoencoder_job" for p, prof in PROFILES.items() if prof.shapes_world} <= jobs
    assert "m2m_paper_autoencoder_job" not in jobs


def test_partitions_follow_profile(defs) -> None:
    graph = defs.get_repository_def().asset_graph
    for name, profile in PROFILES.items():
        for asset in ("mis_shards", "latent_cache", "dino_features"):
            keys = graph.get(AssetKey([name, asset])).partitions_def.get_partition_keys()
            assert keys == [str(i) for i in range(profile.num_partitions)]
        assert graph.get(AssetKey([name, "m2m_self_checkpoint"])).partitions_def is None
    assert PROFILES["smoke"].num_partitions == max(PROFILES["smoke"].shard_counts().values())


def test_blocking_checks_guard_training(defs) -> None:
    graph = defs.get_repository_def().asset_graph
    checks = {(k.asset_key.path[-1], k.name) for k in graph.asset_check_keys if k.asset_key.path[0] == "smoke"}
    assert {("filtered_captions", "caption_table_valid"), ("mis_shards", "mis_shards_valid"),
            ("latent_cache", "feature_shards_valid"), ("dino_features", "feature_shards_valid")} <= checks
    specs = [s for a in defs.get_repository_def().assets_defs_by_key.values() for s in a.check_specs]
    # Every check is defined beside its asset, except the autoencoder's: it reads a second asset (the oracle)
    # and runs as its own step once both exist.
    separate = {k for k in graph.asset_check_keys if k.name == "reconstructions_keep_attributes"}
    assert {k.asset_key.path[0] for k in separate} == {"smoke", "demo", "cluster"}  # the profiles that train one
    assert {s.key for s in specs} | separate == set(graph.asset_check_keys)
    assert all(s.blocking for s in specs)  # bad data stops the chain before training reads it
    for k in separate:
        check = graph.get_checks_def(k) if hasattr(graph, "get_checks_def") else None
        spec = next(iter(check.check_specs)) if check is not None else None
        assert spec is None or (spec.blocking and AssetKey([k.asset_key.path[0], "attribute_oracle"])
                                in {d.asset_key for d in spec.additional_deps})
        feature = graph.get(AssetKey([k.asset_key.path[0], "latent_cache"]))
        assert k.asset_key in feature.parent_keys  # features are built from the checked autoencoder


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_run_configs_validate(defs, profile: str) -> None:
    config = yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())
    job = defs.resolve_job_def(f"m2m_{profile}_job")
    assert validate_run_config(job, config)
    assert config["resources"]["settings"]["config"]["profile"] == profile


def test_chain_jobs_carry_partition_range(defs) -> None:
    for name, profile in PROFILES.items():
        tags = defs.resolve_job_def(f"m2m_{name}_job").tags
        assert tags["dagster/asset_partition_range_start"] == "0"
        assert tags["dagster/asset_partition_range_end"] == str(profile.num_partitions - 1)


def test_paper_job_runs_on_kubernetes_with_gpus(defs) -> None:
    job = defs.resolve_job_def("m2m_paper_job")
    assert job.executor_def.name == "k8s"
    repo = defs.get_repository_def()
    node = repo.assets_defs_by_key[AssetKey(["paper", "mis_shards"])].op
    assert "nvidia.com/gpu" in node.tags["dagster-k8s/config"]
    assert defs.resolve_job_def("m2m_demo_job").executor_def.name == "multiprocess"
