"""DVC versioning from many executors at once (docs/orchestration.md): no lock shared between hosts, one collecting step.

The single-host profiles version each asset with `dvc commit` + `dvc push` of its dvc.yaml stage in one working
copy, under one file lock (DVC's repo-wide lock). Executors on separate hosts cannot share that working copy, so
the cluster profile (`DVCResource(mode="pointers")`) versions differently:

1. Each partition step, after writing its shards, versions them in a **working copy of its own** (`dvc init
   --no-scm` in a fresh folder under `scratch`, so its lock and cache are its own): the files hard-linked in at
   their repository paths, `dvc add` (its own cache), `dvc push` to the **shared remote** (content-addressed:
   concurrent pushes of different files never touch the same object, equal files are equal objects), and only
   then are the `.dvc` pointer files moved into the shared `outbox/<asset>/<partition>/` by one rename. An
   executor killed before that rename leaves no pointer (its half-pushed objects are unreferenced garbage).
2. One collecting step (`dataset_version` asset) copies every expected partition's pointer set into a git
   working copy of the **pointer repository**, checks each pointer's object is in the remote, and commits +
   pushes: that commit is the dataset version. A missing partition is refused, naming it.
3. `git clone <pointer repo> && git checkout <rev> && dvc pull` restores exactly that version (`restore`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from m2m_pipeline.io import sha256_file


class PointerError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise PointerError(f"`{' '.join(cmd)}` failed in {cwd} (exit {out.returncode}):\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-3000:]}")
    return out.stdout


def dvc(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def git(*args: str, cwd: Path) -> str:
    return _run(["git", "-c", "user.name=m2m-pipeline", "-c", "user.email=m2m@localhost", *args], cwd)


@dataclass(frozen=True)
class PointerStore:
    remote: str      # the shared DVC remote (a folder here; s3://, gs://, ssh:// at scale)
    outbox: Path     # shared folder: finished pointer sets, outbox/<asset>/<partition>/<repo path>.dvc
    scratch: Path    # where each executor makes its working copies (local disk of the host)

    def push_partition(self, root: Path, asset: str, partition: str, files: list[Path]) -> Path:
        """Version `files` (under `root`) of one partition of `asset`: own working copy, add, push, then publish
        the pointers by one rename. Returns the published pointer folder."""
        if not files:
            # A partition may own no shard (more partitions than shards: a small caption source, or the last
            # shard groups): it is versioned as an empty pointer set, so the collecting step sees it finished.
            return self._publish_empty(asset, partition)
        work = self.scratch / f"{asset}-{partition}-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        try:
            dvc("init", "--no-scm", "-q", cwd=work)
            dvc("remote", "add", "-d", "shared", str(self.remote), cwd=work)
            rel = [f.relative_to(root) for f in files]
            for r, f in zip(rel, files):
                (work / r).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(f, work / r)
            dvc("add", "-q", *map(str, rel), cwd=work)
            dvc("push", "-q", "-r", "shared", *[f"{r}.dvc" for r in rel], cwd=work)
            staged = self.outbox / asset / f".{partition}.{uuid.uuid4().hex[:8]}.tmp"
            for r in rel:
                (staged / r).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(work / f"{r}.dvc", staged / f"{r}.dvc")
            final = self.outbox / asset / partition
            if final.exists():  # a retried step after a published attempt: the same content, replaced whole
                shutil.rmtree(final)
            os.replace(staged, final)  # published only now: a kill before this line leaves no pointer
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _publish_empty(self, asset: str, partition: str) -> Path:
        staged = self.outbox / asset / f".{partition}.{uuid.uuid4().hex[:8]}.tmp"
        staged.mkdir(parents=True)
        final = self.outbox / asset / partition
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        return final

    def collect(self, repo: Path, expected: dict[str, list[str]], message: str) -> dict[str, object]:
        """Copy every expected partition's pointer set (and any other published set: checkpoints) into the git
        working copy `repo`, check the remote holds every pointed object (local-folder remotes), commit and push.
        Returns the commit and the pointer count."""
        missing = [f"{a}/{p}" for a, parts in expected.items() for p in parts if not (self.outbox / a / p).is_dir()]
        if missing:
            raise PointerError(f"no pointer set for {missing} in {self.outbox}: those partitions were not versioned "
                               f"(a step failed or was killed before publishing); rerun them first")
        sets = {(a, p) for a, parts in expected.items() for p in parts}
        sets |= {(d.parent.name, d.name) for d in self.outbox.glob("*/*") if d.is_dir() and not d.name.startswith(".")}
        pointers = []
        for asset, p in sorted(sets):
            src = self.outbox / asset / p
            for f in sorted(src.rglob("*.dvc")):
                dest = repo / f.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                pointers.append(dest)
        absent = [str(p.relative_to(repo)) for p in pointers if not self._in_remote(p)]
        if absent:
            raise PointerError(f"pointers whose objects are not in the remote {self.remote}: {absent[:5]}")
        git("add", "-A", cwd=repo)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=repo)
        git("push", "-q", "origin", "HEAD", cwd=repo)
        return {"commit": git("rev-parse", "HEAD", cwd=repo).strip(), "pointers": len(pointers)}

    def _in_remote(self, pointer: Path) -> bool:
        if "://" in str(self.remote):
            return True  # object stores: `dvc pull` on restore is the check
        for out in (yaml.safe_load(pointer.read_text()) or {}).get("outs", []):
            obj = Path(self.remote) / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
            if not obj.is_file() or obj.stat().st_size != out.get("size", obj.stat().st_size):
                return False
        return True


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same filesystem: no copy; dvc add then moves it into this copy's own cache
    except OSError:
        shutil.copy2(src, dest)


def init_pointer_repo(origin: Path, remote: str, scratch: Path) -> None:
    """A bare git repository whose first commit holds a DVC project with `remote` as its default."""
    _run(["git", "init", "-q", "--bare", str(origin)], origin.parent)
    seed = scratch / f"init-{uuid.uuid4().hex[:8]}"
    git("clone", "-q", str(origin), str(seed), cwd=origin.parent)
    dvc("init", "-q", cwd=seed)
    dvc("remote", "add", "-d", "shared", str(remote), cwd=seed)
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "DVC project of the dataset pointers", cwd=seed)
    git("push", "-q", "origin", "HEAD", cwd=seed)
    shutil.rmtree(seed)


def local_pointer_config(folder: Path) -> dict[str, str]:
    """A `resources.dvc.config` for pointers mode with everything under `folder` on this machine: the shared DVC
    remote, the pointer outbox, the executors' scratch and the pointer repository (bare git), created here.
    `make cluster-smoke` and the paper dry run use it in place of an object store and a git server."""
    cfg = {"mode": "pointers", "pointer_remote": str(folder / "remote"), "pointer_outbox": str(folder / "outbox"),
           "pointer_scratch": str(folder / "scratch"), "pointer_repo": str(folder / "pointers.git")}
    for key in ("pointer_remote", "pointer_outbox", "pointer_scratch"):
        Path(cfg[key]).mkdir(parents=True, exist_ok=True)
    if not Path(cfg["pointer_repo"]).exists():
        init_pointer_repo(Path(cfg["pointer_repo"]), cfg["pointer_remote"], Path(cfg["pointer_scratch"]))
    return cfg


def clone(origin: Path | str, dest: Path) -> Path:
    local = Path(origin)
    url = str(local.resolve()) if local.exists() else str(origin)  # a relative local path means the caller's cwd
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", url, str(dest), cwd=dest.parent)
    return dest


def restore(origin: Path | str, rev: str, dest: Path) -> dict[str, str]:
    """A fresh copy of the pointer repository at `rev`, its data pulled; sha256 of every restored file."""
    dest = clone(origin, dest)
    git("checkout", "-q", rev, cwd=dest)
    dvc("pull", "-q", cwd=dest)
    out = {}
    for f in sorted(dest.rglob("*")):
        project = {".git", ".dvc"} & set(f.relative_to(dest).parts) or f.name in (".gitignore", ".dvcignore")
        if f.is_file() and not project and f.suffix != ".dvc":
            out[str(f.relative_to(dest))] = sha256_file(f)
    return out
