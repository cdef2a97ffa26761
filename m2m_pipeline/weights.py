"""Where pretrained weights come from: local folders only (no hub downloads in this project)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WeightsNotFoundError(FileNotFoundError):
    pass


class CheckpointError(ValueError):
    """A weights or checkpoint file that is unreadable, inconsistent with its recorded hash or config, or not one
    this project writes. The message names the file (and the field or tensor at fault): one line for users."""


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


def load_weights(net: Any, data: bytes, path: Path, device: Any = "cpu") -> None:
    """Load safetensors bytes into `net` (strict); a truncated file, a missing or extra tensor, or a shape that
    differs from the network its config describes raises CheckpointError naming the file and the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(data)
    except SafetensorError as exn:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({exn})") from None
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = [f"lacks {len(missing)} tensor(s) the network has, e.g. {missing[:3]}" if missing else "",
                 f"has {len(extra)} tensor(s) the network has not, e.g. {extra[:3]}" if extra else ""]
        raise CheckpointError(f"{path}: " + "; ".join(p for p in parts if p) + " (does its config match it?)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the network its "
                                  f"config describes expects {tuple(expected[name].shape)}")
    net.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
