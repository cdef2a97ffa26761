"""Attribute oracle for the procedural shapes world: a small CNN that reads back a set's attributes.

On CPU there is no Inception or CLIP worth trusting at 16-32 px, but the shapes world has ground truth:
every image of a set shares one shape, colour, background pattern and background colour. A classifier
with one head per attribute, trained on freshly rendered images, turns "does the generated image keep
the context's content / style" into accuracies (consistency.py), and its pooled penultimate features
are the offline FID feature extractor (fid.py), as Inception's pool3 features are at paper scale.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from m2m_pipeline.io import atomic_directory
from m2m_pipeline.data.shapes import (  # noqa: F401 - render_dataset is re-exported for callers
    VOCABULARIES,
    attributes_of,
    render_dataset,
)
from m2m_pipeline.weights import CheckpointError, load_weights

CONFIG_FILE = "oracle_config.json"
WEIGHTS_FILE = "oracle.safetensors"
METRICS_FILE = "oracle_metrics.json"
ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARIES)  # head order; class ids are positions in VOCABULARIES


class OracleAccuracyError(RuntimeError):
    """The trained oracle misses the held-out accuracy bar; a weaker oracle would bias every metric."""


@dataclass(frozen=True)
class OracleConfig:
    image_size: int = 32                               # pixels per side it is trained on; other sizes are resized
    widths: tuple[int, ...] = (16, 32, 64, 128)        # conv channels per stage; the last is the feature dim D
    convs_per_stage: int = 1                           # 3x3 conv + BN + ReLU blocks per stage (CPU budget)
    num_classes: tuple[tuple[str, int], ...] = tuple((name, len(v)) for name, v in VOCABULARIES.items())
    # Training (recorded so a saved oracle says how it was made).
    train_images: int = 16000                          # rendered once, random attributes and seeds
    heldout_images: int = 2000                         # disjoint seeds, no augmentation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3                                   # AdamW, one-cycle cosine schedule
    noise_std: float = 0.08                            # max std of added Gaussian noise, in [-1, 1] units
    seed: int = 0

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["num_classes"] = {name: n for name, n in self.num_classes}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OracleConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["num_classes"] = tuple((name, int(n)) for name, n in d["num_classes"].items())
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"oracle config has unknown fields {sorted(unknown)}")
        return cls(**d)


def _stage(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(convs):
        layers += [nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class AttributeOracle(nn.Module):
    """Conv stages with 2x pooling between them, global average pool (features), one linear head per attribute."""

    def __init__(self, config: OracleConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for i, width in enumerate(config.widths):
            if i > 0:
                stages.append(nn.MaxPool2d(2))
            stages.append(_stage(c_in, width, config.convs_per_stage))
            c_in = width
        self.body = nn.Sequential(*stages)
        self.heads = nn.ModuleDict({name: nn.Linear(c_in, n) for name, n in config.num_classes})
        self.heldout_accuracy: dict[str, float] | None = None  # set by train_oracle / load

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.config.num_classes)

    def _prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(..., 3, H, W) in [-1, 1] -> (B, 3, S, S) at the training size S, plus the leading shape."""
        if images.ndim < 4 or images.shape[-3] != 3:
            raise ValueError(f"oracle expects images (..., 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        lead = tuple(images.shape[:-3])
        x = images.reshape(-1, *images.shape[-3:]).to(next(self.parameters()).device, torch.float32)
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            # Antialiased resize: downscaling a 512 px image must not alias the background pattern.
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x, lead

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) -> logits per attribute, each (B, num_values)."""
        f = self.body(x).mean(dim=(2, 3))  # (B, D)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate (globally pooled) features, (..., D): the offline FID feature space."""
        x, lead = self._prepare(images)
        was_training = self.training
        self.eval()
        out = torch.cat([self.body(x[i : i + batch_size]).mean(dim=(2, 3)) for i in range(0, len(x), batch_size)])
        self.train(was_training)
        return out.reshape(*lead, -1).cpu()

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        x, lead = self._prepare(images)
        was_training = self.training
        self.eval()
        chunks = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return {name: torch.cat([c[name] for c in chunks]).reshape(*lead, -1).cpu() for name in self.attributes}

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., 3, H, W) in [-1, 1] -> {attribute: LongTensor (...)} class ids in VOCABULARIES' order."""
        return {name: logit.argmax(-1) for name, logit in self.logits(images).items()}

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax per attribute, {attribute: (..., num_values)}; the offline Inception-Score classifier."""
        return {name: logit.softmax(-1) for name, logit in self.logits(images).items()}

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, metrics: Mapping[str, Any] | None = None) -> Path:
        """Config json + safetensors weights (+ metrics json), written to a temp folder and renamed whole."""
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            if metrics is not None:
                (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> AttributeOracle:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"oracle folder {directory} has no {name}; train one with train_oracle()")
        try:
            config = OracleConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{directory / CONFIG_FILE}: not a valid oracle config ({err})") from None
        oracle = cls(config)
        load_weights(oracle, (directory / WEIGHTS_FILE).read_bytes(), directory / WEIGHTS_FILE, map_location)
        if (directory / METRICS_FILE).is_file():
            try:
                metrics = json.loads((directory / METRICS_FILE).read_text(encoding="utf-8"))
            except ValueError as err:
                raise CheckpointError(f"{directory / METRICS_FILE}: not valid JSON ({err})") from None
            oracle.heldout_accuracy = metrics.get("heldout_accuracy") if isinstance(metrics, dict) else None
        return oracle.to(map_location).eval()


# ---- ground truth in the oracle's index space -------------------------------------------------------
def attribute_targets(attributes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                      captions: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """True class ids of one set or a batch of sets, {attribute: LongTensor ()} or (B,).

    `attributes` is what shards and the loader carry (`{"ids": {"shape": 1, ...}, "names": ..., ...}`,
    ids in VOCABULARIES' order, the oracle's order too). Without it, the caption is parsed instead.
    """
    single = isinstance(attributes, Mapping) or isinstance(captions, str)
    if attributes is not None:
        items = [attributes] if isinstance(attributes, Mapping) else list(attributes)
        rows = []
        for i, a in enumerate(items):
            if "ids" not in a:
                raise KeyError(f"attributes of set {i} have no 'ids' field (keys: {sorted(a)})")
            rows.append(a["ids"])
    elif captions is not None:
        rows = [attributes_of(c) for c in ([captions] if isinstance(captions, str) else captions)]
    else:
        raise ValueError("attribute_targets needs attributes or captions")
    out = {name: torch.tensor([int(r[name]) for r in rows], dtype=torch.long) for name in ATTRIBUTES}
    return {name: t[0] for name, t in out.items()} if single else out


# ---- training ---------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Photometric jitter a generator's output shows: per-image Gaussian noise, mirror images."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * noise_std
    x = x + sigma * torch.randn(x.shape, generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate_accuracy(oracle: AttributeOracle, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = oracle.predict(images)
    return {name: float((pred[name] == labels[:, j]).float().mean()) for j, name in enumerate(oracle.attributes)}


def train_oracle(
    image_size: int,
    *,
    out_dir: str | os.PathLike | None,
    seed: int = 0,
    progress: bool = True,
    min_accuracy: float | None = 0.99,   # per attribute on held-out images; None: report, do not enforce
    num_threads: int | None = 1,         # torch CPU threads while training; None: leave torch's setting
    **overrides: Any,                    # any OracleConfig field (train_images, epochs, widths, ...)
) -> AttributeOracle:
    """Render train / held-out images, train the oracle, check held-out accuracy, save to `out_dir`.

    One thread by default: these small convolutions gain little from more, and on a shared 2-core
    machine two threads measured 4x slower (352 s vs 80 s at 16 px) than one.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_oracle(OracleConfig(image_size=image_size, seed=seed, **overrides), out_dir, progress,
                             min_accuracy)
    finally:
        torch.set_num_threads(previous_threads)


def _train_oracle(config: OracleConfig, out_dir: str | os.PathLike | None, progress: bool,
                  min_accuracy: float | None) -> AttributeOracle:
    seed, image_size = config.seed, config.image_size
    torch.manual_seed(seed)
    start = time.perf_counter()
    x_train, y_train = render_dataset(config.train_images, image_size, seed=2 * seed, progress=progress)
    x_held, y_held = render_dataset(config.heldout_images, image_size, seed=2 * seed + 1, progress=progress)

    oracle = AttributeOracle(config)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="train oracle", disable=not progress)
    oracle.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            logits = oracle(_augment(x_train[idx], config.noise_std, generator))
            loss = sum(F.cross_entropy(logits[name], y_train[idx, j]) for j, name in enumerate(oracle.attributes))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    oracle.eval()

    accuracy = evaluate_accuracy(oracle, x_held, y_held)
    oracle.heldout_accuracy = accuracy
    metrics = {"heldout_accuracy": accuracy, "heldout_images": len(x_held),
               "train_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    if progress:
        print("oracle held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    if min_accuracy is not None and min(accuracy.values()) < min_accuracy:
        raise OracleAccuracyError(f"oracle held-out accuracy {accuracy} is below {min_accuracy} for at least one "
                                  f"attribute; train longer (epochs={config.epochs}) or on more images")
    if out_dir is not None:
        oracle.save(out_dir, metrics)
    return oracle


def load_or_train_oracle(directory: str | os.PathLike, image_size: int, progress: bool = True,
                         **train_kwargs: Any) -> AttributeOracle:
    """The oracle cached in `directory`, trained there first if absent; a size mismatch is an error."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        oracle = AttributeOracle.load(directory)
        if oracle.config.image_size != image_size:
            raise ValueError(f"oracle in {directory} was trained at {oracle.config.image_size} px, not {image_size} "
                             f"px; use another folder for a {image_size} px oracle")
        return oracle
    return train_oracle(image_size, out_dir=directory, progress=progress, **train_kwargs)
