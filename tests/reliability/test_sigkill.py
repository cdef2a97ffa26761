"""SIGKILL in the middle of each stage's writing (reliability/kill_during.py): nothing that existed is changed,
nothing half-written is committed (every manifest's shard verifies, no checkpoint lacks its train_state.json), and
rerunning the stage gives the same bytes as an undisturbed run (training: the same losses). A kill during the
training steps themselves is tests/test_training_scale.py::test_sigkilled_run_resumes_exactly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2m_pipeline.data import filter_captions, generate_mis, get_preset, make_generator, read_samples
from m2m_pipeline.data.features import build_feature_shards

from .faults import tree_digest

TESTS = Path(__file__).resolve().parents[1]
CFG = get_preset("tiny")


def kill_during(stage: str, root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "reliability.kill_during", stage, str(root),
                           str(torch.get_num_threads())], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def committed_shards_verify(root: Path) -> None:
    for manifest in root.rglob("mis-*.json"):
        list(read_samples([manifest.with_suffix(".tar")]))  # raises unless bytes and keys match the manifest


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["captions", "mis", "features"])
def test_a_kill_mid_write_commits_nothing_partial_and_the_rerun_is_identical(built, data, stage):
    if stage == "captions":  # an earlier table (one row shorter) must survive the kill untouched
        filter_captions(data / "captions.tsv", data / "captions.jsonl", CFG, progress=False)
        reference = {"captions.jsonl": (data / "captions.jsonl").read_bytes()}
        (data / "captions.jsonl").write_bytes(b"".join(reference["captions.jsonl"].splitlines(keepends=True)[:-1]))
    else:
        where = data / stage / "train"
        reference = {p.name: p.read_bytes() for p in (built / stage / "train").iterdir()}
        shutil.rmtree(where)
    before = tree_digest(data)
    kill_during(stage, data)
    after = tree_digest(data)
    assert all(after.get(name) == digest for name, digest in before.items())  # nothing that was there changed
    committed_shards_verify(data)
    if stage == "captions":
        filter_captions(data / "captions.tsv", data / "captions.jsonl", CFG, progress=False)
        assert (data / "captions.jsonl").read_bytes() == reference["captions.jsonl"]
        return
    if stage == "mis":
        generate_mis(data / "captions.jsonl", where, make_generator(CFG), CFG, progress=False)
    else:
        build_feature_shards(data / "mis" / "train", where, CFG, device="cpu", progress=False)
    rerun = {p.name: p.read_bytes() for p in where.iterdir() if not p.name.endswith(".tmp")}
    assert rerun == reference


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["checkpoint", "step"])
def test_a_kill_mid_checkpoint_or_step_keeps_the_previous_one_and_resumes_exactly(tmp_path, stage):
    from test_training_scale import MICRO, list_data, micro_config

    from m2m_pipeline import checkpointing as ckpt
    from m2m_pipeline.training import train

    kill_during(stage, tmp_path)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-0000002"]
    assert (run / ".checkpoint-0000004.tmp").is_dir() == (stage == "checkpoint")  # really died mid-save
    assert not (run / "final").exists()
    resumed = train(MICRO, micro_config(steps=6, checkpoint_every=2), list_data(), run, progress=False, device="cpu",
                    resume_from="latest")
    straight = train(MICRO, micro_config(steps=6, checkpoint_every=2), list_data(), tmp_path / "straight",
                     progress=False, device="cpu")
    assert resumed.resumed_from == run / "checkpoint-0000002" and resumed.losses == straight.losses
    assert not (run / ".checkpoint-0000004.tmp").exists()  # the half-written folder was replaced by the real one
