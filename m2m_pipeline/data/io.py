"""Atomic file writes and hashing: a reader never sees a half-written table, shard or manifest."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write to a temp file beside `path`, fsync, then rename over it; on error the temp file is removed.

    The temp name ends in ".tmp" (git-ignored) and is unique per writer, so two workers racing on one
    shard cannot interleave bytes; the last rename wins with a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; datasets are shared read-only between users/jobs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` whole, on error it is removed.

    Readers see either the old folder or the complete new one (checkpoints, rendered objects).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    with atomic_open(path) as handle:
        for chunk in chunks:
            handle.write(chunk.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temps(directory: str | os.PathLike, name: str, on_remove: Callable[[Path], None] | None = None) -> None:
    """Delete temp files a killed writer of `name` left behind (atomic_open cleans up only on exceptions)."""
    for tmp in Path(directory).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        if on_remove is not None:
            on_remove(tmp)
