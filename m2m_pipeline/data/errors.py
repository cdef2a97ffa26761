"""Errors raised by the MIS data layer; each names the file (and line or sample key) at fault."""

from __future__ import annotations


class MISDataError(ValueError):
    """Base class: bad input or bad stored data, never a bug in the caller's arguments alone."""


class CaptionFileError(MISDataError):
    """A caption source that cannot be read at all (missing file, empty glob)."""


class ShardError(MISDataError):
    """A shard that is corrupt, truncated or inconsistent with its manifest.

    `shard` is the tar file and `key` the sample at fault (None when the shard fails before any sample).
    """

    def __init__(self, shard: str, key: str | None, reason: str):
        self.shard = shard
        self.key = key
        self.reason = reason
        where = f"{shard}: sample {key!r}" if key is not None else f"{shard}"
        super().__init__(f"{where}: {reason}")
