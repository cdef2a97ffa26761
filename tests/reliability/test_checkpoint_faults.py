"""Damaged checkpoints: every file of a checkpoint truncated, byte-flipped, emptied, deleted or swapped for the same
file of another checkpoint, a forged train_state.json, a full disk while saving. A resume refuses with one line
naming the file and changes nothing on disk; a failed save leaves the published checkpoints as they were."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from test_training_scale import MICRO, list_data, micro_config

from m2m_pipeline import checkpointing as ckpt
from m2m_pipeline.training import train
from m2m_pipeline.weights import CheckpointError

from .faults import flip, tree_digest, truncate
from .test_planted_pickles import CHECKPOINT, OWN_FILES

FILES = [n for n in OWN_FILES if n != ckpt.STATE_NAME]


def resume(run: Path, where: str | Path, steps: int = 6):
    return train(MICRO, micro_config(steps=steps, checkpoint_every=2), list_data(), run, progress=False,
                 device="cpu", resume_from=where)


def damage(path: Path, how: str, other: Path) -> None:
    if how == "truncated":
        truncate(path, path.stat().st_size // 2)
    elif how == "byte_flip":
        flip(path, path.stat().st_size // 2)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    elif how == "swapped":  # the same file of the other checkpoint: well-formed, wrong
        shutil.copy(other, path)


# Every file x every damage, but "swapped" for rank_state_0.json: Python's and NumPy's RNG are not drawn from in
# training, so that file is byte-identical in both checkpoints and swapping it changes nothing.
CASES = [(n, h) for n in FILES for h in ("truncated", "byte_flip", "empty", "deleted", "swapped")
         if (n, h) != ("rank_state_0.json", "swapped")]


@pytest.mark.parametrize(("name", "how"), CASES)
def test_a_damaged_checkpoint_file_is_refused_naming_it(run, name, how):
    target = run / CHECKPOINT / name
    damage(target, how, run / "checkpoint-0000004" / name)
    before = tree_digest(run)
    with pytest.raises(CheckpointError) as caught:
        resume(run, run / CHECKPOINT)
    message = str(caught.value)
    assert str(target) in message and "\n" not in message, message
    assert tree_digest(run) == before


FORGERIES = {"not_json": ckpt.STATE_NAME, "no_file_list": ckpt.STATE_NAME, "lists_a_pickle": ckpt.STATE_NAME,
             "wrong_size": "model.safetensors", "wrong_sha256": "raw/model.safetensors", "old_format": ckpt.STATE_NAME}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_train_state_is_refused_naming_the_file(run, forgery):
    path = run / CHECKPOINT / ckpt.STATE_NAME
    state = json.loads(path.read_text())
    if forgery == "not_json":
        path.write_text('{"step": 2, ')
    else:
        if forgery == "no_file_list":
            del state["files"]
        elif forgery == "lists_a_pickle":
            state["files"]["custom_checkpoint_0.pkl"] = {"bytes": 1, "sha256": "0" * 64}
        elif forgery == "wrong_size":
            state["files"]["model.safetensors"]["bytes"] += 1
        elif forgery == "wrong_sha256":
            state["files"]["raw/model.safetensors"]["sha256"] = "0" * 64
        elif forgery == "old_format":
            state["format"] = "accelerate"
        path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as caught:
        resume(run, run / CHECKPOINT)
    assert str(run / CHECKPOINT / FORGERIES[forgery]) in str(caught.value), caught.value


def test_a_full_disk_while_saving_keeps_the_published_checkpoints(run, monkeypatch):
    """ENOSPC on the second safetensors write of checkpoint 6: an error naming it, no partial folder, 2 and 4
    intact, and a resume from 4 still continues exactly (a patched write stands in for a small tmpfs)."""
    import safetensors.torch

    before = tree_digest(run)
    real, calls = safetensors.torch.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"checkpoint-0000006: writing the checkpoint failed \(No space left"):
        resume(run, "latest", steps=8)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-0000002", "checkpoint-0000004", "final"]
    assert {k: v for k, v in tree_digest(run).items() if not k.startswith("final/")} == \
        {k: v for k, v in before.items() if not k.startswith("final/")}
    resumed = resume(run, "latest", steps=8)
    straight = train(MICRO, micro_config(steps=8, checkpoint_every=2), list_data(), run.parent / "straight",
                     progress=False, device="cpu")
    assert resumed.losses == straight.losses
