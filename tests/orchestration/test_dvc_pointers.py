"""DVC from many executors (orchestration/dvc_pointers.py): own working copies, pointers published last, one
collecting commit, an old revision restored on a fresh copy."""

from __future__ import annotations

import hashlib

import pytest

from m2m_pipeline.orchestration import dvc_pointers
from m2m_pipeline.orchestration.dvc_pointers import (
    PointerError,
    PointerStore,
    clone,
    init_pointer_repo,
    restore,
)


def _store(tmp_path):
    for d in ("remote", "outbox", "scratch"):
        (tmp_path / d).mkdir()
    store = PointerStore(str(tmp_path / "remote"), tmp_path / "outbox", tmp_path / "scratch")
    init_pointer_repo(tmp_path / "pointers.git", store.remote, store.scratch)
    return store


def _write(root, rel, data: bytes):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_two_versions_then_the_old_one_restored_exactly(tmp_path):
    store = _store(tmp_path)
    root = tmp_path / "work"
    revs, contents = [], []
    for version in (1, 2):
        files = {p: [_write(root, f"assets/x/mis/train/mis-00000{i}.tar", f"v{version} shard {i}".encode())
                     for i in range(p, 4, 2)] for p in (0, 1)}  # partition p owns shards i % 2 == p
        for p, fs in files.items():  # two executors, each in its own working copy
            store.push_partition(root, "mis_shards", str(p), fs)
        repo = clone(tmp_path / "pointers.git", tmp_path / f"collector-{version}")
        revs.append(store.collect(repo, {"mis_shards": ["0", "1"]}, f"v{version}")["commit"])
        contents.append({f"assets/x/mis/train/mis-00000{i}.tar": hashlib.sha256(f"v{version} shard {i}".encode())
                         .hexdigest() for i in range(4)})
    assert restore(tmp_path / "pointers.git", revs[0], tmp_path / "fresh" / "repo") == contents[0]
    assert contents[0] != contents[1]
    assert not list((tmp_path / "scratch").iterdir())  # every executor working copy removed


def test_an_executor_killed_before_publishing_leaves_no_pointer(tmp_path, monkeypatch):
    store = _store(tmp_path)
    root = tmp_path / "work"
    f = _write(root, "assets/x/mis/train/mis-000000.tar", b"shard")
    real = dvc_pointers.dvc

    def dying(*args, cwd):
        if args[0] == "push":
            raise KeyboardInterrupt  # the process dies mid-push (SIGKILL in the cluster smoke)
        return real(*args, cwd=cwd)

    monkeypatch.setattr(dvc_pointers, "dvc", dying)
    with pytest.raises(KeyboardInterrupt):
        store.push_partition(root, "mis_shards", "0", [f])
    assert not (store.outbox / "mis_shards" / "0").exists() and not list(store.outbox.rglob("*.dvc"))
    monkeypatch.setattr(dvc_pointers, "dvc", real)
    repo = clone(tmp_path / "pointers.git", tmp_path / "collector")
    with pytest.raises(PointerError, match=r"no pointer set for \['mis_shards/0'\]"):
        store.collect(repo, {"mis_shards": ["0"]}, "incomplete")


def test_a_partition_that_owns_no_shard_is_versioned_empty(tmp_path):
    """More partitions than shards (the paper's 256 shard groups on a small caption source): the empty ones
    publish an empty pointer set, so the collecting step finds every partition finished."""
    store = _store(tmp_path)
    root = tmp_path / "work"
    store.push_partition(root, "mis_shards", "0", [_write(root, "assets/x/mis/train/mis-000000.tar", b"shard 0")])
    empty = store.push_partition(root, "mis_shards", "1", [])
    assert empty.is_dir() and not list(empty.iterdir())
    repo = clone(tmp_path / "pointers.git", tmp_path / "collector")
    assert store.collect(repo, {"mis_shards": ["0", "1"]}, "v1")["pointers"] == 1
    with pytest.raises(PointerError, match=r"no pointer set for \['mis_shards/2'\]"):
        store.collect(repo, {"mis_shards": ["0", "1", "2"]}, "v2")  # a partition never run is still refused
