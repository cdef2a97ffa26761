"""dvc.yaml mirrors the Dagster asset graph: a stage per asset (latent_cache and dino_features share one),
outs where the assets write, deps on the upstream assets' outs, commands running exactly those assets' op."""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey

from m2m_pipeline.orchestration.assets import DVC_STAGE as CHAIN_STAGES
from m2m_pipeline.orchestration.assets import layout as chain_layout
from m2m_pipeline.orchestration.finetune_assets import (
    FINETUNE_DVC_STAGE,
    finetune_layout,
)
from m2m_pipeline.orchestration.profiles import PROFILES

DVC_STAGE = {**CHAIN_STAGES, **FINETUNE_DVC_STAGE}
layout = lambda profile: {**chain_layout(profile), **finetune_layout(profile)}
DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"
OUTS = {"latent_cache": "features", "dino_features": "features"}  # layout key of each asset's output


def stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def expand(text: str, key: str, item: dict) -> str:
    text = text.replace("${key}", key).replace("${materialize}", "MATERIALIZE")
    for name, value in item.items():
        text = text.replace("${item." + name + "}", str(value))
    return text


@pytest.fixture(scope="module")
def repo():
    from m2m_pipeline.definitions import defs

    return defs.get_repository_def()


@pytest.fixture(scope="module")
def graph(repo):
    return repo.asset_graph


@pytest.mark.parametrize("profile", ["smoke", "demo"])
def test_dvc_yaml_matches_asset_graph(repo, graph, profile: str) -> None:
    prof = PROFILES[profile]
    paths = layout(prof)
    by_stage: dict[str, list[str]] = defaultdict(list)
    names = sorted(k.path[-1] for k in graph.get_all_asset_keys() if k.path[0] == profile)
    for name in names:
        assert name in DVC_STAGE, f"asset {profile}/{name} has no dvc.yaml stage"
        by_stage[DVC_STAGE[name]].append(name)
    declared = stages()
    assert set(declared) == set(by_stage), "dvc.yaml stages and asset graph differ"
    out_of = lambda name: str(paths[OUTS.get(name, name)])
    for stage, assets in by_stage.items():
        entry = declared[stage]
        items = entry["foreach"]
        assert profile in items, f"stage {stage} has no foreach item {profile}"
        item = items[profile]
        body = entry["do"]
        outs = [expand(o, profile, item) for o in body["outs"]]
        assert sorted(outs) == sorted({out_of(a) for a in assets}), stage
        deps = {expand(d, profile, item) for d in body["deps"]}
        upstream = {p.path[-1] for a in assets for p in graph.get(AssetKey([profile, a])).parent_keys}
        upstream -= set(assets)
        want = {out_of(u) for u in upstream}
        assert want <= deps, f"stage {stage}@{profile} misses deps {want - deps}"
        stray = {d for d in deps if d.startswith(("assets/", "models/"))} - want
        assert not stray, f"stage {stage}@{profile} depends on {stray}, which its assets do not"
        cmd = " ".join(expand(body["cmd"], profile, item).split())
        args = shlex.split(cmd)
        job = repo.get_job(args[args.index("-j") + 1])
        op = args[args.index("-o") + 1]
        # the op runs exactly this stage's assets, in a job that holds them
        node = graph.get(AssetKey([profile, assets[0]])).assets_def.node_def.name
        assert op == node, stage
        assert {AssetKey([profile, a]) for a in assets} == set(graph.get(AssetKey([profile, assets[0]])).assets_def.keys)
        assert all(job.asset_layer.has(AssetKey([profile, a])) for a in assets), stage
        partitioned = graph.get(AssetKey([profile, assets[0]])).partitions_def is not None
        if partitioned:
            tags = json.loads(args[args.index("--tags") + 1])
            assert tags == {"dagster/asset_partition_range_start": "0",
                            "dagster/asset_partition_range_end": str(prof.num_partitions - 1)}, stage
        else:
            assert "--tags" not in args
        assert f"-c m2m_pipeline/configs/{profile}.yaml" in cmd
        assert cmd.startswith("MATERIALIZE")
    assert stages()["raw_captions"]["do"]["cmd"].startswith("${materialize}")
    materialize = yaml.safe_load(DVC_YAML.read_text())["vars"][0]["materialize"]
    assert "M2M_DVC=off" in materialize and "dagster job execute" in materialize
