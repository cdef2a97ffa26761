"""Training checkpoints: what one holds, atomic hashed writes, verified pickle-free reads, finding and pruning.

checkpoint-<step>/                          (docs/training.md)
  config.json, model.safetensors            inference weights: EMA when EMA is on, else the raw weights; with
                                            EMA on, its shadow weights are these parameters (stored once)
  raw/config.json, raw/model.safetensors    raw (optimised) weights; both load with M2MUNet.from_pretrained
  training_state.safetensors, .json         AdamW moments / param groups, LR scheduler, EMA counters, grad scaler
  rank_state_<rank>.safetensors, .json      per rank: torch CPU (and CUDA) RNG and the objective's generator /
                                            Python and NumPy RNG
  train_state.json                          step, data position, losses, counters, and the size and sha256 of
                                            every other file; written last: it marks the folder complete

No file is a pickle, and nothing here calls torch.load or unpickles. accelerate's save_state/load_state are not
used: they pickle the optimizer, the RNG states and every registered custom object, and load_state unpickles
them (custom_checkpoint_*.pkl with weights_only=False), so a file planted in a checkpoint would run code on
resume. A resume first matches the folder against the list in train_state.json (only names this module writes,
with their sizes) and refuses anything else naming the file; each file is then hashed as it is read and
compared with its recorded sha256 before its content is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2m_pipeline.io import read_hashed, sha256_file
from m2m_pipeline.weights import CheckpointError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FORMAT = "m2m-checkpoint-v2"           # v1: accelerate's pickled save_state
STATE_NAME = "train_state.json"
RAW_DIR = "raw"
TRAINING_STATE = "training_state"      # .safetensors (tensors) + .json (everything else), written by rank 0
# Every file a checkpoint may hold; anything else (a .pkl, .pt, .bin, .ckpt, a stray folder) refuses the resume.
ALLOWED = re.compile(r"^(config\.json|model\.safetensors|raw/config\.json|raw/model\.safetensors|"
                     r"training_state\.(safetensors|json)|rank_state_\d+\.(safetensors|json))$")
MAX_STATE_BYTES = 1 << 30              # train_state.json larger than this is not one we wrote


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def temp_dir(out: Path, step: int) -> Path:
    """Deterministic temp name, so every rank writes into the same folder before rank 0 renames it."""
    return out / f".{checkpoint_name(step)}.tmp"


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank}"


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
    missing = [name for name in (STATE_NAME, "config.json", RAW_DIR) if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"{path / missing[0]}: missing, so {path} is not a complete training checkpoint (needs "
                         f"{STATE_NAME}, config.json and {RAW_DIR}/); `final/` holds weights only; resume from a "
                         f"checkpoint-*")
    return path


# ----------------------------------------------------------------------------------------------- state codec
# Hand-written because the field offers only pickle for these objects (torch.save of optimizer and scheduler
# state dicts, accelerate's RNG files): a state dict is split into its tensors (safetensors) and a JSON document
# that refers to them by name. Tuples and dicts with non-string keys (AdamW's per-parameter state) are tagged so
# the document decodes to exactly what was encoded.

def encode_state(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of a nested state; tensors move into `tensors` under their path in the state."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[k, encode_state(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {path or '<root>'}: cannot store a {type(value).__name__} without pickle")


def decode_state(doc: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Inverse of encode_state; a reference to a tensor the file lacks raises CheckpointError naming `where`."""
    if isinstance(doc, list):
        return [decode_state(v, tensors, where) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "__tensor__" in doc:
        name = doc["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"{where}: refers to tensor {name!r}, which its .safetensors file lacks")
        return tensors[name]
    if "__tuple__" in doc:
        return tuple(decode_state(v, tensors, where) for v in doc["__tuple__"])
    if "__items__" in doc:
        return {k: decode_state(v, tensors, where) for k, v in doc["__items__"]}
    return {k: decode_state(v, tensors, where) for k, v in doc.items()}


def write_state_pair(directory: Path, name: str, state: dict[str, Any]) -> None:
    """`name.safetensors` (the tensors of `state`) + `name.json` (the rest, referring to them)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = encode_state(state, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format": "pt"})
    (directory / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": doc}))


# ----------------------------------------------------------------------------------------------- RNG states

def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a training step draws from (accelerate's random_states_<rank>.pkl holds the same, pickled)."""
    version, internal, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(), "objective_generator": generator.get_state(),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, where: str) -> None:
    try:
        torch.set_rng_state(state["torch_cpu"])
        generator.set_state(state["objective_generator"])
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exn:
        raise CheckpointError(f"{where}: not a valid RNG state ({type(exn).__name__}: {exn})") from None


def save_rank_state(directory: Path, rank: int, generator: torch.Generator) -> None:
    write_state_pair(directory, rank_state_name(rank), rng_state(generator))


def save_training_state(directory: Path, optimizer: Any, lr_scheduler: Any, ema: Any, scaler: Any) -> None:
    """What rank 0 alone writes (DDP keeps optimizer, scheduler and EMA identical on every rank). The EMA's
    shadow weights are not repeated here: they are the parameters of model.safetensors (see load_ema)."""
    ema_state = None
    if ema is not None:
        ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    write_state_pair(directory, TRAINING_STATE, {
        "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "ema": ema_state,
        "grad_scaler": scaler.state_dict() if scaler is not None else None})


# ----------------------------------------------------------------------------------------------- writing

def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint folder except train_state.json, by relative path."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != STATE_NAME:
            records[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """train_state.json, with the records of every other file (so write it last)."""
    tmp = directory / f"{STATE_NAME}.tmp"
    tmp.write_text(json.dumps({**state, "format": FORMAT, "files": file_records(directory)}))
    os.replace(tmp, directory / STATE_NAME)


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


# ----------------------------------------------------------------------------------------------- reading

def read_state(directory: Path) -> dict[str, Any]:
    """train_state.json (the folder's root of trust: plain JSON, nothing in it is executed)."""
    path = directory / STATE_NAME
    data, _ = read_hashed(path, MAX_STATE_BYTES)
    if len(data) > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: {len(data)} bytes or more; not a train_state.json this project writes")
    try:
        state = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exn:
        raise CheckpointError(f"{path}: not a JSON text file (byte {exn.start} is not UTF-8)") from None
    except json.JSONDecodeError as exn:
        raise CheckpointError(f"{path}: not valid JSON ({exn.msg} at line {exn.lineno})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return state


class CheckpointReader:
    """A checkpoint folder whose files are checked before use: names and sizes against train_state.json on
    opening, each file's sha256 when it is read (the bytes hashed are the bytes parsed)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.check_names()
        self.state = read_state(self.directory)
        files = self.state.get("files")
        if self.state.get("format") != FORMAT or not isinstance(files, dict):
            raise CheckpointError(f"{self.directory / STATE_NAME}: format {self.state.get('format')!r}, not "
                                  f"{FORMAT!r} (a checkpoint of an older version, written with pickled "
                                  f"accelerate state, cannot be resumed safely; start from its weights instead)")
        self.files: dict[str, dict[str, Any]] = files
        self.check_listing()
        self.verified: set[str] = set()

    def check_names(self) -> None:
        """Refuse any file or folder this module does not write (a planted .pkl, .pt, .bin, ...), naming it."""
        for path in sorted(self.directory.rglob("*")):
            rel = path.relative_to(self.directory).as_posix()
            if rel in (STATE_NAME, RAW_DIR) and (path.is_file() if rel == STATE_NAME else path.is_dir()):
                continue
            if not ALLOWED.match(rel) or not path.is_file():
                raise CheckpointError(f"{path}: not a file this project writes into a checkpoint; refusing to resume "
                                      f"(pickle-capable and unknown files are never loaded: remove it, or resume "
                                      f"from another checkpoint)")

    def check_listing(self) -> None:
        """Every recorded file is present with its recorded size, and nothing present is unrecorded."""
        for rel, record in self.files.items():
            path = self.directory / rel
            if not ALLOWED.match(rel):
                raise CheckpointError(f"{self.directory / STATE_NAME}: lists {rel!r}, not a checkpoint file name")
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (train_state.json records it); the checkpoint is incomplete")
            if path.stat().st_size != record.get("bytes"):
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, train_state.json records "
                                      f"{record.get('bytes')} (truncated or replaced)")
        for path in self.directory.rglob("*"):
            rel = path.relative_to(self.directory).as_posix()
            if path.is_file() and rel != STATE_NAME and rel not in self.files:
                raise CheckpointError(f"{path}: not recorded in train_state.json; refusing to resume")

    def has(self, rel: str) -> bool:
        return rel in self.files

    def read(self, rel: str) -> bytes:
        """The bytes of a recorded file, after their sha256 matched the record."""
        path = self.directory / rel
        if rel not in self.files:
            raise CheckpointError(f"{path}: missing (train_state.json does not record it)")
        record = self.files[rel]
        data, digest = read_hashed(path, record["bytes"])
        if len(data) != record["bytes"] or digest != record.get("sha256"):
            raise CheckpointError(f"{path}: sha256 {digest[:12]}.. does not match {str(record.get('sha256'))[:12]}.. "
                                  f"recorded in train_state.json (corrupt or replaced)")
        self.verified.add(rel)
        return data

    def verify_rest(self) -> None:
        """Hash the recorded files a resume does not read (raw/config.json, other ranks' states): a checkpoint
        is resumed from only if all of it is intact, so the next one is not built on a damaged folder."""
        for rel in sorted(set(self.files) - self.verified):
            self.read(rel)

    def json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise CheckpointError(f"{self.directory / rel}: not valid JSON ({exn})") from None

    def tensors(self, rel: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(self.read(rel))
        except SafetensorError as exn:
            raise CheckpointError(f"{self.directory / rel}: not a readable safetensors file ({exn})") from None

    def state_pair(self, name: str) -> dict[str, Any]:
        """A state written by write_state_pair, its tensors put back in place."""
        doc = self.json(f"{name}.json")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), dict):
            raise CheckpointError(f"{self.directory / name}.json: not a {FORMAT} state file")
        return decode_state(doc["state"], self.tensors(f"{name}.safetensors"), f"{self.directory / name}.json")

    def config(self) -> Any:
        from m2m_pipeline.network.unet import config_from_json

        return config_from_json(self.read("config.json"), self.directory / "config.json")

    def load_weights(self, net: Any, rel: str, device: Any) -> None:
        """A recorded model.safetensors into `net`; errors name the file and the tensor."""
        from m2m_pipeline.weights import load_weights

        load_weights(net, self.read(rel), self.directory / rel, device)


def check_config(reader: CheckpointReader, config: Any) -> None:
    """Refuse to resume a checkpoint made for a different network (e.g. a task run made before an option
    that adds parameters), naming the fields, instead of failing later on missing weights."""
    saved = reader.config()
    differ = [f.name for f in dataclasses.fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError(f"{reader.directory / 'config.json'}: the checkpoint's network differs from the one being "
                         f"trained in " + ", ".join(f"{k} (saved {getattr(saved, k)!r}, now {getattr(config, k)!r})"
                                                    for k in differ[:4]) + "; resume with the checkpoint's settings")


def load_ema(ema: Any, reader: CheckpointReader, state: dict[str, Any] | None, net: Any, device: Any) -> None:
    """EMA counters from training_state.json, shadow weights from the inference model.safetensors (which holds
    exactly the EMA parameters when EMA is on, buffers aside)."""
    where = reader.directory / f"{TRAINING_STATE}.json"
    if state is None:
        raise CheckpointError(f"{where}: holds no EMA state (written with EMA off); resume with use_ema=False")
    weights = reader.tensors("model.safetensors")
    names = [name for name, _ in net.named_parameters()]
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"{reader.directory / 'model.safetensors'}: lacks EMA parameter(s) {missing[:3]}")
    try:
        ema.load_state_dict({**state, "shadow_params": [weights[n].to(device) for n in names]})
    except ValueError as exn:
        raise CheckpointError(f"{where}: not a valid EMA state ({exn})") from None
