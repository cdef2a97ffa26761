"""Atomic file writes and hashing: a reader never sees a half-written table, shard or manifest."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# Errors of the writing side (full disk, quota, read-only or failing device, file too large).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


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
    except OSError as exn:
        Path(tmp).unlink(missing_ok=True)
        if exn.errno in WRITE_ERRNOS:  # the OS names no file for a full disk; say which write failed
            raise OSError(exn.errno, f"{path}: write failed ({exn.strerror or exn}); the previous file, if any, "
                                     f"is unchanged") from exn
        raise
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


def read_hashed(path: str | os.PathLike, limit: int | None = None, chunk: int = 1 << 20) -> tuple[bytes, str]:
    """(bytes, sha256) of a file read once: the bytes a caller parses are the bytes it hashed (no window in
    which the file can change between the check and the use). Reads at most `limit` + 1 bytes, so a file that
    grew (or a device file in its place) cannot exhaust memory; the caller compares the length."""
    digest = hashlib.sha256()
    parts: list[bytes] = []
    left = None if limit is None else limit + 1
    with open(path, "rb") as handle:
        while left is None or left > 0:
            block = handle.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            digest.update(block)
            parts.append(block)
            if left is not None:
                left -= len(block)
    return b"".join(parts), digest.hexdigest()


def remove_stale_temps(directory: str | os.PathLike, name: str, on_remove: Callable[[Path], None] | None = None) -> None:
    """Delete temp files a killed writer of `name` left behind (atomic_open cleans up only on exceptions)."""
    for tmp in Path(directory).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        if on_remove is not None:
            on_remove(tmp)
