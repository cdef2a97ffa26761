"""Malformed weights folders and bad command-line values: loading names the file and the field or tensor at fault
in one line, the console script prints that line without a traceback (kept behind --debug / M2M_DEBUG=1), and
every numeric option of every command has a range."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from m2m_pipeline.cli import main
from m2m_pipeline.evaluation.oracle import AttributeOracle, OracleConfig
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.weights import CheckpointError

TINY = M2MConfig.preset("tiny")


def edit_config(folder: Path, change) -> None:
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))


def rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    edit_config(folder, lambda m: m.pop("weights_sha256"))  # as an older writer would leave it: no hash to catch it


def swap_in_other_weights(folder: Path) -> None:
    """The model.safetensors of another network with the same config: well-formed, wrong."""
    other = M2MUNet(TINY).save_pretrained(folder.parent / "other")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())


CONFIG_FAULTS = {  # fault -> (damage, the file and the words the error must name)
    "config_not_json": (lambda f: (f / "config.json").write_text("{broken"), "config.json", "not valid JSON"),
    "config_binary": (lambda f: (f / "config.json").write_bytes(b"\x80\x04\x95"), "config.json", "not a JSON text"),
    "config_empty": (lambda f: (f / "config.json").write_bytes(b""), "config.json", "not valid JSON"),
    "config_not_object": (lambda f: (f / "config.json").write_text("[]"), "config.json", "no 'm2m_config'"),
    "config_no_m2m_config": (lambda f: edit_config(f, lambda m: m.pop("m2m_config")), "config.json", "m2m_config"),
    "field_missing": (lambda f: edit_config(f, lambda m: m["m2m_config"].pop("image_size")), "config.json",
                      "missing field(s) ['image_size']"),
    "field_unknown": (lambda f: edit_config(f, lambda m: m["m2m_config"].update(colour="red")), "config.json",
                      "unknown field(s) ['colour']"),
    "field_wrong_type": (lambda f: edit_config(f, lambda m: m["m2m_config"].update(image_size="16")), "config.json",
                         "m2m_config.image_size"),
    "field_bad_value": (lambda f: edit_config(f, lambda m: m["m2m_config"].update(variant="clip")), "config.json",
                        "variant"),
    "shape_mismatch": (lambda f: edit_config(f, lambda m: m["m2m_config"].update(block_out_channels=[16, 48])),
                       "model.safetensors", "has shape"),
    "weights_truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors", "sha256"),
    "weights_truncated_no_hash": (lambda f: (edit_config(f, lambda m: m.pop("weights_sha256")),
                                             (f / "model.safetensors").write_bytes(
                                                 (f / "model.safetensors").read_bytes()[:999])),
                                  "model.safetensors", "not a readable safetensors"),
    "weights_empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "sha256"),
    "weights_other_model": (lambda f: swap_in_other_weights(f), "model.safetensors", "does not match the weights_sha256"),
    "tensor_missing": (lambda f: rewrite_weights(f, lambda s: s.pop(next(iter(s)))), "model.safetensors",
                       "lacks 1 tensor"),
    "tensor_extra": (lambda f: rewrite_weights(f, lambda s: s.update(stray=torch.zeros(1))), "model.safetensors",
                     "has 1 tensor(s) the network has not"),
}


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    return M2MUNet(TINY).save_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_loading_a_malformed_folder_names_the_file_and_field(weights, fault):
    damage, file, words = CONFIG_FAULTS[fault]
    damage(weights)
    with pytest.raises(CheckpointError) as caught:
        M2MUNet.from_pretrained(weights)
    message = str(caught.value)
    assert message.startswith(str(weights / file)) and words in message and "\n" not in message, message


@pytest.mark.parametrize("fault", ["config_not_json", "field_missing", "shape_mismatch", "weights_truncated"])
def test_the_console_script_prints_one_line_and_no_traceback(weights, tmp_path, fault, monkeypatch):
    CONFIG_FAULTS[fault][0](weights)
    args = ["generate", "--checkpoint", str(weights), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {weights / CONFIG_FAULTS[fault][1]}"), result.output
    assert not (tmp_path / "out").exists()
    debug = CliRunner().invoke(main, ["--debug", *args])  # the traceback is there for whoever asks for it
    assert isinstance(debug.exception, CheckpointError)
    monkeypatch.setenv("M2M_DEBUG", "1")
    assert isinstance(CliRunner().invoke(main, args).exception, CheckpointError)


@pytest.mark.parametrize("fault", ["config", "weights"])
def test_a_malformed_oracle_folder_names_the_file(tmp_path, fault):
    folder = AttributeOracle(OracleConfig(image_size=16)).save(tmp_path / "oracle")
    if fault == "config":
        (folder / "oracle_config.json").write_text('{"image_size": ')
        name = "oracle_config.json"
    else:
        (folder / "oracle.safetensors").write_bytes((folder / "oracle.safetensors").read_bytes()[:500])
        name = "oracle.safetensors"
    with pytest.raises(CheckpointError, match=rf"^{folder / name}: "):
        AttributeOracle.load(folder)


def numeric_options() -> list[tuple[str, click.Parameter]]:
    found = []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.type, (click.types._NumberParamTypeBase)) or param.type in (click.INT, click.FLOAT):
                found.append((name, param))
    return found


def test_every_numeric_option_of_every_command_has_a_range():
    options = numeric_options()
    assert len(options) >= 40  # train, generate, demo, evaluate, finetune, evaluate-task
    unbounded = [f"{cmd} --{p.name}" for cmd, p in options if not isinstance(p.type, click.types._NumberRangeBase)]
    assert not unbounded, unbounded


BAD_VALUES = [  # the cases, then one per kind of range
    ("generate", "--steps", "-1"), ("generate", "--steps", "0"), ("generate", "--guidance", "-1"),
    ("generate", "--guidance", "nan"), ("generate", "--num-images", "0"), ("generate", "--window", "-3"),
    ("train", "--steps", "0"), ("train", "--lr", "0"), ("train", "--lr", "inf"), ("train", "--batch-size", "0"),
    ("train", "--checkpoint-every", "-1"), ("train", "--max-seconds", "-5"), ("demo", "--steps", "0"),
    ("evaluate", "--sets", "0"), ("evaluate", "--window", "-2"), ("evaluate", "--guidance", "-0.5"),
    ("finetune", "--steps", "0"), ("finetune", "--s-i", "-1"), ("finetune", "--threads", "0"),
    ("evaluate-task", "--items", "0"), ("evaluate-task", "--sweep-s-c", "-2"),
]


@pytest.mark.parametrize(("command", "option", "value"), BAD_VALUES)
def test_a_bad_number_is_refused_at_parsing_naming_the_option(tmp_path, command, option, value):
    result = CliRunner().invoke(main, [command, option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
