"""Weights shipped in the repository (models/pretrained/), pinned by sha256 in models/pretrained/MANIFEST.json.

The manifest lists, per shipped model, every file of its folder (path relative to the root, sha256, size) and how
it was produced (command, seed, steps, wall time, machine). `verify_pretrained` checks every file against it
before anything is loaded, so a corrupted, truncated, swapped or unlisted file stops with one line naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from m2m_pipeline.io import atomic_write_bytes, sha256_file
from m2m_pipeline.weights import CheckpointError

MANIFEST_NAME = "MANIFEST.json"
PRETRAINED_ROOT = Path("models/pretrained")
MANIFEST_FORMAT = 1


def file_entries(root: Path, name: str) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} for every file under root/name."""
    folder = root / name
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no files to pin in {root / MANIFEST_NAME}")
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest; shipped weights load only when pinned in it") from None
    except (OSError, ValueError) as exn:
        raise CheckpointError(f"{path}: not a readable manifest ({exn})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            not isinstance(manifest.get("models"), dict):
        raise CheckpointError(f"{path}: not a format-{MANIFEST_FORMAT} manifest with a 'models' object")
    return manifest


def write_manifest_entry(root: str | os.PathLike, name: str, provenance: dict[str, Any]) -> Path:
    """Pin root/name's files (hashes and sizes) with `provenance`, keeping the manifest's other models."""
    root = Path(root)
    path = root / MANIFEST_NAME
    manifest = read_manifest(root) if path.exists() else {"format": MANIFEST_FORMAT, "models": {}}
    manifest["models"][name] = {"files": file_entries(root, name), **provenance}
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    return path


def verify_pretrained(name: str, root: str | os.PathLike = PRETRAINED_ROOT) -> Path:
    """root/name after checking every file against the manifest: each listed file present with its size and
    sha256, and no unlisted file in the folder (a loader might read it). Raises CheckpointError naming the file."""
    root = Path(root)
    manifest = read_manifest(root)
    entry = manifest["models"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or not entry["files"]:
        raise CheckpointError(f"{root / MANIFEST_NAME}: no files pinned for model {name!r} "
                              f"(it pins {sorted(manifest['models'])})")
    folder = root / name
    for rel, pinned in entry["files"].items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {root / MANIFEST_NAME} pins it")
        size = path.stat().st_size
        if size != pinned["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {root / MANIFEST_NAME} pins {pinned['size']}")
        digest = sha256_file(path)
        if digest != pinned["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest} differs from {pinned['sha256']} in {root / MANIFEST_NAME}")
    listed = set(entry["files"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.relative_to(root).as_posix() not in listed:
            raise CheckpointError(f"{path}: not pinned in {root / MANIFEST_NAME}; remove it or re-pin the model")
    return folder


def load_pretrained_dino(name: str = "dino_standin", root: str | os.PathLike = PRETRAINED_ROOT):
    """The shipped DINOv2 folder root/name as a DinoEncoder, after `verify_pretrained`."""
    from m2m_pipeline.encoders import DinoEncoder

    return DinoEncoder.from_pretrained(verify_pretrained(name, root))
