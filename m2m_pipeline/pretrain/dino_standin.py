"""Self-supervised pretraining of the CPU demo's DINO stand-in (docs/model.md, "DINO stand-in pretraining").

At paper scale M2M-DINO's context comes from a pretrained DINOv2 whose tokens carry object identity linearly
(Sec. 5.2); the demo's stand-in is the same architecture at demo size (`DinoEncoder.random`, MISConfig "demo"),
randomly initialised, whose tokens carry colour and background linearly but shape barely (`m2m probe-features`).
This module pretrains exactly that network on rendered shapes-world images with SimCLR's NT-Xent between two
augmented views (no labels, no set structure) and the augmentations of SimCLR / DINO that matter here: besides
pose (flips, rotation, resized crop), strong colour jitter and random grayscale, so that colour no longer solves
the instance-discrimination task and the network must carry the outline (benchmarks/dino_standin_pretraining.py
shows that without them colour and background solve it and shape stays near chance).

    python -m m2m_pipeline.pretrain.dino_standin --preset demo --out runs/pretrain/dino_standin --seconds 3600 --threads 1
    python -m m2m_pipeline.pretrain.dino_standin --probe runs/pretrain/dino_standin   # the probe table
    python -m m2m_pipeline.pretrain.dino_standin --ship runs/pretrain/dino_standin --to models/pretrained --with-probe

Training is resumable: every `checkpoint_seconds` it writes `checkpoint-<step>/` (safetensors weights and optimiser
tensors, JSON state; no pickle) atomically and exports the encoder (`encoder/`, a DINOv2 folder that
`DinoEncoder.from_pretrained` loads with the stand-in's own preprocessing); run again with the same --out to
continue. Every step reseeds torch's RNG from (seed, step), so a resumed run draws the batches and views the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m2m_pipeline.io import atomic_directory, atomic_write_bytes

CHECKPOINT_PREFIX = "checkpoint-"
ENCODER_DIR = "encoder"                   # the exported DINOv2 folder inside a run directory
STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "state.json", "weights.safetensors", "optimizer.safetensors"
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "init_seed")


@dataclass(frozen=True)
class DinoPretrainConfig:
    """One pretraining recipe. The architecture fields are `DinoEncoder.random`'s arguments, so the pretrained
    network has the very Dinov2Config of the stand-in it replaces and starts from its weights (`init_seed`)."""

    name: str
    # --- architecture (DinoEncoder.random; "demo" takes them from MISConfig "demo") ---
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    init_seed: int = 0
    # --- data: a fixed rendered pool, per-image uniform attributes; the probe renders its own (seed 77) ---
    train_images: int = 20000
    data_seed: int = 5
    # --- optimisation (SimCLR; AdamW instead of LARS at this batch size) ---
    batch_size: int = 256                   # images per step; the loss sees 2 x batch_size views
    lr: float = 1e-3
    min_lr_fraction: float = 0.1            # cosine decay over the wall-clock budget down to lr x this
    warmup_steps: int = 100
    weight_decay: float = 0.05
    temperature: float = 0.1                # SimCLR's best at batch 256; a low one weighs the hard negatives (same
                                            # colour and background, another outline) that only shape separates
    projection_hidden: int = 512            # projection head (discarded after pretraining, as in SimCLR)
    projection_dim: int = 128
    seed: int = 0                           # training RNG: step k reseeds torch with (seed, k)
    # --- augmentation (torchvision.transforms.v2, one draw per image and view) ---
    crop_scale: tuple[float, float] = (0.5, 1.0)   # RandomResizedCrop area; shapes fill 0.38-0.62 of the side
    rotation_degrees: float = 180.0
    # ColorJitter strengths: SimCLR's full-strength colour distortion (s = 1: 0.8, 0.8, 0.8) with the hue free
    # over the whole circle (0.5): the world has only eight foreground hues, and with SimCLR's hue 0.2 or DINO's
    # milder (0.4, 0.4, 0.2, 0.1) colour still told instances apart (the CLS token kept colour at 0.999 and
    # shape at chance after 600 steps), so the outline was never needed. Colour stays decodable from the
    # patch tokens, which the loss does not shape (docs/model.md, "DINO stand-in pretraining").
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0                     # GaussianBlur (kernel 3): off, at 32 px it erases the outline
    solarize_p: float = 0.0
    # --- bookkeeping ---
    checkpoint_seconds: float = 180.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "train_images",
                     "batch_size", "projection_hidden", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"DinoPretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"DinoPretrainConfig.image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.batch_size < 2 or self.batch_size > self.train_images:
            raise ValueError(f"DinoPretrainConfig.batch_size must be in [2, train_images={self.train_images}] "
                             f"(NT-Xent needs negatives), got {self.batch_size}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"DinoPretrainConfig.crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "min_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DinoPretrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0 or self.checkpoint_seconds <= 0:
            raise ValueError("DinoPretrainConfig.temperature, lr and checkpoint_seconds must be > 0")

    def replace(self, **changes: Any) -> "DinoPretrainConfig":
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict[str, int]:
        """`DinoEncoder.random` keyword arguments of this recipe's network."""
        return {"image_size": self.image_size, "patch_size": self.patch_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "seed": self.init_seed}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "DinoPretrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not set(d) <= names or "name" not in d:
            raise ValueError(f"{where}: expected a pretraining config with fields {sorted(names)}, got {d!r:.200}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _demo_preset() -> DinoPretrainConfig:
    from m2m_pipeline.data.config import MIS_PRESETS

    mis = MIS_PRESETS["demo"]  # the stand-in the demo builds (data/features.py encoder_spec): one home for its size
    return DinoPretrainConfig(name="demo", image_size=mis.resolution, patch_size=mis.dino_patch_size,
                              hidden_size=mis.dino_hidden_size, num_layers=mis.dino_layers, init_seed=mis.seed)


def get_preset(name: str) -> DinoPretrainConfig:
    presets = {
        # Unit tests: the MISConfig "tiny" stand-in's size, a few steps in a second.
        "tiny": lambda: DinoPretrainConfig(name="tiny", image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                                           train_images=64, batch_size=16, projection_hidden=32,
                                           projection_dim=16, warmup_steps=2, checkpoint_seconds=3600.0),
        "demo": _demo_preset,
    }
    if name not in presets:
        raise ValueError(f"unknown DINO pretraining preset {name!r}; expected one of {sorted(presets)}")
    return presets[name]()


# ------------------------------------------------------------------------------------------------ augmentation

def view_transform(cfg: DinoPretrainConfig):
    """One random view of one image in [0, 1] (3, S, S): SimCLR / DINO's pose and colour augmentations."""
    import torchvision.transforms.v2 as T

    size = cfg.image_size
    steps = [T.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=(0.8, 1.25), antialias=True),
             T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
             T.RandomRotation(cfg.rotation_degrees, interpolation=T.InterpolationMode.BILINEAR),
             T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
             T.RandomGrayscale(p=cfg.grayscale_p)]
    if cfg.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 1.0))], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        steps.append(T.RandomSolarize(0.5, p=cfg.solarize_p))
    return T.Compose(steps)


def augment(images: torch.Tensor, transform) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, S, S) -> one independent view each, in [-1, 1] (v2 draws per call: one call per
    image, so every image gets its own crop, angle and jitter)."""
    x = (images + 1.0) / 2.0
    return torch.stack([transform(img) for img in x]).clamp(0.0, 1.0) * 2.0 - 1.0


# -------------------------------------------------------------------------------------------------------- loss

def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B projections: row i's positive is its other view (i + B mod 2B), the other 2B - 2
    rows its negatives. Hand-written because it is six lines and transformers ships no SimCLR / DINO trainer;
    chosen over DINO's EMA self-distillation because it has no collapse mode to tune away (centering, sharpening,
    teacher momentum) and the batch of 512 views is enough negatives for a 512-combination world."""
    if z.ndim != 2 or len(z) % 2 or len(z) < 4:
        raise ValueError(f"nt_xent needs (2B, D) projections with B >= 2, got {tuple(z.shape)}")
    z = F.normalize(z, dim=1)
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))
    b = len(z) // 2
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


class ProjectionHead(nn.Sequential):
    def __init__(self, cfg: DinoPretrainConfig):
        super().__init__(nn.Linear(cfg.hidden_size, cfg.projection_hidden), nn.GELU(),
                         nn.Linear(cfg.projection_hidden, cfg.projection_dim))


# ------------------------------------------------------------------------------------------- state (no pickle)

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state_dict split into safetensors tensors ("state.<param>.<key>") and JSON (param groups,
    non-tensor per-parameter values)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def machine() -> dict[str, Any]:
    import transformers

    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first (atomic_directory: a listed one is whole)."""
    out = Path(out)
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise ValueError(f"{path}: not a readable pretraining state ({exn})") from None
    for key in ("config", "step", "seconds", "seed", "optimizer"):
        if key not in state:
            raise ValueError(f"{path}: pretraining state lacks {key!r}")
    return state


# ------------------------------------------------------------------------------------------------------ export

def export_encoder(model: nn.Module, cfg: DinoPretrainConfig, folder: str | os.PathLike) -> Path:
    """Save the ViT as a DINOv2 folder (config.json + model.safetensors) with a preprocessor config that makes
    `DinoEncoder.from_pretrained` preprocess exactly as the stand-in does (resize = crop = image_size; without it
    the loader falls back to DINOv2's resize-to-256/224 then center-crop, which would cut the shapes' edges)."""
    from transformers import BitImageProcessor

    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only (no pickle)
        BitImageProcessor(size={"shortest_edge": cfg.image_size},
                          crop_size={"height": cfg.image_size, "width": cfg.image_size},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 / 0600: a shipped folder is read by every user of the checkout
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
    return Path(folder)


# ---------------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class PretrainResult:
    steps: int
    seconds: float
    loss: float
    encoder: Path
    checkpoint: Path


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


def _lr(cfg: DinoPretrainConfig, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine over the budget's elapsed fraction (seconds or steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cosine)


@contextmanager
def _sigterm_stops() -> Iterator[list[int]]:
    """A list that a SIGTERM appends to (kill, nohup'd runs, schedulers), so the loop ends at a step boundary
    and saves; the previous handler comes back afterwards. Signals go to the main thread only."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def pretrain(cfg: DinoPretrainConfig, out: str | os.PathLike, seconds: float, max_steps: int | None = None,
             threads: int | None = None, progress: bool = True, command: list[str] | None = None) -> PretrainResult:
    """Pretrain (or resume, when `out` holds a checkpoint) until `seconds` of training wall time in total, or
    `max_steps`, or a SIGTERM, whichever comes first; returns where the encoder folder and the last checkpoint
    are (the run always ends with a checkpoint of its last step)."""
    with _sigterm_stops() as stop:
        return _pretrain(cfg, Path(out), seconds, max_steps, threads, progress, command, stop)


def _pretrain(cfg: DinoPretrainConfig, out: Path, seconds: float, max_steps: int | None, threads: int | None,
              progress: bool, command: list[str] | None, stop: list[int]) -> PretrainResult:
    from safetensors.torch import load_file, save

    from m2m_pipeline.data.shapes import render_dataset
    from m2m_pipeline.encoders import DinoEncoder

    if seconds <= 0:
        raise ValueError(f"pretraining --seconds must be > 0, got {seconds}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"pretraining --steps must be >= 1, got {max_steps}")
    previous = checkpoints(out)
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "seed": cfg.seed, "sessions": []}
    if previous:
        state = read_state(previous[-1])
        saved = DinoPretrainConfig.from_dict(state["config"], where=str(previous[-1] / STATE_FILE))
        if saved != cfg:
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
            raise ValueError(f"{previous[-1]}: checkpoint of another recipe (differs in {', '.join(diff)}); "
                             f"resume it with the same preset or pass a new --out")
    if threads is not None:
        torch.set_num_threads(threads)

    stand_in = DinoEncoder.random(**cfg.architecture())  # the demo's stand-in: same config, same initial weights
    vit = stand_in.model.train().requires_grad_(True)
    head = ProjectionHead(cfg)
    params = [*vit.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if previous:
        weights = load_file(previous[-1] / WEIGHTS_FILE)
        vit.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
        head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
        load_optimizer_tensors(optimizer, load_file(previous[-1] / OPTIMIZER_FILE), state["optimizer"])
    else:
        torch.manual_seed(cfg.seed)
        with torch.no_grad():  # the head is new; the ViT keeps the stand-in's seeded initialisation
            for module in head:
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
    state.setdefault("sessions", []).append({"command": command or sys.argv, "machine": machine(),
                                             "started_step": int(state["step"]),
                                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    images, _ = render_dataset(cfg.train_images, cfg.image_size, seed=cfg.data_seed, progress=progress)
    transform = view_transform(cfg)
    step, spent = int(state["step"]), float(state["seconds"])
    loss_value = float(state.get("loss", float("nan")))

    def save_checkpoint() -> Path:
        tensors, meta = optimizer_tensors(optimizer)
        target = out / f"{CHECKPOINT_PREFIX}{step:08d}"
        record = {**state, "config": cfg.to_dict(), "step": step, "seconds": round(spent, 3), "seed": cfg.seed,
                  "loss": loss_value, "optimizer": meta}
        with atomic_directory(target) as tmp:
            weights = {**{f"encoder.{k}": v.detach().contiguous() for k, v in vit.state_dict().items()},
                       **{f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}}
            atomic_write_bytes(tmp / WEIGHTS_FILE, save(weights))
            atomic_write_bytes(tmp / OPTIMIZER_FILE, save(tensors))
            atomic_write_bytes(tmp / STATE_FILE, json.dumps(record, indent=1).encode())
        export_encoder(vit, cfg, out / ENCODER_DIR)
        for old in checkpoints(out)[:-2]:  # keep the last two: one is always whole
            shutil.rmtree(old, ignore_errors=True)
        return target

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"DINO stand-in pretraining ({cfg.name})", unit="step", initial=step, disable=not progress,
               mininterval=10.0 if not sys.stderr.isatty() else 0.1)
    start = last_save = time.monotonic()
    base = spent
    checkpoint = previous[-1] if previous else None
    while spent < seconds and (max_steps is None or step < max_steps) and not stop:
        torch.manual_seed(_step_seed(cfg.seed, step))
        progress_fraction = max(spent / seconds, step / max_steps if max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step, progress_fraction)
        x = images[torch.randint(len(images), (cfg.batch_size,))]
        views = torch.cat([augment(x, transform), augment(x, transform)])
        pooled = vit(pixel_values=stand_in.preprocess(views)).pooler_output  # layer-normed CLS token
        loss = nt_xent(head(pooled), cfg.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO stand-in pretraining: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_value = float(loss.item())
        now = time.monotonic()
        spent = base + (now - start)
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", s=f"{spent:.0f}", refresh=False)  # redrawn at mininterval
        if now - last_save >= cfg.checkpoint_seconds:
            checkpoint = save_checkpoint()
            last_save = time.monotonic()
            print(f"checkpoint {checkpoint} (step {step}, {spent:.0f} s, loss {loss_value:.3f})", flush=True)
    bar.close()
    if checkpoint is None or int(checkpoint.name[len(CHECKPOINT_PREFIX):]) != step:
        checkpoint = save_checkpoint()
    return PretrainResult(step, spent, loss_value, out / ENCODER_DIR, checkpoint)


# ------------------------------------------------------------------------------------------------------- probe

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or a run directory's newest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a pretraining checkpoint nor a run directory holding one")
    return found[-1]


def encoder_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, DinoPretrainConfig, dict[str, Any]]:
    """(the ViT with the checkpoint's weights, its recipe, its state): the weights and the state of one step, so
    probing or shipping a run that is still training cannot mix two steps (its encoder/ export follows later)."""
    from safetensors.torch import load_file

    from m2m_pipeline.encoders import DinoEncoder

    checkpoint = resolve_checkpoint(path)
    state = read_state(checkpoint)
    cfg = DinoPretrainConfig.from_dict(state["config"], where=str(checkpoint / STATE_FILE))
    weights = load_file(checkpoint / WEIGHTS_FILE)
    vit = DinoEncoder.random(**cfg.architecture()).model
    vit.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    return vit.eval(), cfg, state


def probe_checkpoints(paths: list[str | os.PathLike], cfg: DinoPretrainConfig, train_images: int = 5000,
                      heldout_images: int = 1000, cls: bool = False) -> dict[str, dict[str, float]]:
    """`m2m probe-features`'s linear probe (evaluation/probe.py) of the random stand-in and of each checkpoint
    (or run directory: its newest), on the same rendered images, all tokens (CLS + patches) as M2M-DINO
    receives them; `cls` adds a CLS-token-only row per encoder (what the loss shapes directly)."""
    return _probe([encoder_from_checkpoint(path) for path in paths], cfg, train_images, heldout_images, cls)


def _probe(loaded: list[tuple[nn.Module, DinoPretrainConfig, dict[str, Any]]], cfg: DinoPretrainConfig,
           train_images: int = 5000, heldout_images: int = 1000, cls: bool = False) -> dict[str, dict[str, float]]:
    from m2m_pipeline.encoders import DinoEncoder
    from m2m_pipeline.evaluation.probe import probe_representations

    stand_in = DinoEncoder.random(**cfg.architecture())
    encoders = {"random stand-in (tokens)": stand_in.encode}
    if cls:
        encoders["random stand-in (CLS)"] = lambda x: stand_in.encode(x)[:, 0]
    for vit, recipe, state in loaded:
        if recipe.architecture() != cfg.architecture():
            raise ValueError(f"a {recipe.name} checkpoint is not the {cfg.name} preset's architecture "
                             f"(pass --preset {recipe.name})")
        label = f"SimCLR {state['step']} steps, {state['seconds']:.0f} s (tokens)"
        encoder = DinoEncoder(vit, image_size=recipe.image_size)
        encoders[label] = encoder.encode
        if cls:
            encoders[label.replace("(tokens)", "(CLS)")] = lambda x, e=encoder: e.encode(x)[:, 0]
    return probe_representations(encoders, cfg.image_size, train_images, heldout_images)


# ------------------------------------------------------------------------------------------------------- ship

def ship(path: str | os.PathLike, root: str | os.PathLike, name: str = "dino_standin",
         with_probe: bool = False) -> tuple[Path, dict[str, dict[str, float]] | None]:
    """Export a checkpoint's encoder (or a run directory's newest; config.json, model.safetensors, preprocessor
    config; no optimiser, no projection head) to `root/name` and pin it in `root/MANIFEST.json` with the run's
    provenance (command, seed, steps, wall time, machine) and, `with_probe`, its probe table beside the random
    stand-in's. The checkpoint is read once, so a run still training (pruning old checkpoints) is safe."""
    from m2m_pipeline.pretrain.manifest import write_manifest_entry

    vit, cfg, state = loaded = encoder_from_checkpoint(path)
    results = _probe([loaded], cfg) if with_probe else None
    export_encoder(vit, cfg, Path(root) / name)
    sessions = state.get("sessions", [])
    provenance = {
        "what": "DINO stand-in pretrained with m2m_pipeline.pretrain.dino_standin (docs/model.md, "
                "\"DINO stand-in pretraining\")",
        "preset": cfg.name, "config": state["config"], "seed": state["seed"],
        "steps": state["step"], "wall_seconds": state["seconds"], "loss": state.get("loss"),
        "command": " ".join(sessions[0]["command"]) if sessions else None,
        "sessions": [{"command": " ".join(s["command"]), "started_step": s["started_step"], "started": s["started"],
                      "machine": s["machine"]} for s in sessions],
        "machine": sessions[-1]["machine"] if sessions else machine(),
    }
    if results is not None:
        provenance["probe"] = results
    write_manifest_entry(root, name, provenance)
    return Path(root) / name, results


# --------------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain the CPU demo's DINO stand-in (docs/model.md, "
                                             "\"DINO stand-in pretraining\"); resumes when --out holds a checkpoint.")
    ap.add_argument("--preset", default="demo", help="recipe: tiny (tests) or demo")
    ap.add_argument("--out", help="run directory (checkpoints, encoder/)")
    ap.add_argument("--seconds", type=float, default=3600.0, help="training wall time in total, across resumes")
    ap.add_argument("--steps", type=int, default=None, help="stop at this many steps if earlier")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--probe", action="append", default=[], metavar="CHECKPOINT",
                    help="print the linear-probe table of the random stand-in and these checkpoints (or run "
                         "directories: their newest), then exit")
    ap.add_argument("--ship", metavar="CHECKPOINT", help="export this checkpoint's (or run directory's newest) "
                                                        "encoder into --to and pin it in its MANIFEST.json")
    ap.add_argument("--cls", action="store_true", help="with --probe: add CLS-token-only rows")
    ap.add_argument("--to", default="models/pretrained", help="where --ship writes")
    ap.add_argument("--with-probe", action="store_true", help="with --ship: record the probe table in the manifest")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    if args.ship:
        folder, results = ship(args.ship, args.to, with_probe=args.with_probe)
        if results is not None:
            from m2m_pipeline.evaluation.probe import format_probe_table

            print(format_probe_table(results), flush=True)
        print(f"shipped {folder}, pinned in {Path(args.to) / 'MANIFEST.json'}")
        return
    if args.probe:
        from m2m_pipeline.evaluation.probe import format_probe_table

        print(format_probe_table(probe_checkpoints(args.probe, cfg, cls=args.cls)), flush=True)
        return
    if not args.out:
        ap.error("--out is required for training")
    result = pretrain(cfg, args.out, args.seconds, args.steps, threads=args.threads,
                      command=["python", "-m", "m2m_pipeline.pretrain.dino_standin", *(argv or sys.argv[1:])])
    print(f"done: {result.steps} steps, {result.seconds:.0f} s, loss {result.loss:.3f}; encoder {result.encoder}")


if __name__ == "__main__":
    main()
