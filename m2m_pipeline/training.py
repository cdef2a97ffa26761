"""Single-process training loop for M2M (Sec. 6.1). Multi-GPU (accelerate) and exact resume come later."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.objective import DropConfig, M2MObjective

MetricsFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000                 # optimizer steps
    batch_size: int = 4               # image sets per step
    n_images: int = 5                 # N images per set (Sec. 7.1.1)
    lr: float = 1e-5                  # Sec. 7: AdamW, 1e-5, no warm-up
    weight_decay: float = 1e-2
    grad_clip: float = 1.0            # max global grad norm
    checkpoint_every: int = 500       # steps between checkpoints (0: only the final one)
    log_every: int = 10               # steps between logged/emitted metrics
    seed: int = 0
    num_workers: int = 0              # dataloader workers
    max_bad_steps: int = 5            # non-finite losses in a row before training aborts (each one is skipped)
    drops: DropConfig = DropConfig()

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_images", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.checkpoint_every < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0, checkpoint_every >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=50, batch_size=4, n_images=3, lr=1e-3, checkpoint_every=25, log_every=5),
    "demo": TrainConfig(steps=1500, batch_size=12, n_images=5, lr=3e-4, checkpoint_every=500, log_every=25),
    # Sec. 7: 8 x A100, global batch 256 (per-device batch x devices x gradient accumulation), lr 1e-5.
    "paper": TrainConfig(steps=47_000, batch_size=256, n_images=5, lr=1e-5, checkpoint_every=2000, log_every=50),
}


@dataclass
class TrainResult:
    checkpoint_dir: Path
    losses: list[float]
    steps: int
    seconds: float

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def _batches(data: str | os.PathLike | list | Iterable[dict[str, Any]], tc: TrainConfig) -> Iterator[dict[str, Any]]:
    """Feature shards (a path, glob or list of paths) or any iterable of ready batches (tests)."""
    if isinstance(data, (str, os.PathLike)) or (isinstance(data, list) and data and isinstance(data[0], (str, Path))):
        from m2m_pipeline.data import make_loader

        yield from make_loader(data, n_images=tc.n_images, batch_size=tc.batch_size, num_workers=tc.num_workers,
                               seed=tc.seed, repeat=True)
    else:
        while True:
            yielded = False
            for batch in data:
                yielded = True
                yield batch
            if not yielded:
                raise ValueError("training data is empty")


def context_of(batch: dict[str, Any], variant: str) -> torch.Tensor:
    """What the network attends to: the clean latents themselves (self) or their DINO tokens (dino)."""
    return batch["latents"] if variant == "self" else batch["dino"]


def train(net_config: M2MConfig, train_config: TrainConfig, data, out_dir: str | os.PathLike, *,
          net: M2MUNet | None = None, on_metrics: MetricsFn | None = None, device: str | None = None,
          progress: bool = True) -> TrainResult:
    """Train M2M on `data` and write checkpoints under `out_dir` (`checkpoint-<step>/`, `final/`).

    net: start from these weights (e.g. M2MUNet.from_stable_diffusion); default: a fresh M2MUNet.
    on_metrics: called with ({"loss": ..., "lr": ..., "grad_norm": ...}, step) every log_every steps.
    """
    tc = train_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    net = (net or M2MUNet(net_config)).to(device).train()
    objective = M2MObjective(net.config, tc.drops)
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    generator = torch.Generator().manual_seed(tc.seed)
    batches = _batches(data, tc)
    losses: list[float] = []
    window: list[float] = []
    skipped, bad_in_a_row = 0, 0
    start = time.perf_counter()
    bar = tqdm(range(1, tc.steps + 1), desc=f"train m2m-{net.variant}", disable=not progress)
    for step in bar:
        batch = next(batches)
        z_0 = batch["latents"].to(device)  # (B, N, C, H, W)
        task_cond = batch.get("task_cond")
        loss = objective(net, z_0, context_of(batch, net.variant).to(device),
                         None if task_cond is None else task_cond.to(device), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        finite = math.isfinite(loss.item())
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            finite = math.isfinite(float(grad_norm))
        if not finite:
            # A bad batch (NaN/inf in the data or the loss) is skipped, not learned from; persistent ones abort.
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            where = f"step {step}, data {batch.get('__url__', batch.get('key', '?'))}"
            if bad_in_a_row >= tc.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite losses/gradients in a row, last at {where}; "
                                         f"aborting (TrainConfig.max_bad_steps={tc.max_bad_steps})")
            bar.write(f"skipping non-finite loss {loss.item()} at {where}")
            continue
        bad_in_a_row = 0
        optimizer.step()
        losses.append(loss.item())
        window.append(loss.item())
        if step % tc.log_every == 0 or step == tc.steps:
            metrics = {"loss": sum(window) / max(1, len(window)), "lr": tc.lr, "grad_norm": float(grad_norm),
                       "skipped_steps": float(skipped)}
            window.clear()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if on_metrics is not None:
                on_metrics(metrics, step)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != tc.steps:
            save_checkpoint(net, tc, losses, out / f"checkpoint-{step:07d}")
    seconds = time.perf_counter() - start
    final = save_checkpoint(net, tc, losses, out / "final")
    return TrainResult(final, losses, tc.steps, seconds)


def save_checkpoint(net: M2MUNet, tc: TrainConfig, losses: list[float], directory: Path) -> Path:
    net.save_pretrained(directory)  # config.json (M2MConfig) + model.safetensors, atomically
    state = {"train_config": tc.to_dict(), "step": len(losses), "losses": losses}  # losses of applied steps
    tmp = directory / "train_state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, directory / "train_state.json")
    return directory
