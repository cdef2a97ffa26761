"""Errors raised by the task-data readers; each names the file or folder at fault."""

from __future__ import annotations

import os


class TaskDataError(ValueError):
    """Bad or missing task data on disk. `path` is the file (or folder) at fault."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MetricWeightsNotFoundError(FileNotFoundError):
    """A learned metric (LPIPS) whose weights are not on this machine; nothing is ever downloaded."""
