"""Task fine-tuning assets on the smoke profile: stand-in data -> NVS / procedure checkpoints fine-tuned from
the profile's base M2M checkpoint -> held-out evaluations with a metrics table, grid and MLflow runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from m2m_pipeline.orchestration.profiles import PROFILES

from .conftest import resources_for


@pytest.mark.slow
def test_finetune_assets_materialize_on_smoke(project: Path) -> None:
    from m2m_pipeline.autoencoder import AutoencoderConfig, train_autoencoder
    from m2m_pipeline.network import M2MConfig, M2MUNet
    from m2m_pipeline.orchestration.finetune_assets import BASE_VARIANT, build_finetune_assets

    # the upstream autoencoder and base checkpoint assets' outputs (the chain itself is tested in test_assets.py)
    M2MUNet(M2MConfig.preset(PROFILES["smoke"].net_preset, BASE_VARIANT)).save_pretrained(
        project / f"models/smoke/m2m_{BASE_VARIANT}/final")
    train_autoencoder(AutoencoderConfig.preset(PROFILES["smoke"].autoencoder_preset, steps=2),
                      project / "models/smoke/autoencoder", progress=False)
    result = materialize(build_finetune_assets(PROFILES["smoke"]), resources=resources_for(project, dvc_on=False),
                         instance=DagsterInstance.ephemeral())
    assert result.success
    mats = {m.asset_key.path[-1]: m.metadata
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}
    assert mats["objaverse_standin"]["objects"].value == 8 and mats["vgsi_standin"]["procedures"].value == 8
    assert mats["nvs_checkpoint"]["steps"].value == 4
    for task, baseline in (("nvs", "copy_input_view"), ("procedure", "repeat_last_step")):
        meta = mats[f"{task}_evaluation"]
        assert f"| {baseline} |" in meta["table"].value and "| fine-tuned |" in meta["table"].value
        assert "data:image/png;base64," in meta["grid"].value
        assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
        assert (project / f"assets/smoke/evaluation/{task}/metrics.json").is_file()
        assert (project / f"models/smoke/{task}/final/model.safetensors").is_file()
    assert "progress_error" in mats["procedure_evaluation"]["table"].value
