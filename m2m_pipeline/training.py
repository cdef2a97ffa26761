"""Training M2M (Sec. 6.1, 7) with accelerate: one process or DDP, exact resume, EMA, NaN guard.

`train()` runs unchanged as a plain call (one process) or under `accelerate launch --num_processes P`
(DDP; every process calls `train()` with the same arguments). docs/training.md covers launching, what a
checkpoint holds and the exactness guarantee of a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from tqdm.auto import tqdm

from m2m_pipeline import checkpointing as ckpt
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.objective import DropConfig, M2MObjective
from m2m_pipeline.rollout import RolloutConfig, rollout_context

MetricsFn = Callable[[dict[str, float], int], None]
RANK_SEED_STRIDE = 1_000_003  # objective generator of rank r: seed + r * stride (rank 0 keeps `seed`)
VARIANTS = ("self", "dino")
# fp16 loss-scale overflows in a row before training aborts: the GradScaler halves its scale at each (2^16 ->
# 2^-24 after 40), so more are not the scale's doing
MAX_SCALE_OVERFLOWS = 40
# How TrainConfig.subset_sets picks the training sets (docs/training.md "Training length"): whole feature shards in
# a permutation seeded by TrainConfig.seed, taken until they hold at least subset_sets sets.
SUBSET_RULE = "seeded-shard-draw"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000                 # optimizer steps (applied updates; skipped non-finite steps do not count);
                                      # derived when epochs > 0 (give 0 there)
    # Sec. 7.1.1: each variant trains on a subset of MIS (M2M-Self 9M sets, M2M-DINO 6M): 0 every set of the
    # training shards; n: a seeded draw of shards holding n sets (SUBSET_RULE); {"self": n, "dino": m}: per variant.
    subset_sets: int | dict[str, int] = 0
    # > 0: `steps` is derived, ceil(subset_sets x epochs / global_batch_size) (Appendix A: one epoch at 256);
    # 0: `steps` as given
    epochs: int = 0
    batch_size: int = 4               # image sets per process per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step (derived instead if global_batch_size > 0)
    global_batch_size: int = 0        # 0: batch_size x processes x grad_accum; > 0: grad_accum is derived from it
    n_images: int = 5                 # N images per set (Sec. 7.1.1)
    lr: float = 1e-5                  # Sec. 7: AdamW, 1e-5, no warm-up
    lr_scheduler: str = "constant"    # a diffusers `get_scheduler` name
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    grad_clip: float = 1.0            # max global grad norm
    snr_gamma: float = 0.0            # > 0: Min-SNR-gamma loss weighting (objective.py); 0: the plain Eq. 5 loss
    context_noise: int = 0            # > 0: M2M-Self context noised to t_c ~ U{0..context_noise} (objective.py)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)  # M2M-Self own-generation context
    use_ema: bool = True              # keep an EMA of the weights (diffusers EMAModel); inference weights = EMA
    ema_decay: float = 0.9999         # upper bound of the EMA decay
    ema_power: float = 2 / 3          # EMA warm-up: decay_t = min(ema_decay, 1 - (1 + t)^-power)
    mixed_precision: str = "auto"     # "auto": bf16 autocast on GPU, fp32 on CPU; or "no", "bf16", "fp16"
    gradient_checkpointing: bool = False  # recompute U-Net activations in backward (memory for compute)
    checkpoint_every: int = 500       # steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 3         # newest complete checkpoints kept (0: all)
    max_seconds: float = 0.0          # wall-clock budget of one train() call (0: none); stops cleanly, saves
    log_every: int = 10               # steps between logged/emitted metrics
    seed: int = 0
    num_workers: int = 0              # dataloader workers
    max_bad_steps: int = 5            # non-finite losses in a row before training aborts (each one is skipped)
    drops: DropConfig = dataclasses.field(default_factory=DropConfig)

    def __post_init__(self) -> None:
        if isinstance(self.drops, dict):  # from to_dict() / JSON
            object.__setattr__(self, "drops", DropConfig(**self.drops))
        if isinstance(self.rollout, dict):
            object.__setattr__(self, "rollout", RolloutConfig(**self.rollout))
        for name in ("batch_size", "grad_accum", "n_images", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        self._check_subset_and_derive_steps()
        if self.snr_gamma < 0:
            raise ValueError(f"TrainConfig.snr_gamma must be >= 0 (0: off), got {self.snr_gamma}")
        if self.lr <= 0 or self.checkpoint_every < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0, checkpoint_every >= 0")
        for name in ("global_batch_size", "lr_warmup_steps", "keep_checkpoints", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_power <= 0:
            raise ValueError(f"TrainConfig: ema_decay must be in [0, 1) and ema_power > 0, "
                             f"got {self.ema_decay}, {self.ema_power}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.global_batch_size and self.grad_accum != 1:
            raise ValueError("TrainConfig: set grad_accum or global_batch_size, not both")

    def _check_subset_and_derive_steps(self) -> None:
        subset = self.subset_sets
        if isinstance(subset, Mapping):  # also from YAML / JSON
            subset = {str(k): v for k, v in subset.items()}
            object.__setattr__(self, "subset_sets", subset)
            if sorted(subset) != sorted(VARIANTS):
                raise ValueError(f"TrainConfig.subset_sets: a per-variant subset names every variant {list(VARIANTS)}, "
                                 f"got {sorted(subset)}")
            sizes = list(subset.values())
        else:
            sizes = [subset]
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"TrainConfig.subset_sets must be sets >= 0 (0: all), got {self.subset_sets!r}")
        if self.epochs < 0:
            raise ValueError(f"TrainConfig.epochs must be >= 0 (0: steps as given), got {self.epochs}")
        if not self.epochs:
            if self.steps < 1:
                raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
            return
        if not all(sizes) or not self.global_batch_size:
            raise ValueError(f"TrainConfig.epochs={self.epochs} derives the steps from subset_sets and "
                             f"global_batch_size, both > 0 (got {self.subset_sets!r}, {self.global_batch_size}); or "
                             f"give steps with epochs=0")
        derived = self.epoch_steps()
        if self.steps not in (0, derived):
            per = f"{derived} steps" if derived else "steps per variant"
            raise ValueError(f"TrainConfig.steps={self.steps} contradicts epochs={self.epochs} of subset_sets="
                             f"{self.subset_sets!r} at global_batch_size={self.global_batch_size} ({per}); give steps "
                             f"with epochs=0, or leave steps 0 to derive them")
        object.__setattr__(self, "steps", derived)  # 0 until for_variant() picks a per-variant subset

    def epoch_steps(self) -> int:
        """ceil(subset_sets x epochs / global_batch_size): the optimizer steps of `epochs` passes over the subset
        (0 while the subset is per variant, or without epochs)."""
        if not self.epochs or isinstance(self.subset_sets, Mapping):
            return 0
        return -(-self.subset_sets * self.epochs // self.global_batch_size)

    def for_variant(self, variant: str) -> TrainConfig:
        """This config for one M2M variant: its own subset_sets picked from a per-variant one, steps derived."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
        if not isinstance(self.subset_sets, Mapping):
            return self
        return dataclasses.replace(self, subset_sets=self.subset_sets[variant], steps=0 if self.epochs else self.steps)

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per optimizer step, so that batch_size x num_processes x accumulation = global batch."""
        if not self.global_batch_size:
            return self.grad_accum
        per_micro = self.batch_size * num_processes
        if self.global_batch_size % per_micro:
            raise ValueError(f"TrainConfig.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"batch_size x processes = {self.batch_size} x {num_processes}")
        return self.global_batch_size // per_micro

    def global_batch(self, num_processes: int) -> int:
        return self.batch_size * num_processes * self.accumulation(num_processes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named preset with field overrides. Steps given explicitly replace a preset's epoch arithmetic: its
        epochs become 0 and, unless subset_sets is given too, so does its subset (that many steps on every set of
        the data: a dry run, a fine-tune on task data); otherwise a preset's epoch steps are re-derived from the
        overridden subset_sets / epochs / global_batch_size."""
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        base = TRAIN_PRESETS[name]
        if "steps" in overrides and "epochs" not in overrides:
            overrides = {"subset_sets": 0, **overrides, "epochs": 0} if base.epochs else overrides
        elif "steps" not in overrides and overrides.get("epochs", base.epochs):
            overrides = {**overrides, "steps": 0}
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Short CPU runs: EMA capped at 0.99 so its average spans tens of steps, not thousands.
    "tiny": TrainConfig(steps=50, batch_size=4, n_images=3, lr=1e-3, checkpoint_every=25, log_every=5,
                        ema_decay=0.99),
    # CPU demo: at most 15 minutes of training (the learnability result, README); lr 1e-3 measured to learn
    # the context's colours within ~200 steps with v-prediction (docs/model.md). `steps` is a ceiling the
    # 15-minute budget stops first (~3500 steps of the latent demo U-Net on one core).
    "demo": TrainConfig(steps=8000, batch_size=12, n_images=5, lr=1e-3, checkpoint_every=100, log_every=10,
                        ema_decay=0.999, max_seconds=900.0),
    # Sec. 7 / Appendix A: 8 x A100, global batch 256, one epoch, constant lr 1e-5; Sec. 7.1.1: M2M-Self on a
    # subset of 9M sets, M2M-DINO of 6M, so 35,157 and 23,438 steps (derived: ceil(subset x epochs / 256)).
    # The micro-batch comes from `m2m plan --gpus 8` (activations counted on the real U-Net, bf16,
    # checkpointing): 8 sets fit an 80 GB GPU for M2M-Self (4.4 GiB per set, 13 fit) and M2M-DINO (2.2 GiB,
    # 27 fit); 8 GPUs accumulate 4 micro-batches.
    "paper": TrainConfig(steps=0, subset_sets={"self": 9_000_000, "dino": 6_000_000}, epochs=1,
                         batch_size=8, global_batch_size=256, n_images=5, lr=1e-5,
                         lr_scheduler="constant", lr_warmup_steps=0, checkpoint_every=2000, log_every=50,
                         ema_decay=0.9999, gradient_checkpointing=True),
}


@dataclass
class TrainResult:
    checkpoint_dir: Path              # inference folder (`final/`): EMA weights if EMA is on; `raw/` beside
    losses: list[float]               # global-batch loss of every applied step, resumed history included
    steps: int                        # applied optimizer steps so far
    seconds: float                    # wall-clock seconds of this call
    skipped_steps: int = 0            # non-finite steps skipped (this run and any it resumed)
    resumed_from: Path | None = None
    stopped_early: bool = False       # the max_seconds budget ended the run before `steps`
    data_subset: dict[str, Any] | None = None  # the training sets (draw_subset's record); None: not feature shards

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def initial_network(init_from: str | os.PathLike | None, net_config: M2MConfig,
                    from_scratch: bool = False) -> M2MUNet | None:
    """Sec. 6.1: every U-Net weight but the Image-Set Attention from an SD-style folder, or None (random weights).

    The one place every front-end (CLI, Dagster in-process and Pipes, ablation) gets its initial weights. An
    SD-2.1-base-sized U-Net (the paper preset) is only trained from random weights when asked (`from_scratch`,
    the CLI's --from-scratch, the run config's `train_from_scratch`), with a warning: weeks of GPU time spent
    on a model that the paper starts from SD's weights should not be a silent default.
    """
    if init_from and from_scratch:
        raise ValueError(f"give either an initial SD folder ({init_from}) or from_scratch, not both")
    if init_from:
        return M2MUNet.from_stable_diffusion(init_from, net_config)
    if net_config.is_sd_sized():
        if not from_scratch:
            raise ValueError("this U-Net has SD-2.1-base's shape and the paper initialises it from SD-2.1-base's "
                             "EMA weights (Sec. 6.1): give the local SD folder (m2m train --init-from DIR; "
                             "run config settings.sd_model_path), or --from-scratch to train from random weights")
        warnings.warn("training an SD-2.1-base-sized U-Net from random weights (--from-scratch); the paper "
                      "initialises it from SD-2.1-base (Sec. 6.1)", UserWarning, stacklevel=2)
    return None


def context_of(batch: dict[str, Any], variant: str, dino: Any = None, device: Any = "cpu") -> torch.Tensor:
    """What the network attends to, on `device`: the clean latents themselves (self) or DINO tokens (dino) —
    cached in the batch, or encoded here from its context images (an online DINO store) by the frozen `dino`."""
    if variant == "self":
        return batch["latents"].to(device)
    if "dino" in batch:
        return batch["dino"].to(device)
    if dino is None or "images" not in batch:
        raise ValueError("an M2M-DINO batch needs 'dino' tokens, or 'images' and the DINO encoder of an online store")
    images = batch["images"].to(device)  # (B, N - 1, 3, H, W): only the context images (data/loader.py)
    b = images.shape[0]
    with torch.no_grad():
        tokens = dino.encode(rearrange(images, "b n c h w -> (b n) c h w"))  # (B * (N - 1), S, D)
    return rearrange(tokens, "(b n) s d -> b n s d", b=b)


def data_refs(batch: dict[str, Any]) -> list[str]:
    """Where a batch came from, for error messages: shard#key per set, else the keys, else '?'."""
    keys = batch.get("key", batch.get("__key__"))
    shards = batch.get("shard", batch.get("__url__"))
    keys = [keys] if isinstance(keys, str) else keys
    shards = [shards] if isinstance(shards, str) else shards
    if shards is not None and keys is not None:
        return [f"{s}#{k}" for s, k in zip(shards, keys)]
    return list(keys) if keys is not None else ([str(s) for s in shards] if shards is not None else ["?"])


def draw_subset(shards: Any, subset_sets: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """The training sets (Sec. 7.1.1): (the shards to train on, the record a checkpoint keeps of them).

    subset_sets 0: every shard, as given. n > 0 (SUBSET_RULE): the shards, ordered by name, are permuted by a
    generator seeded with ("m2m-subset", seed) and taken until they hold >= n sets (whole shards: the subset
    overshoots by less than one shard); they are returned ordered by name, so the loader's own seeded shard
    shuffle does not depend on the draw's order. One seed gives nested subsets: a smaller subset is a prefix of the
    same permutation (M2M-DINO's 6M sets are within M2M-Self's 9M). Set counts come from the shards' manifests;
    the record hashes the chosen shards' names and manifest sha256s (their bytes, so their keys).
    """
    from m2m_pipeline.data.loader import expand_shards
    from m2m_pipeline.data.shards import read_manifest

    urls = expand_shards(shards)
    entries = []
    for url in urls:
        manifest = read_manifest(url)
        if manifest is None:
            raise ValueError(f"{url}: no manifest, so the training subset cannot count its sets (TrainConfig.subset_sets)")
        entries.append((os.path.basename(url), int(manifest["num_samples"]), str(manifest["sha256"]), url))
    total = sum(e[1] for e in entries)
    if subset_sets > total:
        raise ValueError(f"TrainConfig.subset_sets={subset_sets:,}: the {len(urls)} training shards ({urls[0]} ...) hold "
                         f"only {total:,} sets; ask for fewer, or subset_sets=0 for all of them")
    by_name = sorted(entries)
    if subset_sets:
        order = list(by_name)
        random.Random(f"m2m-subset:{seed}").shuffle(order)
        chosen, count = [], 0
        for entry in order:
            if count >= subset_sets:
                break
            chosen.append(entry)
            count += entry[1]
        chosen.sort()
        data: Any = [e[3] for e in chosen]
    else:
        chosen, data = by_name, shards  # unchanged: the loader's shard order is that of the whole set as given
    digest = hashlib.sha256(json.dumps([[e[0], e[1], e[2]] for e in chosen]).encode()).hexdigest()
    record = {"rule": SUBSET_RULE if subset_sets else "all", "seed": seed if subset_sets else None,
              "requested_sets": subset_sets, "sets": sum(e[1] for e in chosen), "shards": len(chosen),
              "of_sets": total, "of_shards": len(entries), "shards_sha256": digest}
    return data, record


def make_accelerator(tc: TrainConfig, device: str | None):
    from accelerate import (
        Accelerator,
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
    )

    from m2m_pipeline.precision import check_supported, from_accelerate

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    precision = tc.mixed_precision if tc.mixed_precision != "auto" else ("no" if cpu else "bf16")
    # docs/training.md "Precision": fp16 is refused on CPU; fp16 on CUDA gets accelerate's GradScaler
    check_supported("cpu" if cpu else "cuda", from_accelerate(precision), "TrainConfig.mixed_precision")
    return Accelerator(
        cpu=cpu, mixed_precision=precision,
        # Sampler seeded by seed + epoch: a map-style dataset's order is reproducible after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tc.seed),
        # Some parameters get no gradient in some steps (every set of a batch dropping its image condition,
        # dropped task conditions), which plain DDP treats as an error.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )


def train(net_config: M2MConfig, train_config: TrainConfig, data, out_dir: str | os.PathLike, *,
          net: M2MUNet | None = None, on_metrics: MetricsFn | None = None, device: str | None = None,
          progress: bool = True, resume_from: str | os.PathLike | None = None,
          max_seconds: float | None = None) -> TrainResult:
    """Train M2M on `data` and write checkpoints under `out_dir` (`checkpoint-<step>/`, `final/`).

    data: feature shards (a path, glob or list of paths), a DataLoader, or any re-iterable of batches.
    net: start from these weights (e.g. M2MUNet.from_stable_diffusion); default: a fresh M2MUNet.
    on_metrics: called on rank 0 with ({"loss", "lr", "grad_norm", "skipped_steps"}, step) every log_every steps.
    resume_from: a checkpoint folder, or "latest" (the newest complete one under out_dir; none: start fresh).
    max_seconds: overrides TrainConfig.max_seconds: stop after this wall-clock budget and save.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    tc = train_config if max_seconds is None else dataclasses.replace(train_config, max_seconds=max_seconds)
    tc = tc.for_variant(net.config.variant if net is not None else net_config.variant)  # its subset and steps
    owns_state = not PartialState._shared_state  # a launcher script may have its own Accelerator
    accelerator = make_accelerator(tc, device)
    try:
        return _Trainer(accelerator, net_config, tc, Path(out_dir), net).run(
            data, on_metrics=on_metrics, progress=progress, resume_from=resume_from)
    finally:
        if owns_state:  # the next train() in this process may want another device or precision
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


class _Trainer:
    def __init__(self, accelerator: Any, net_config: M2MConfig, tc: TrainConfig, out: Path, net: M2MUNet | None):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.acc, self.tc, self.out = accelerator, tc, out
        self.dino: Any = None  # the frozen DINO encoder of an online DINO store (run)
        self.rank = accelerator.process_index
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tc.seed)  # the same fresh weights on every rank
        self.net = net if net is not None else M2MUNet(net_config)
        if tc.gradient_checkpointing:
            self.net.unet.enable_gradient_checkpointing()
        self.net.train()
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        # Not passed to prepare(): accelerate's scheduler wrapper steps once per process, which would make the
        # schedule depend on the number of processes.
        self.lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps,
                                          num_training_steps=tc.steps)
        self.ddp_net, self.optimizer = accelerator.prepare(self.net, optimizer)
        self.ema = None
        if tc.use_ema:
            self.ema = EMAModel(self.net.parameters(), decay=tc.ema_decay, use_ema_warmup=True, power=tc.ema_power)
        self.objective = M2MObjective(self.net.config, tc.drops, tc.snr_gamma, tc.context_noise)
        if tc.rollout.fraction and self.net.variant != "self":
            raise ValueError("TrainConfig.rollout is defined for M2M-Self only (M2M-DINO's context would need the "
                             "decoder and DINO inside the step)")
        self.generator = torch.Generator().manual_seed(tc.seed + RANK_SEED_STRIDE * self.rank)

    def _inference_state(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        state = self.net.state_dict()  # buffers as they are; parameters from the EMA
        for (name, _), shadow in zip(self.net.named_parameters(), self.ema.shadow_params):
            state[name] = shadow
        return state

    # ------------------------------------------------------------------ checkpoints
    # Not accelerate's save_state/load_state: those pickle the optimizer, RNG states and custom objects, and
    # unpickle them on resume; checkpointing.py writes the same state as safetensors + JSON (its docstring).
    def save(self, step: int, state: dict[str, Any], stream: Any = None) -> Path:
        tmp, final = ckpt.temp_dir(self.out, step), self.out / ckpt.checkpoint_name(step)
        if stream is not None:
            stream.verify_consumed()  # no checkpoint includes updates from bytes not yet checked against a manifest
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed mid-save
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        try:
            self._write_checkpoint(tmp, state)
        except OSError as exn:  # e.g. a full disk: the temp folder is dropped, published checkpoints stay
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(exn.errno, f"{final}: writing the checkpoint failed ({exn.strerror or exn}); the "
                                     f"checkpoints already in {self.out} are unchanged") from exn
        if self.acc.is_main_process:
            ckpt.publish(tmp, final)
            ckpt.prune(self.out, self.tc.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def _write_checkpoint(self, tmp: Path, state: dict[str, Any]) -> None:
        ckpt.save_rank_state(tmp, self.rank, self.generator)  # every rank: its own RNGs
        if self.acc.is_main_process:
            self.net.save_pretrained(tmp / ckpt.RAW_DIR)
            ckpt.save_weights_into(self.net, tmp, self._inference_state())
            ckpt.save_training_state(tmp, self.optimizer, self.lr_scheduler, self.ema, self.acc.scaler)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            ckpt.write_state(tmp, {**state, "resumable": True})  # last: hashes the rest, marks it complete

    def save_final(self, state: dict[str, Any]) -> Path:
        final = self.out / "final"
        if self.acc.is_main_process:
            self.net.save_pretrained(final, state_dict=self._inference_state())
            self.net.save_pretrained(final / ckpt.RAW_DIR)
            ckpt.write_state(final, {**state, "resumable": False})
        self.acc.wait_for_everyone()
        return final

    def restore(self, reader: ckpt.CheckpointReader) -> dict[str, Any]:
        """Weights, optimizer, scheduler, EMA, grad scaler and this rank's RNGs, each file verified before use."""
        directory, state = reader.directory, reader.state
        if not state.get("resumable", False):
            raise ValueError(f"{directory} holds weights only (no optimizer/RNG state); resume from a checkpoint-*")
        if state.get("world_size") != self.acc.num_processes or state.get("accumulation") != \
                self.tc.accumulation(self.acc.num_processes):
            self.acc.print(f"warning: {directory} was written by {state.get('world_size')} process(es) with "
                           f"accumulation {state.get('accumulation')}; resuming with {self.acc.num_processes} and "
                           f"{self.tc.accumulation(self.acc.num_processes)} is not exact (data split and noise differ)")
        reader.load_weights(self.net, f"{ckpt.RAW_DIR}/model.safetensors", self.acc.device)
        training = reader.state_pair(ckpt.TRAINING_STATE)
        where = directory / f"{ckpt.TRAINING_STATE}.json"
        try:
            self.optimizer.load_state_dict(training["optimizer"])
            self.lr_scheduler.load_state_dict(training["lr_scheduler"])
            if self.acc.scaler is not None and training.get("grad_scaler") is not None:
                self.acc.scaler.load_state_dict(training["grad_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exn:
            raise ckpt.CheckpointError(f"{where}: does not fit this optimizer or scheduler "
                                       f"({type(exn).__name__}: {exn})") from None
        if self.ema is not None:
            ckpt.load_ema(self.ema, reader, training.get("ema"), self.net, self.acc.device)
        name = ckpt.rank_state_name(self.rank)
        if reader.has(f"{name}.json"):
            ckpt.set_rng_state(reader.state_pair(name), self.generator, f"{directory / name}.json")
        else:
            self.acc.print(f"warning: {directory} has no RNG state for rank {self.rank}; noise differs")
        reader.verify_rest()
        return state

    def _record_encoders(self, shards: Any) -> Any:
        """Every checkpoint names the encoders of the features it was trained on (feature manifests); a network
        that already names others (fine-tuning a checkpoint on a cache built with other encoders) is refused.
        Returns the frozen DINO encoder of an online DINO store (M2M-DINO only), else None."""
        from m2m_pipeline.bundle import context_dino
        from m2m_pipeline.data.features import cache_dino_features, cache_encoder_spec
        from m2m_pipeline.data.loader import expand_shards

        urls = expand_shards(shards)  # the manifests are read once for both questions
        spec = cache_encoder_spec(urls)
        online = self.net.variant == "dino" and cache_dino_features(urls) == "online"
        if spec is None:
            if online:
                raise ValueError(f"feature shards {urls[0]}...: an online DINO store must record its encoder_spec")
            return None
        if self.net.encoder_spec is not None:
            from m2m_pipeline.encoders import EncoderSpec

            problem = EncoderSpec.from_dict(self.net.encoder_spec).mismatch(spec, self.net.config.variant)
            if problem:
                raise ValueError(f"the network was trained on features of other encoders than these feature "
                                 f"shards ({problem}); rebuild the cache with the network's encoders")
        self.net.encoder_spec = spec.to_dict()
        # context_dino: the same build and width check the samplers' bundle uses; frozen, in eval mode
        return context_dino(self.net, spec).to(self.acc.device) if online else None

    # ------------------------------------------------------------------ the loop
    def run(self, data: Any, *, on_metrics: MetricsFn | None, progress: bool,
            resume_from: str | os.PathLike | None) -> TrainResult:
        from m2m_pipeline.data.stream import BatchStream, is_shard_source

        acc, tc = self.acc, self.tc
        accum = tc.accumulation(acc.num_processes)
        subset = None
        if is_shard_source(data):
            data, subset = draw_subset(data, tc.subset_sets, tc.seed)
        elif tc.subset_sets:
            raise ValueError(f"TrainConfig.subset_sets={tc.subset_sets} draws whole feature shards; this data is a "
                             f"{type(data).__name__} (give feature shards, or subset_sets=0)")
        resume_dir = ckpt.resolve_resume(resume_from, self.out)
        reader = ckpt.CheckpointReader(resume_dir) if resume_dir is not None else None  # refuses unknown files
        if reader is not None:
            ckpt.check_config(reader, self.net.config)
        prior = reader.state if reader is not None else {}
        before = prior.get("data_subset")
        if before and subset and before.get("shards_sha256") != subset["shards_sha256"]:
            raise ValueError(f"{resume_dir}: trained on another subset of the training sets ({before.get('sets')} sets "
                             f"in {before.get('shards')} shards, sha256 {str(before.get('shards_sha256'))[:12]}..) than "
                             f"this data and TrainConfig give ({subset['sets']} in {subset['shards']}, "
                             f"{subset['shards_sha256'][:12]}..); resume with the same shards, subset_sets and seed")
        position = prior.get("data_position", {"epoch": 0, "consumed": 0})
        # The stream (and its first iterator) is built before the RNG states are restored, as in the first run.
        stream = BatchStream(data, acc, n_images=tc.n_images, batch_size=tc.batch_size, num_workers=tc.num_workers,
                             seed=tc.seed, epoch=position["epoch"], consumed=position["consumed"])
        if stream.kind == "shards":
            self.dino = self._record_encoders(data)
        if reader is not None:
            self.restore(reader)
        step = int(prior.get("step", 0))
        losses: list[float] = list(prior.get("losses", []))
        skipped, bad_in_a_row = int(prior.get("skipped_steps", 0)), int(prior.get("bad_in_a_row", 0))
        seconds_before = float(prior.get("seconds", 0.0))  # wall-clock of earlier runs of this training

        def state() -> dict[str, Any]:
            return {"step": step, "losses": losses, "seconds": seconds_before + time.perf_counter() - start, "skipped_steps": skipped, "bad_in_a_row": bad_in_a_row,
                    "data_position": stream.position, "world_size": acc.num_processes, "accumulation": accum,
                    "global_batch_size": tc.batch_size * acc.num_processes * accum,
                    "inference_weights": "ema" if self.ema is not None else "raw", "train_config": tc.to_dict(),
                    "data_subset": subset}

        window: list[float] = []
        last_saved, stopped_early = step if resume_dir is not None else -1, False
        start = time.perf_counter()
        bar = tqdm(total=tc.steps, initial=step, desc=f"train m2m-{self.net.variant}",
                   disable=not (progress and acc.is_main_process))
        overflows = 0
        while step < tc.steps:
            step_loss, grad_norm, bad_refs = self._step(stream, accum)
            if bad_refs is None:  # fp16: the GradScaler skipped this update and lowered its scale; not bad data
                overflows += 1
                if overflows > MAX_SCALE_OVERFLOWS:
                    raise FloatingPointError(f"{overflows} fp16 gradient overflows in a row at step {step + 1} "
                                             f"(finite loss {step_loss}); train in bf16 or fp32")
                continue
            overflows = 0
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if not finite:
                # A bad batch (NaN/inf in the data or the loss) is skipped, not learned from; persistent ones abort.
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                where = f"step {step + 1}, data {bad_refs}"
                if bad_in_a_row >= tc.max_bad_steps:
                    raise FloatingPointError(f"{bad_in_a_row} non-finite losses/gradients in a row, last at {where}; "
                                             f"aborting (TrainConfig.max_bad_steps={tc.max_bad_steps})")
                if acc.is_main_process:
                    bar.write(f"skipping non-finite loss {step_loss} (grad norm {grad_norm}) at {where}")
                continue
            bad_in_a_row = 0
            step += 1
            losses.append(step_loss)
            window.append(step_loss)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = {"loss": sum(window) / len(window), "lr": float(self.lr_scheduler.get_last_lr()[0]),
                           "grad_norm": grad_norm, "skipped_steps": float(skipped)}
                window.clear()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if on_metrics is not None and acc.is_main_process:
                    on_metrics(metrics, step)
            if tc.max_seconds and step < tc.steps and self._out_of_time(start):
                stopped_early = True
                if acc.is_main_process:
                    bar.write(f"time budget of {tc.max_seconds:.0f} s spent after {step} steps; saving and stopping")
                break
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != tc.steps:
                self.save(step, state(), stream)
                last_saved = step
        bar.close()
        seconds = time.perf_counter() - start
        if last_saved != step:
            self.save(step, state(), stream)  # resumable end state (also after a time-budget stop)
        else:
            stream.verify_consumed()  # final/ too holds only verified data's updates
        final = self.save_final(state())
        return TrainResult(final, losses, step, seconds, skipped, resume_dir, stopped_early, subset)

    def _step(self, stream: Any, accum: int) -> tuple[float, float, list[str] | None]:
        """Forward/backward over `accum` micro-batches and, if every rank's loss and the gradient are finite,
        one optimizer update. Returns (global-batch loss, grad norm, refs of bad data, None for an fp16 loss-scale
        overflow); every rank agrees."""
        from accelerate.utils import gather_object

        acc, net = self.acc, self.net
        micro_losses, refs = [], []
        for micro in range(accum):
            batch = next(stream)
            refs.append(data_refs(batch))
            z_0 = batch["latents"].to(acc.device)  # (B, N, C, H, W)
            task_cond = batch.get("task_cond")
            context = context_of(batch, net.variant, self.dino, acc.device)
            if self.tc.rollout.fraction:  # M2M-Self: part of the context from the model's own generations
                context = rollout_context(net, context, self.tc.rollout, self.generator)
            # Gradients are all-reduced on the last micro-batch only.
            sync = acc.no_sync(self.ddp_net) if micro < accum - 1 else nullcontext()
            with sync:
                with acc.autocast():
                    loss = self.objective(self.ddp_net, z_0, context,
                                          None if task_cond is None else task_cond.to(acc.device),
                                          generator=self.generator)
                # A non-finite loss is still back-propagated (its gradient is discarded below): every rank
                # must run the same collective ops, or DDP deadlocks.
                acc.backward(loss / accum)
            micro_losses.append(loss.detach().float())
        local = torch.stack(micro_losses)  # (accum,)
        step_loss = acc.reduce(local.mean(), "mean")  # global-batch loss; NaN if any rank's is
        grad_norm = acc.clip_grad_norm_(self.ddp_net.parameters(), self.tc.grad_clip)
        ok = torch.isfinite(step_loss) & torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
        ok = bool(acc.reduce(ok.float(), "min").item())  # all ranks take the same branch
        if not ok:
            if acc.scaler is not None:
                # fp16 (docs/training.md "Precision"): the GradScaler has to see the non-finite gradient: its step
                # skips the update and lowers the scale (else the scale never drops, and the next unscale_ fails)
                self.optimizer.step()
                if math.isfinite(float(step_loss)):
                    self.optimizer.zero_grad(set_to_none=True)
                    return float(step_loss), float("nan"), None
            self.optimizer.zero_grad(set_to_none=True)
            bad = [r for loss, rs in zip(micro_losses, refs) if not torch.isfinite(loss) for r in rs]
            if not bad and math.isfinite(float(step_loss)):
                bad = [r for rs in refs for r in rs]  # finite loss, non-finite gradient: name the step's data
            if acc.num_processes > 1:
                bad = gather_object(bad)  # the rank that saw the bad data may not be rank 0
            return float(step_loss), float("nan"), list(dict.fromkeys(bad))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.net.parameters())
        return float(step_loss), float(grad_norm), []

    def _out_of_time(self, start: float) -> bool:
        over = torch.tensor(float(time.perf_counter() - start > self.tc.max_seconds), device=self.acc.device)
        return bool(self.acc.reduce(over, "max").item())  # rank 0's clock is not enough: all ranks stop together
