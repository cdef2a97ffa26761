"""Where pretrained weights come from: local folders only (no hub downloads in this project)."""

from __future__ import annotations

import os
from pathlib import Path


class WeightsNotFoundError(FileNotFoundError):
    pass


def resolve_local_path(path: str | Path, subfolder: str | None, what: str) -> str:
    """Return `path` if it is a local folder (holding `subfolder` when given), else raise a clear error.

    A hub id such as `stabilityai/stable-diffusion-2-1-base` is accepted only when the user has the
    snapshot locally (HF_HUB_OFFLINE with a populated cache); weights are never downloaded here.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if subfolder and not (p / subfolder).is_dir():
            raise WeightsNotFoundError(
                f"{what}: folder {p} has no '{subfolder}/' subfolder; expected a diffusers-format folder"
            )
        return str(p)
    # Maybe a hub id whose snapshot is already in the local cache.
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    raise WeightsNotFoundError(
        f"{what}: weights path {str(path)!r} does not exist locally. This project does not download weights "
        f"(offline; HF_HUB_OFFLINE={offline or 'unset'}): download the model yourself and pass its local folder."
    )
