"""Task fine-tuning (Sec. 6.2, 8.5): novel view synthesis (camera condition) and visual procedures (step
position), from a base M2M checkpoint trained without a task, or from scratch.

A library: no orchestration imports. Training itself is `training.train(...)`; this module builds the task
model, the held-out splits and the batches it trains on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset

from m2m_pipeline.data.loader import collate_examples
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.tasks.batching import make_task_loader
from m2m_pipeline.tasks.errors import TaskDataError
from m2m_pipeline.tasks.objaverse import ObjaverseViews, list_objects, split_uids
from m2m_pipeline.tasks.vgsi import ProcedureSteps, list_procedures
from m2m_pipeline.training import MetricsFn, TrainConfig, TrainResult, train

Task = Literal["camera", "position"]
# Parameters a task adds to a base M2M: zero-initialised (or only read through zero-initialised layers).
TASK_PARAM_MARKERS = ("task_embedder.", "cond_to_q.", "cond_to_kv.", "dino_task_proj.", "spatial_bias.")


@dataclass(frozen=True)
class TaskEvalConfig:
    """How held-out items are split into context and targets, and how targets are sampled."""

    context_images: int = 1               # NVS: 1 input view, as Zero-1-to-3; procedures: steps seen
    target_images: int = 4                # views / next steps generated per item, autoregressively
    steps: int = 50                       # DDIM steps (eta 0: deterministic given the seed)
    s_I: float = 1.0                      # image guidance of Eq. 7
    s_C: float = 1.0                      # task guidance of Eq. 7
    seed: int = 0                         # item i of the held-out split samples with seed + i
    max_items: int | None = None          # held-out items evaluated (None: all)
    batch_size: int = 20                  # items sampled together
    sweep_s_I: tuple[float, ...] = ()     # guidance grid tried on the validation split (empty: no sweep)
    sweep_s_C: tuple[float, ...] = ()
    sweep_items: int = 16                 # validation items per sweep point

    def __post_init__(self) -> None:
        for name in ("context_images", "target_images", "steps", "batch_size", "sweep_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskEvalConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class FinetuneConfig:
    task: Task                            # "camera" (NVS) or "position" (procedures)
    net_preset: str                       # M2MConfig preset when training from scratch (else the base's config)
    train: TrainConfig                    # steps, batch, lr, drops (5% / 5% / 5%, docs/tasks.md "Choices")
    held_out: int = 40                    # objects / procedures never trained on: the test split
    validation: int = 16                  # further items kept out of training, for the guidance sweep
    split_seed: int = 0
    eval: TaskEvalConfig = field(default_factory=TaskEvalConfig)
    # Relative spatial-position logits in Image-Set Attention (M2MConfig.spatial_bias; not in the paper):
    # both tasks' targets are geometric edits of the context, which attention without positions cannot
    # look up (docs/tasks.md, "Spatial bias"). Zero-initialised like the task embedders. The paper preset
    # turns it off (the model as published).
    spatial_bias: bool = True
    # Images per frozen-encoder forward (SD's VAE / DINOv2) when a batch is encoded on the compute device.
    encode_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.held_out < 1 or self.validation < 0 or self.encode_batch_size < 1:
            raise ValueError(f"FinetuneConfig: held_out and encode_batch_size must be >= 1 and validation >= 0, got "
                             f"{self.held_out}, {self.encode_batch_size}, {self.validation}")
        if isinstance(self.train, dict):  # from to_dict() / JSON (a run's splits.json)
            object.__setattr__(self, "train", TrainConfig(**self.train))
        if isinstance(self.eval, dict):
            object.__setattr__(self, "eval", TaskEvalConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in self.eval.items()}))

    @property
    def min_steps(self) -> int:
        """Images an item must have to give both a training example and an evaluation example (procedures
        shorter than this are left out of every split; an Objaverse object always has 12 views)."""
        return max(self.train.n_images, self.eval.context_images + self.eval.target_images)

    @property
    def image_size(self) -> int:
        return M2MConfig.preset(self.net_preset).image_size

    @classmethod
    def preset(cls, name: str, task: Task, **overrides: Any) -> FinetuneConfig:
        key = f"{name}-{task}"
        if key not in FINETUNE_PRESETS:
            raise ValueError(f"unknown fine-tuning preset {key!r}; choose one of {sorted(FINETUNE_PRESETS)}")
        return dataclasses.replace(FINETUNE_PRESETS[key], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """The inverse of to_dict (a run's splits.json). Runs made before `spatial_bias` existed had none."""
        return cls(**{"spatial_bias": False, **d})


def _nvs_eval(**kw: Any) -> TaskEvalConfig:
    return TaskEvalConfig(context_images=1, target_images=4, **kw)


def _procedure_eval(**kw: Any) -> TaskEvalConfig:
    return TaskEvalConfig(context_images=4, target_images=2, **kw)  # 4 steps seen -> the next 2 (docs/tasks.md)


_TINY_TRAIN = TrainConfig.preset("tiny", steps=4, batch_size=2, n_images=3, checkpoint_every=0, log_every=2)
# demo: ~4 s/step (batch 6 x 5 images, 32 px, M2M-Self, one torch thread) when this job had about half of the
# 2 shared cores: 150 steps ~ the 10 minutes per task. Measured runs took 28-32 min (docs/tasks.md).
# With v-prediction (docs/model.md) the demo fine-tunes at the demo pre-training lr, for at most 10 minutes.
_DEMO_TRAIN = TrainConfig.preset("demo", steps=400, batch_size=6, lr=1e-3, checkpoint_every=0, log_every=5,
                                 max_seconds=600.0)

FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    "tiny-camera": FinetuneConfig("camera", "tiny", _TINY_TRAIN, held_out=2, validation=1,
                                  eval=TaskEvalConfig(context_images=1, target_images=2, steps=3, batch_size=4,
                                                      sweep_items=1)),
    "tiny-position": FinetuneConfig("position", "tiny", _TINY_TRAIN, held_out=2, validation=1,
                                    eval=TaskEvalConfig(context_images=2, target_images=1, steps=3, batch_size=4,
                                                        sweep_items=1)),
    # Demo evaluation: s_I = s_C = 1 (one network branch per step), 25 DDIM steps, 24 held-out items, so the
    # chain stays within minutes on 2 CPU cores; `m2m evaluate-task --s-i .. --s-c ..` / a sweep for more.
    "demo-camera": FinetuneConfig("camera", "demo", dataclasses.replace(_DEMO_TRAIN, n_images=5),
                                  eval=_nvs_eval(steps=25, max_items=24)),
    "demo-position": FinetuneConfig("position", "demo", dataclasses.replace(_DEMO_TRAIN, n_images=6),
                                    eval=_procedure_eval(steps=25, max_items=24)),
}

# The paper (Sec. 6.2, 8.5, App. A; docs/tasks.md "Paper presets"): fine-tuned like pretraining -- TrainConfig
# "paper": AdamW at 1e-5, constant, no warm-up, global batch 256 (micro-batch 8, accumulated), EMA, bf16 on GPU,
# gradient checkpointing. The paper gives no fine-tuning length: 10k steps (NVS, 2.6 M examples, ~3 passes over
# Objaverse's objects) and 5k (procedures, ~15 passes over VGSI's methods; the validation split follows it).
_PAPER_TRAIN = TrainConfig.preset("paper", steps=10_000, checkpoint_every=1000, log_every=50, num_workers=8)
# Sampling as App. A: DDIM, 50 steps, eta 0; s_I = 7.5 ("for the preceding images"); s_C (not given) chosen on
# the validation split from {1, 3, 7.5}.
_PAPER_EVAL = {"steps": 50, "s_I": 7.5, "s_C": 7.5, "sweep_s_I": (7.5,), "sweep_s_C": (1.0, 3.0, 7.5),
               "batch_size": 8, "sweep_items": 16}
FINETUNE_PRESETS.update({
    # Fig. 7: 1 input view -> 4 novel views; examples of 5 views in training.
    "paper-camera": FinetuneConfig("camera", "paper", dataclasses.replace(_PAPER_TRAIN, n_images=5),
                                   held_out=100, validation=16, spatial_bias=False, encode_batch_size=16,
                                   eval=_nvs_eval(**_PAPER_EVAL)),
    # Fig. 8: 4 steps -> the next 4; examples of 8 consecutive steps in training.
    "paper-position": FinetuneConfig("position", "paper", dataclasses.replace(_PAPER_TRAIN, n_images=8,
                                                                              steps=5000),
                                     held_out=100, validation=16, spatial_bias=False, encode_batch_size=16,
                                     eval=TaskEvalConfig(context_images=4, target_images=4, **_PAPER_EVAL)),
})


# ---------------------------------------------------------------------- the task model
def is_task_parameter(name: str) -> bool:
    return any(marker in name for marker in TASK_PARAM_MARKERS)


def init_task_model(task: Task, base: str | os.PathLike | None = None, net_preset: str = "demo",
                    seed: int = 0, spatial_bias: bool = False) -> M2MUNet:
    """A task model: from a base checkpoint (M2MUNet.from_pretrained of a model with task 'none', either
    variant) or from scratch (`net_preset`, M2M-Self).

    From a base, every base weight is copied and only the task parameters are new; their projections into
    attention are zero-initialised, so at step 0 the task model computes exactly the base model's function
    whatever the task condition (tested). `spatial_bias` adds the (equally zero-initialised) relative
    position logits to Image-Set Attention; callers pass FinetuneConfig.spatial_bias.
    """
    torch.manual_seed(seed)
    if base is None:
        return M2MUNet(M2MConfig.preset(net_preset, "self", task=task, spatial_bias=spatial_bias))
    base_net = M2MUNet.from_pretrained(base)
    if base_net.config.task != "none":
        raise ValueError(f"{Path(base) / 'config.json'}: base checkpoint already has task "
                         f"'{base_net.config.task}'; fine-tuning starts from a model trained without one")
    net = M2MUNet(dataclasses.replace(base_net.config, task=task, spatial_bias=spatial_bias))
    net.encoder_spec = base_net.encoder_spec  # same encoders as the base: its features, its DINO stand-in
    missing, unexpected = net.load_state_dict(base_net.state_dict(), strict=False)
    untouched = [k for k in missing if not is_task_parameter(k)]
    if untouched or unexpected:
        raise ValueError(f"{base}: base weights do not match the task model (missing {untouched[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return net


# ---------------------------------------------------------------------- data and splits
@dataclass(frozen=True)
class TaskSplits:
    """Item keys (object uids / procedure keys) of the three disjoint splits."""

    train: list[str]
    validation: list[str]
    test: list[str]


def task_keys(task: Task, root: str | os.PathLike, min_steps: int = 1) -> list[str]:
    """Every object uid, or every procedure with at least `min_steps` step images, sorted."""
    if task == "camera":
        return list_objects(root)
    keys = sorted(p.key for p in list_procedures(root) if len(p.steps) >= min_steps)
    if not keys:
        raise TaskDataError(root, f"no procedure has {min_steps} or more step images")
    return keys


def make_splits(task: Task, root: str | os.PathLike, held_out: int, validation: int, seed: int = 0,
                min_steps: int = 1) -> TaskSplits:
    """Split by object / procedure (never by view or step): test first, then validation from the rest.
    Procedures with fewer than `min_steps` images (FinetuneConfig.min_steps) are in no split."""
    keys = task_keys(task, root, min_steps)
    rest, test = split_uids(keys, held_out, seed)
    train_keys, val = split_uids(rest, validation, seed + 1) if validation else (rest, [])
    return TaskSplits(train_keys, val, test)


class _Split(Subset):
    """A subset of a task dataset that forwards set_epoch (new views / start steps each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]


def task_dataset(task: Task, root: str | os.PathLike, keys: Sequence[str], n_images: int, image_size: int,
                 seed: int = 0) -> Dataset:
    """Examples of n_images views (NVS) or consecutive steps (procedures) of the given items only."""
    if task == "camera":
        return ObjaverseViews(root, n_views=n_images, image_size=image_size, seed=seed, uids=keys)
    steps = ProcedureSteps(root, n_steps=n_images, image_size=image_size, seed=seed)
    wanted = set(keys)
    index = [i for i, p in enumerate(steps.procedures) if p.key in wanted]
    if len(index) != len(wanted):
        found = {steps.procedures[i].key for i in index}
        raise ValueError(f"{root}: {len(wanted - found)} procedures of the split have fewer than {n_images} steps "
                         f"or are missing, e.g. {sorted(wanted - found)[:3]}")
    return _Split(steps, index)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else cuda when present, else cpu (what train() picks for device=None)."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


class TaskFeatures(Dataset):
    """A task dataset and the frozen encoders its batches go through: "images" (B, N, 3, S, S) in [-1, 1] (the
    pixels, on the CPU), "latents" (the autoencoder's codes of the images; the images themselves for
    pixel-space models) and, for M2M-DINO, "dino" (B, N, tokens, D) -- both computed on `device`.

    Items are read and decoded one by one (in DataLoader workers when there are any), and encoded per *batch*
    on `device`, `encode_batch_size` images per forward (`batches`, `encode`): SD's VAE and DINOv2 belong on
    the accelerator, which forked loader workers cannot share. The example order, epoch seeding and map-style
    resume are those of the wrapped dataset (whose items hold the pixels as "latents"). `features[i]` is one
    item through the same encode (a batch of one)."""

    def __init__(self, dataset: Dataset, autoencoder: Any | None = None, dino: Any | None = None,
                 device: str | torch.device | None = None, encode_batch_size: int = 64):
        if encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {encode_batch_size}")
        self.dataset, self.autoencoder, self.dino = dataset, autoencoder, dino
        self.device, self.encode_batch_size = default_device(device), encode_batch_size
        for module in (autoencoder, dino):
            if isinstance(module, torch.nn.Module):
                module.to(self.device)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _encode(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(0, 1)  # (B * N, 3, S, S)
        with torch.no_grad():
            parts = [fn(chunk.to(self.device)) for chunk in flat.split(self.encode_batch_size)]
        return torch.cat(parts).unflatten(0, tuple(images.shape[:2]))

    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch of reader items (pixels as "latents", (B, N, 3, S, S)) -> the training batch."""
        out = dict(batch)
        images = batch["latents"]
        out["images"] = images
        if self.autoencoder is not None:
            out["latents"] = self._encode(self.autoencoder.encode, images).float()  # (B, N, C, h, w)
        if self.dino is not None:
            out["dino"] = self._encode(self.dino.encode, images)  # (B, N, tokens, D)
        return out

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                num_workers: int = 0) -> Iterator[dict[str, Any]]:
        for batch in make_task_loader(self.dataset, batch_size, seed=seed, shuffle=shuffle,
                                      num_workers=num_workers, drop_last=drop_last):
            yield self.encode(batch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.encode(collate_examples([self.dataset[index]]))
        return {k: v[0] for k, v in batch.items()}

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]


def task_autoencoder(net: M2MUNet, autoencoder: str | os.PathLike | None = None) -> Any | None:
    """The autoencoder a task model works through: None for pixel-space models, else the AutoencoderKL folder
    (`vae/` inside) its base was trained with, loaded by the paper path's VaeAutoencoder."""
    if net.config.autoencoder == "pixel":
        return None
    if autoencoder is None:
        raise ValueError("this model diffuses autoencoder latents (config autoencoder 'vae'): pass the folder of "
                         "its autoencoder (the one holding vae/, e.g. models/demo/autoencoder)")
    from m2m_pipeline.encoders import VaeAutoencoder

    return VaeAutoencoder.from_pretrained(autoencoder)


def with_context_features(net: M2MUNet, dataset: Dataset, dino: str | os.PathLike | None = None,
                          autoencoder: str | os.PathLike | None = None, device: str | torch.device | None = None,
                          encode_batch_size: int = 64) -> TaskFeatures:
    """What the variant's training batches need: latents (the images for pixel models), and for M2M-DINO the
    DINO tokens of the images, encoded on `device`."""
    encoder = None
    if net.config.variant == "dino":
        from m2m_pipeline.bundle import checkpoint_encoder_spec, context_dino

        encoder = context_dino(net, checkpoint_encoder_spec(net, dino=dino), dino)  # the base's own encoder
    return TaskFeatures(dataset, task_autoencoder(net, autoencoder), encoder, device, encode_batch_size)


class EpochBatches:
    """Re-iterable training batches; each pass is a new epoch (new view subsets / start steps, new order)."""

    def __init__(self, dataset: TaskFeatures, batch_size: int, seed: int = 0, num_workers: int = 0):
        if len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} training items is fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        batches = self.dataset.batches(self.batch_size, seed=self.seed + self.epoch, num_workers=self.num_workers)
        self.epoch += 1
        yield from batches


# ---------------------------------------------------------------------- fine-tuning
def finetune(config: FinetuneConfig, root: str | os.PathLike, out_dir: str | os.PathLike, *,
             base: str | os.PathLike | None = None, on_metrics: MetricsFn | None = None,
             device: str | None = None, progress: bool = True,
             resume_from: str | os.PathLike | None = None,
             dino: str | os.PathLike | None = None,
             autoencoder: str | os.PathLike | None = None) -> tuple[TrainResult, TaskSplits]:
    """Fine-tune a task model on the train split of `root`; checkpoints under out_dir (final/).
    The variant is the base's (M2M-Self or M2M-DINO; from scratch: M2M-Self). `dino`: a local DINOv2 folder
    for an M2M-DINO base (default: the CPU presets' seeded random encoder its features were built with).
    `autoencoder`: the folder of a latent base's AutoencoderKL (`vae/` inside); pixel bases need none.
    `resume_from` ("latest" or a checkpoint folder) continues an interrupted or finished run exactly.
    `device` (default: cuda when present): where the model trains and the frozen encoders encode each batch."""
    splits = make_splits(config.task, root, config.held_out, config.validation, config.split_seed,
                         config.min_steps)
    net = init_task_model(config.task, base, config.net_preset, seed=config.train.seed,
                          spatial_bias=config.spatial_bias)
    data = task_dataset(config.task, root, splits.train, config.train.n_images, net.config.image_size,
                        seed=config.train.seed)
    data = with_context_features(net, data, dino, autoencoder, default_device(device), config.encode_batch_size)
    batches = EpochBatches(data, config.train.batch_size, seed=config.train.seed,
                           num_workers=config.train.num_workers)
    result = train(net.config, config.train, batches, out_dir, net=net, on_metrics=on_metrics, device=device,
                   progress=progress, resume_from=resume_from)
    return result, splits
