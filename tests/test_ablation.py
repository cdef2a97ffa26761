"""The learnability ablation's rows and table (m2m_pipeline/ablation.py); its runs are documented, not tested."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from m2m_pipeline import ablation
from m2m_pipeline.cli import main
from m2m_pipeline.network import M2MConfig
from m2m_pipeline.training import TrainConfig


def test_every_row_builds_its_configs_and_names_are_unique():
    names = [row.name for row in ablation.ROWS]
    assert len(names) == len(set(names))
    for row in ablation.ROWS:
        net = M2MConfig.preset(row.net_preset, row.variant, **row.net)
        TrainConfig.preset("demo", **row.train)
        assert row.space == ("pixel" if net.autoencoder == "pixel" else "latent")
    assert {r.space for r in ablation.ROWS} == {"pixel", "latent"}
    assert {(r.space, r.variant) for r in ablation.ROWS} >= {("pixel", "dino"), ("pixel", "self"),
                                                             ("latent", "dino"), ("latent", "self")}


def test_table_reads_each_rows_record(tmp_path):
    row = ablation.ROWS_BY_NAME["pixel-self"]
    scores = {"colour": 0.91, "background": 0.5, "shape": 0.25}
    record = {"row": {"note": row.note}, "train": {"steps": 123, "seconds": 900.0},
              "eval": {"test": scores, "unconditional": {"colour": 0.1, "background": 0.2, "shape": 0.3},
                       "chosen": {"guidance_scale": 3.0, "steps": 25}}}
    (tmp_path / row.name).mkdir()
    (tmp_path / row.name / "ablation.json").write_text(json.dumps(record))
    table = ablation.write_table([row.name], tmp_path)
    assert "| pixel-self | 32 px pixel space | 123 (15.0) | 0.91 | 0.50 | 0.25 | 0.10 / 0.20 / 0.30 | 3, 25 |" in table
    assert (tmp_path / "ablation.md").read_text() == table


def test_cli_refuses_an_unknown_row(tmp_path):
    result = CliRunner().invoke(main, ["ablation", "--rows", "no-such-row", "--out", str(tmp_path / "a"),
                                       "--root", str(tmp_path)])
    assert result.exit_code != 0 and "no-such-row" in result.output


def test_a_checkpoint_is_reused_only_if_trained_with_the_rows_configuration(tmp_path):
    from m2m_pipeline.network import M2MUNet

    row = ablation.ROWS_BY_NAME["latent-dino"]
    checkpoint = tmp_path / "final"
    M2MUNet(M2MConfig.preset(row.net_preset, row.variant)).save_pretrained(checkpoint)
    train_config = TrainConfig.preset("demo", max_seconds=900.0, checkpoint_every=250).to_dict()
    state = {"step": 3456, "seconds": 899.5, "losses": [0.9, 0.2], "train_config": train_config}
    (checkpoint / "train_state.json").write_text(json.dumps(state))
    record = ablation.reuse_trained(row, checkpoint, seconds=900.0)
    assert record["steps"] == 3456 and record["final_loss"] == 0.2
    with pytest.raises(ValueError, match="not trained with row latent-dino"):
        ablation.reuse_trained(row, checkpoint, seconds=600.0)  # another budget
    with pytest.raises(ValueError, match="not trained with row latent-dino-64x128"):
        ablation.reuse_trained(ablation.ROWS_BY_NAME["latent-dino-64x128"], checkpoint, seconds=900.0)
