"""Task fine-tuning assets: one definition path for every profile (TASK_DATA says "stand-in" or "folder"); the
smoke profile's stand-ins, the paper profile's real folders (run settings objaverse_dir / vgsi_dir, checked when
the config resolves) and M2M-DINO base, and a tiny run of the folder path on fixtures in the real layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, Failure, materialize

from m2m_pipeline.orchestration.profiles import PROFILES

from .conftest import resources_for

PAPER_TASK_ASSETS = ("objaverse_renders", "vgsi_procedures", "nvs_checkpoint", "procedure_checkpoint",
                     "nvs_evaluation", "procedure_evaluation")


@pytest.fixture(scope="module")
def defs():
    from m2m_pipeline.definitions import defs

    return defs


def test_paper_profile_has_its_task_assets(defs) -> None:
    from m2m_pipeline.orchestration.finetune_assets import TASK_DATA, task_asset_names

    graph = defs.get_repository_def().asset_graph
    assert task_asset_names(PROFILES["paper"]) == list(PAPER_TASK_ASSETS)
    for name in PAPER_TASK_ASSETS:
        assert graph.has(AssetKey(["paper", name])), name
        assert graph.get(AssetKey(["paper", name])).group_name == "tasks"
    assert not graph.has(AssetKey(["paper", "objaverse_standin"]))  # the paper reads real folders
    # Figs. 7-8: the paper's task models start from M2M-DINO; the CPU profiles keep M2M-Self
    assert TASK_DATA["paper"].base_variant == "dino" and TASK_DATA["smoke"].base_variant == "self"
    parents = graph.get(AssetKey(["paper", "nvs_checkpoint"])).parent_keys
    assert {AssetKey(["paper", "m2m_dino_checkpoint"]), AssetKey(["paper", "objaverse_renders"])} <= parents
    assert AssetKey(["paper", "vgsi_procedures"]) in graph.get(AssetKey(["paper", "procedure_evaluation"])).parent_keys
    assert AssetKey(["smoke", "m2m_self_checkpoint"]) in graph.get(AssetKey(["smoke", "nvs_checkpoint"])).parent_keys
    # the chain job holds them (the paper dry run runs its ops); the task job runs on Kubernetes with a GPU a step
    nodes = set(defs.resolve_job_def("m2m_paper_job").graph.node_names())
    assert {f"paper__{n}" for n in PAPER_TASK_ASSETS} <= nodes
    assert defs.resolve_job_def("m2m_paper_finetune_job").executor_def.name == "k8s"
    op = defs.get_repository_def().assets_defs_by_key[AssetKey(["paper", "nvs_checkpoint"])].op
    assert "nvidia.com/gpu" in op.tags["dagster-k8s/config"]
    assert "m2m/gpu" not in defs.get_repository_def().assets_defs_by_key[AssetKey(["demo", "nvs_checkpoint"])].op.tags


def test_task_folder_settings_are_checked_when_the_config_resolves(tmp_path: Path) -> None:
    from m2m_pipeline.orchestration.finetune_assets import task_data_root
    from m2m_pipeline.orchestration.resources import M2MSettings

    paper = PROFILES["paper"]
    for folder in ("models/stable-diffusion-2-1-base", "models/dinov2-giant", "data/cc12m"):
        (tmp_path / folder).mkdir(parents=True)  # what resolve checks before the task folders
    (tmp_path / "data/cc12m/part-0.tsv").write_text("u\ta caption\n")
    settings = M2MSettings(repo_dir=str(tmp_path), objaverse_dir="data/objaverse", vgsi_dir="data/vgsi")
    with pytest.raises(Failure, match=rf"resources\.settings\.config\.objaverse_dir: no folder at "
                                      rf"{tmp_path}/data/objaverse") as err:
        settings.resolve(paper)
    assert "\n" not in str(err.value.description)  # one line
    (tmp_path / "data/objaverse").mkdir(parents=True)
    with pytest.raises(Failure, match=r"resources\.settings\.config\.vgsi_dir: no folder at"):
        settings.resolve(paper)
    (tmp_path / "data/vgsi").mkdir()
    try:  # past the task folders (what resolve checks after them may still be missing here)
        r = settings.resolve(paper)
        assert r.task_dirs == {"objaverse_dir": tmp_path / "data/objaverse", "vgsi_dir": tmp_path / "data/vgsi"}
        assert task_data_root(paper, r, "procedure") == tmp_path / "data/vgsi"
    except Failure as exn:
        assert "objaverse_dir" not in str(exn) and "vgsi_dir" not in str(exn)
    with pytest.raises(Failure, match=r"objaverse_dir: profile 'smoke' has no task data folders"):
        settings.resolve(PROFILES["smoke"])
    # unset: the chain's own steps run; the task steps fail naming the setting
    from m2m_pipeline.orchestration.resources import Resolved

    unset = Resolved(profile=paper, root=tmp_path, mis=None, net_preset="paper", train_preset="paper",  # type: ignore[arg-type]
                     train_overrides={}, eval=paper.eval, caption_source="")
    with pytest.raises(Failure, match=r"resources\.settings\.config\.objaverse_dir: not set"):
        task_data_root(paper, unset, "nvs")


def test_asset_config_overrides_are_checked() -> None:
    from m2m_pipeline.orchestration.finetune_assets import (
        FinetuneAssetConfig,
        _finetune_config,
    )

    ft = _finetune_config(PROFILES["paper"], "procedure", FinetuneAssetConfig(
        steps=1, finetune={"held_out": 1, "validation": 1}, train={"batch_size": 1, "global_batch_size": 1},
        eval={"steps": 1}))
    assert (ft.train.steps, ft.train.batch_size, ft.held_out, ft.eval.steps, ft.eval.target_images) == (1, 1, 1, 1, 4)
    with pytest.raises(Failure, match=r"config\.train\.batch: not a TrainConfig field"):
        _finetune_config(PROFILES["paper"], "nvs", FinetuneAssetConfig(train={"batch": 1}))


def test_dryrun_task_ops_validate_against_the_paper_job(defs) -> None:
    """The op config the paper dry run gives the task steps is valid for m2m_paper_job and sizes them down."""
    import yaml
    from dagster import validate_run_config

    from m2m_pipeline.orchestration.finetune_assets import (
        DRYRUN_TASK_ITEMS,
        DRYRUN_TASK_STEPS,
        FinetuneAssetConfig,
        _finetune_config,
        dryrun_task_ops,
    )
    from m2m_pipeline.tasks.finetune import FinetuneConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "m2m_pipeline/configs/paper.yaml").read_text())
    ops = dryrun_task_ops(PROFILES["paper"])
    assert validate_run_config(defs.resolve_job_def("m2m_paper_job"), {**config, "ops": ops})
    ft = _finetune_config(PROFILES["paper"], "procedure",
                          FinetuneAssetConfig(**ops["paper__procedure_checkpoint"]["config"]))
    assert ft.train.steps == 1 and ft.held_out + ft.validation + ft.train.batch_size < DRYRUN_TASK_ITEMS
    assert DRYRUN_TASK_STEPS >= FinetuneConfig.preset("paper", "position").min_steps


def _base_and_autoencoder(project: Path, variant: str) -> None:
    """The upstream autoencoder and base checkpoint assets' outputs (the chain itself is tested in test_assets.py)."""
    from m2m_pipeline.autoencoder import AutoencoderConfig, train_autoencoder
    from m2m_pipeline.network import M2MConfig, M2MUNet

    M2MUNet(M2MConfig.preset(PROFILES["smoke"].net_preset, variant)).save_pretrained(
        project / f"models/smoke/m2m_{variant}/final")
    train_autoencoder(AutoencoderConfig.preset(PROFILES["smoke"].autoencoder_preset, steps=2),
                      project / "models/smoke/autoencoder", progress=False)


def _materializations(result) -> dict[str, dict]:
    return {m.asset_key.path[-1]: m.metadata
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}


@pytest.mark.slow
def test_finetune_assets_materialize_on_smoke(project: Path) -> None:
    from m2m_pipeline.orchestration.finetune_assets import (
        TASK_DATA,
        build_finetune_assets,
    )

    _base_and_autoencoder(project, TASK_DATA["smoke"].base_variant)
    result = materialize(build_finetune_assets(PROFILES["smoke"]), resources=resources_for(project, dvc_on=False),
                         instance=DagsterInstance.ephemeral())
    assert result.success
    mats = _materializations(result)
    assert mats["objaverse_standin"]["objects"].value == 8 and mats["vgsi_standin"]["procedures"].value == 8
    assert mats["nvs_checkpoint"]["steps"].value == 4
    for task, baseline in (("nvs", "copy_input_view"), ("procedure", "repeat_last_step")):
        meta = mats[f"{task}_evaluation"]
        assert f"| {baseline} |" in meta["table"].value and "| fine-tuned |" in meta["table"].value
        assert "data:image/png;base64," in meta["grid"].value and "data:image/png;base64," in meta["figure"].value
        assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
        assert (project / f"assets/smoke/evaluation/{task}/metrics.json").is_file()
        assert (project / f"models/smoke/{task}/final/model.safetensors").is_file()
    assert "progress_error" in mats["procedure_evaluation"]["table"].value


@pytest.mark.slow
def test_folder_task_assets_materialize_on_fixtures(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper profile's path ("folder" task data, run settings objaverse_dir / vgsi_dir) at tiny size: the
    smoke profile switched to folders, fixtures in the real layouts, the compute device through to the report."""
    import json

    from m2m_pipeline.orchestration import finetune_assets as fa
    from m2m_pipeline.tasks.folders import write_objaverse_fixture, write_vgsi_fixture

    monkeypatch.setitem(fa.TASK_DATA, "smoke", fa.TaskDataSpec(preset="tiny", source="folder", base_variant="self"))
    write_objaverse_fixture(project / "data/objaverse", objects=8, image_size=32)
    write_vgsi_fixture(project / "data/vgsi", procedures=8, steps=4, image_size=24)
    _base_and_autoencoder(project, "self")
    assets = fa.build_finetune_assets(PROFILES["smoke"])
    assert sorted(k.path[-1] for a in assets for k in a.keys) == sorted(PAPER_TASK_ASSETS)
    result = materialize(assets, instance=DagsterInstance.ephemeral(), resources=resources_for(
        project, dvc_on=False, objaverse_dir="data/objaverse", vgsi_dir="data/vgsi"))
    assert result.success
    mats = _materializations(result)
    assert mats["objaverse_renders"]["objects"].value == 8 and mats["vgsi_procedures"]["usable"].value == 8
    assert "data:image/png;base64," in mats["vgsi_procedures"]["preview"].value
    assert (project / "assets/smoke/tasks/objaverse_renders/index.json").is_file()
    assert mats["nvs_checkpoint"]["device"].value == "cpu" and mats["procedure_evaluation"]["device"].value == "cpu"
    splits = json.loads((project / "models/smoke/nvs/splits.json").read_text())
    assert splits["data"] == str(project / "data/objaverse") and splits["config"]["task"] == "camera"
    for task in ("nvs", "procedure"):
        report = json.loads((project / f"assets/smoke/evaluation/{task}/metrics.json").read_text())
        assert report["sampler"]["device"] == "cpu" and "psnr_mean" in report["summary"]["fine-tuned"]
        assert (project / f"assets/smoke/evaluation/{task}/figure.png").is_file()
