"""A full disk during a write (a patched write raising ENOSPC part-way, standing in for a small tmpfs): the error
names the file being written, no partial file or manifest is left, what was there before is unchanged, and a rerun
writes the same bytes as an undisturbed run."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from m2m_pipeline.data import filter_captions, generate_mis, get_preset, make_generator
from m2m_pipeline import io as data_io
from m2m_pipeline.data.features import build_feature_shards

from .faults import tree_digest

CFG = get_preset("tiny")


class FullDisk:
    """A binary file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Atomic writes (m2m_pipeline.io.atomic_open) get `room` bytes; other files are not touched."""
    real = os.fdopen

    def patch(room: int) -> None:
        monkeypatch.setattr(data_io.os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real(fd, mode, *a, **k), room)
                            if "w" in mode else real(fd, mode, *a, **k))
    return patch


def stage(data, name: str) -> None:
    generator = make_generator(CFG)
    if name == "captions":
        filter_captions(data / "captions.tsv", data / "captions.jsonl", CFG, progress=False)
    elif name == "mis":
        generate_mis(data / "captions.jsonl", data / "mis" / "train", generator, CFG, progress=False)
    else:
        build_feature_shards(data / "mis" / "train", data / "features" / "train", CFG, device="cpu", progress=False)


TARGET = {"captions": ("captions.jsonl", "captions.jsonl", 1_000), "mis": ("mis/train", "mis-000000.tar", 30_000),
          "features": ("features/train", "mis-000000.tar", 30_000)}  # what is written, its first file, room


@pytest.mark.parametrize("name", ["captions", "mis", "features"])
def test_a_full_disk_mid_write_loses_nothing_and_the_rerun_is_identical(built, data, full_disk, monkeypatch, name):
    where, first, room = TARGET[name]
    reference = tree_digest(built / where) if (built / where).is_dir() else None
    if name == "captions":  # an earlier table exists and must survive: one line shorter than what the rerun writes
        stage(data, name)  # the table an undisturbed run writes from these files (their paths are in it)
        reference_table = (data / "captions.jsonl").read_bytes()
        (data / "captions.jsonl").write_bytes(b"".join(reference_table.splitlines(keepends=True)[:-1]))
    else:  # regenerate every shard of the split from scratch
        shutil.rmtree(data / where)
    before = tree_digest(data)
    full_disk(room)
    with pytest.raises(OSError, match=rf"{first}: write failed \(No space left on device\)"):
        stage(data, name)
    assert tree_digest(data) == {k: v for k, v in before.items()}  # no partial shard, manifest or temp file
    monkeypatch.undo()
    stage(data, name)
    if reference is not None:
        assert tree_digest(data / where) == reference
    else:
        assert (data / "captions.jsonl").read_bytes() == reference_table
