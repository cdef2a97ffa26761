"""Training checkpoints: what one holds, atomic writes, finding the newest complete one, pruning old ones.

checkpoint-<step>/                      (docs/training.md)
  config.json, model.safetensors       inference weights: EMA when EMA is on, else the raw weights
  raw/config.json, raw/model.safetensors   raw (optimised) weights; both load with M2MUNet.from_pretrained
  optimizer.bin, random_states_<rank>.pkl, custom_checkpoint_<i>.pkl   accelerate.save_state (EMA, LR scheduler)
  rank_state_<rank>.pt                 per-rank generator of the objective (noise, timesteps, drops)
  train_state.json                     step, data position, loss history, skip counters; written last
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "train_state.json"
RAW_DIR = "raw"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def temp_dir(out: Path, step: int) -> Path:
    """Deterministic temp name, so every rank writes into the same folder before rank 0 renames it."""
    return out / f".{checkpoint_name(step)}.tmp"


def is_complete(directory: Path) -> bool:
    return (directory / STATE_NAME).is_file() and (directory / "config.json").is_file()


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under `out`, oldest first (temp folders of a killed writer are ignored)."""
    found = []
    for d in Path(out).glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume_from: str | os.PathLike | None, out: Path) -> Path | None:
    """`"latest"`: the newest complete checkpoint under `out` (None if there is none yet); a path: that one."""
    if resume_from is None:
        return None
    if str(resume_from) == "latest":
        found = complete_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r}: no such checkpoint folder")
    if not is_complete(path) or not (path / RAW_DIR).is_dir():
        raise ValueError(f"resume_from={str(path)!r} is not a complete training checkpoint (needs {STATE_NAME}, "
                         f"config.json and {RAW_DIR}/); `final/` holds weights only; resume from a checkpoint-*")
    return path


def check_config(directory: Path, config: Any) -> None:
    """Refuse to resume a checkpoint made for a different network (e.g. a task run made before an option
    that adds parameters), naming the fields, instead of failing later on missing weights."""
    from m2m_pipeline.network import M2MUNet

    saved = M2MUNet.read_config(directory)
    differ = [f.name for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError(f"{directory / 'config.json'}: the checkpoint's network differs from the one being "
                         f"trained in " + ", ".join(f"{k} (saved {getattr(saved, k)!r}, now {getattr(config, k)!r})"
                                                    for k in differ[:4]) + "; resume with the checkpoint's settings")


def read_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / STATE_NAME}: not valid JSON ({e})") from e


def write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / f"{STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, directory / STATE_NAME)


def save_rank_state(directory: Path, rank: int, generator: torch.Generator) -> None:
    torch.save({"objective_generator": generator.get_state()}, directory / f"rank_state_{rank}.pt")


def load_rank_state(directory: Path, rank: int, generator: torch.Generator) -> bool:
    path = directory / f"rank_state_{rank}.pt"
    if not path.is_file():
        return False
    generator.set_state(torch.load(path, weights_only=True)["objective_generator"])
    return True


def save_weights_into(net: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors into an existing folder, leaving its other files alone
    (M2MUNet.save_pretrained replaces the folder it writes to)."""
    staging = directory / ".weights.tmp"
    net.save_pretrained(staging, state_dict=state_dict)
    for f in staging.iterdir():
        os.replace(f, directory / f.name)
    staging.rmdir()


def publish(tmp: Path, final: Path) -> Path:
    """Replace `final` by the finished temp folder (a rename: readers see the old or the new, never half)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (keep 0: delete none)."""
    if keep <= 0:
        return []
    old = complete_checkpoints(out)[:-keep]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old
