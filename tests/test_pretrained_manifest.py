"""Shipped weights load only after every file matches models/pretrained/MANIFEST.json (m2m_pipeline/pretrain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from m2m_pipeline.pretrain.manifest import (
    MANIFEST_NAME,
    load_pretrained_dino,
    verify_pretrained,
    write_manifest_entry,
)
from m2m_pipeline.weights import CheckpointError


@pytest.fixture
def shipped(tmp_path):
    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino_standin")
    write_manifest_entry(tmp_path, "dino_standin", {"command": "test", "seed": 0, "steps": 0})
    return tmp_path


def test_manifest_pins_every_file_and_loads(shipped):
    manifest = json.loads((shipped / MANIFEST_NAME).read_text())
    files = manifest["models"]["dino_standin"]["files"]
    assert set(files) == {"dino_standin/config.json", "dino_standin/model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    encoder = load_pretrained_dino("dino_standin", shipped)
    assert encoder.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 5, 32)


def test_tampered_weights_fail_naming_the_file(shipped):
    weights = shipped / "dino_standin" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one tensor byte flipped: only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 [0-9a-f]{64} differs") as info:
        load_pretrained_dino("dino_standin", shipped)
    assert "\n" not in str(info.value)


def test_truncated_missing_and_unlisted_files_fail_naming_them(shipped):
    config = shipped / "dino_standin" / "config.json"
    text = config.read_text()
    config.write_text(text[:-5])
    with pytest.raises(CheckpointError, match=r"config\.json: \d+ bytes, .* pins \d+"):
        verify_pretrained("dino_standin", shipped)
    config.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        verify_pretrained("dino_standin", shipped)
    config.write_text(text)
    verify_pretrained("dino_standin", shipped)
    (shipped / "dino_standin" / "pytorch_model.bin").write_bytes(b"not pinned")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not pinned"):
        verify_pretrained("dino_standin", shipped)


def test_missing_manifest_or_model_is_a_one_line_error(tmp_path, shipped):
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json: no manifest"):
        verify_pretrained("dino_standin", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"no files pinned for model 'other'"):
        verify_pretrained("other", shipped)


def test_repository_manifest_matches_the_shipped_files():
    """The committed models/pretrained/ must verify (skipped before the first model is shipped)."""
    from m2m_pipeline.pretrain.manifest import PRETRAINED_ROOT, read_manifest

    root = Path(__file__).parents[1] / PRETRAINED_ROOT  # the checkout's, wherever pytest runs from
    if not (root / MANIFEST_NAME).exists():
        pytest.skip("no shipped weights yet")
    manifest = read_manifest(root)
    total = 0
    for name, entry in manifest["models"].items():
        verify_pretrained(name, root)
        total += sum(f["size"] for f in entry["files"].values())
        assert {"command", "seed", "steps", "wall_seconds", "machine"} <= set(entry)
    assert total <= 20 * 2**20  # shipped weights stay small (docs/model.md)
