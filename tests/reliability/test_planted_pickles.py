"""Planted pickles: an executing pickle put in place of every file of a checkpoint, or beside them under the names
accelerate and torch use, one at a time. Resuming never runs it (the marker file never appears) and refuses,
naming the file (docs/reliability.md, "planted pickles")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_scale import MICRO, list_data, micro_config

from m2m_pipeline import checkpointing as ckpt
from m2m_pipeline.network import M2MUNet
from m2m_pipeline.training import train
from m2m_pipeline.weights import CheckpointError

from .faults import pickle_bytes, tree_digest

CHECKPOINT = "checkpoint-0000002"
OWN_FILES = ["config.json", "model.safetensors", "raw/config.json", "raw/model.safetensors", "training_state.json",
             "training_state.safetensors", "rank_state_0.json", "rank_state_0.safetensors", "train_state.json"]
# accelerate's save_state names (what main's checkpoints held and load_state unpickled), torch's, and strays.
PLANTED = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
           "scheduler.bin", "sampler.bin", "scaler.pt", "rank_state_0.pt", "pytorch_model.bin", "model.ckpt",
           "weights.pth", "raw/evil.pkl", "notes.txt", "rank_state_1.json", "extra/model.safetensors"]


def test_the_payload_executes_when_unpickled(tmp_path):
    """The control: the planted bytes do run code under torch.load(weights_only=False), so the tests below can fail."""
    marker = tmp_path / "marker"
    (tmp_path / "p.pkl").write_bytes(pickle_bytes(marker))
    torch.load(tmp_path / "p.pkl", weights_only=False)
    assert marker.exists()


def resume(run: Path, where: str | Path = "latest"):
    return train(MICRO, micro_config(steps=6, checkpoint_every=2), list_data(), run, progress=False, device="cpu",
                 resume_from=where)


@pytest.mark.parametrize("name", OWN_FILES)
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused_and_never_run(run, tmp_path, name):
    marker = tmp_path / "marker"
    (run / CHECKPOINT / name).write_bytes(pickle_bytes(marker))
    before = tree_digest(run)
    with pytest.raises((CheckpointError, ValueError)) as caught:
        resume(run, run / CHECKPOINT)
    assert str(run / CHECKPOINT / name) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()
    assert tree_digest(run) == before  # the refused resume wrote and deleted nothing


@pytest.mark.parametrize("name", PLANTED)
def test_a_pickle_planted_beside_the_checkpoint_files_is_refused_and_never_run(run, tmp_path, name):
    marker = tmp_path / "marker"
    (run / CHECKPOINT / name).parent.mkdir(parents=True, exist_ok=True)
    (run / CHECKPOINT / name).write_bytes(pickle_bytes(marker))
    with pytest.raises(CheckpointError) as caught:
        resume(run, run / CHECKPOINT)
    assert str(run / CHECKPOINT / name.split("/")[0]) in str(caught.value)
    assert not marker.exists()


def test_resume_latest_refuses_a_planted_pickle_too(run, tmp_path):
    """--resume latest picks checkpoint-0000004 up by itself: the same refusal, no fallback that hides it."""
    marker = tmp_path / "marker"
    (run / "checkpoint-0000004" / "custom_checkpoint_0.pkl").write_bytes(pickle_bytes(marker))
    with pytest.raises(CheckpointError, match="checkpoint-0000004/custom_checkpoint_0.pkl"):
        resume(run)
    assert not marker.exists()


@pytest.mark.parametrize("folder", ["final", CHECKPOINT])
def test_loading_weights_never_runs_a_pickle_in_place_of_them(run, tmp_path, folder):
    marker = tmp_path / "marker"
    (run / folder / "model.safetensors").write_bytes(pickle_bytes(marker))
    with pytest.raises(CheckpointError, match=f"{folder}/model.safetensors"):
        M2MUNet.from_pretrained(run / folder)
    assert not marker.exists()


def test_nothing_in_a_checkpoint_is_pickle_capable(run):
    names = {p.relative_to(run / CHECKPOINT).as_posix() for p in (run / CHECKPOINT).rglob("*") if p.is_file()}
    assert names == set(OWN_FILES) and all(ckpt.ALLOWED.match(n) or n == ckpt.STATE_NAME for n in names)
