"""Run profiles: which presets and sizes one end-to-end chain uses (smoke, demo, paper).

A profile is fixed in code because it shapes the asset graph: its MIS shard partitions are a
`StaticPartitionsDefinition` computed here at load time (no sensor needed). The run config
(`m2m_pipeline/configs/<profile>.yaml`, resource `settings`) may override what does not change the graph:
seeds, training steps, evaluation sizes, weight paths.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from m2m_pipeline.data.captions import SPLITS, caption_hash, split_of
from m2m_pipeline.data.config import MISConfig, get_preset
from m2m_pipeline.data.shapes import random_captions
from m2m_pipeline.data.tokens import normalise_caption
from m2m_pipeline.evaluation.report import EVAL_PRESETS, EvalSpec


@dataclass(frozen=True)
class RunProfile:
    name: str                             # asset key prefix, DVC stage key, MLflow tag
    mis_preset: str                       # MIS_PRESETS key
    net_preset: str                       # M2MConfig.preset name
    train_preset: str                     # TrainConfig.preset name
    mis_overrides: dict[str, Any] = field(default_factory=dict)    # MISConfig fields changed for this profile
    train_overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields changed for this profile
    caption_source: str = "shapes"        # "shapes": write the procedural world's TSV; else a CC12M TSV glob
    caption_seed: int = 0                 # seed of the procedural caption TSV (fixes the shard count)
    shard_groups: int | None = None       # partitions when shards are too many to list (paper); None: one per shard
    eval: EvalSpec = EvalSpec()
    gpu: bool = False                     # steps ask the production executor for nvidia.com/gpu
    # Which executor its jobs run on: "multiprocess" (one host), "celery" (m2m_pipeline/orchestration/
    # celery_executor.py: workers on queues `gpu` and `default`, a broker), "k8s" (a pod per step).
    executor: str = "multiprocess"
    # AutoencoderConfig preset the profile trains as its `autoencoder` asset (the CPU presets' stand-in for
    # SD's VAE, m2m_pipeline/autoencoder.py); None: the MIS preset names its own (SD's VAE, or pixels).
    autoencoder_preset: str | None = None
    # BaseModelConfig preset the profile trains as its `base_model` asset (the CPU profiles' text-to-image model
    # in SD-2.1-base's role, m2m_pipeline/base_model.py); both M2M variants start from it (Sec. 6.1). None: from
    # the SD folder that renders the profile's MIS (the paper), see resources.initial_weights.
    base_model_preset: str | None = None
    # Whether its run continues real MSCOCO sets (the `coco_zero_shot` asset, Sec. 8.3, Figs. 16-17; needs
    # settings.coco_dir): the paper profile; the CPU profiles' zero-shot study uses scikit-image photographs.
    coco_zero_shot: bool = False

    @cached_property
    def mis_config(self) -> MISConfig:
        cfg = get_preset(self.mis_preset).replace(**self.mis_overrides)
        if self.autoencoder_preset is not None:  # the profile's own autoencoder (run config may move it)
            cfg = cfg.replace(autoencoder="vae",
                              autoencoder_path=self.mis_overrides.get("autoencoder_path", str(self.autoencoder_dir)))
        return cfg

    # ------------------------------------------------------------------ paths (relative to the repo root)
    @property
    def assets_dir(self) -> Path:
        return Path("assets") / self.name

    @property
    def models_dir(self) -> Path:
        return Path("models") / self.name

    @property
    def autoencoder_dir(self) -> Path:
        """Where the profile's trained autoencoder lives (a folder with `vae/`, as an SD folder has)."""
        return self.models_dir / "autoencoder"

    @property
    def base_model_dir(self) -> Path:
        """Where the profile's trained text-to-image model lives (a Stable Diffusion pipeline folder)."""
        return self.models_dir / "base_model"

    # ------------------------------------------------------------------ partitions
    def shard_counts(self, num_captions: int | None = None, test_fraction: float | None = None,
                     sets_per_shard: int | None = None) -> dict[str, int]:
        """Shards per split for the procedural caption source, computed without writing anything."""
        cfg = self.mis_config
        num = cfg.num_captions if num_captions is None else num_captions
        frac = cfg.test_fraction if test_fraction is None else test_fraction
        per = cfg.sets_per_shard if sets_per_shard is None else sets_per_shard
        counts = {split: 0 for split in SPLITS}
        for _, text in random_captions(num, self.caption_seed):
            counts[split_of(caption_hash(normalise_caption(text)), frac, cfg.validation_fraction)] += 1
        return {split: math.ceil(n / per) for split, n in counts.items()}

    @cached_property
    def num_partitions(self) -> int:
        """Partition p owns the shards with index % num_partitions == p of every split (round-robin, like
        `generate_mis(rank=p, world_size=num_partitions)`)."""
        if self.shard_groups is not None:
            return self.shard_groups
        return max(1, *self.shard_counts().values())

    @property
    def partition_keys(self) -> list[str]:
        return [str(p) for p in range(self.num_partitions)]

    @property
    def shapes_world(self) -> bool:
        """Whether the profile is judged by the shapes world's attribute oracle (its `attribute_oracle` and
        `learnability` assets exist) or by the paper's scorers (Inception FID / IS, CLIP): its EvalSpec says."""
        return self.eval.scorers == "oracle"

    def __post_init__(self) -> None:
        if self.executor not in ("multiprocess", "celery", "k8s"):
            raise ValueError(f"RunProfile {self.name}: executor must be multiprocess, celery or k8s, got {self.executor!r}")
        if not self.shapes_world and (self.autoencoder_preset or self.base_model_preset):
            # their assets are checked / judged by the attribute oracle, which only the shapes world has
            raise ValueError(f"RunProfile {self.name}: autoencoder_preset and base_model_preset need the shapes "
                             f"world's oracle (eval.scorers 'oracle'), got scorers {self.eval.scorers!r}")

    def replace(self, **changes: Any) -> RunProfile:
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, RunProfile] = {
    # CI: the whole chain in a few minutes on 2 CPU cores (16 px sets, tiny nets, a few dozen steps).
    "smoke": RunProfile(
        name="smoke", mis_preset="tiny", net_preset="tiny-latent", train_preset="tiny", autoencoder_preset="tiny",
        base_model_preset="tiny",
        train_overrides={"steps": 30},
        eval=EVAL_PRESETS["smoke"],
    ),
    # CPU demo: procedural MIS at 32 px, its own autoencoder (32 px -> 8x8x8 latents), latent demo nets.
    "demo": RunProfile(
        name="demo", mis_preset="demo", net_preset="demo", train_preset="demo", autoencoder_preset="demo",
        base_model_preset="demo",
        eval=EVAL_PRESETS["demo"],
    ),
    # The paper: SD-2.1-base MIS from CC12M on GPUs; partitions are groups of shards (~122 k shards in all).
    "paper": RunProfile(
        name="paper", mis_preset="paper", net_preset="paper", train_preset="paper",
        caption_source="data/cc12m/*.tsv", shard_groups=256, gpu=True, executor="k8s", coco_zero_shot=True,
        eval=EVAL_PRESETS["paper"],
    ),
    # The scale-out path exercised on one machine (docs/orchestration.md, `make cluster-smoke`): smoke's sizes on the Celery
    # executor, a broker on 127.0.0.1 and several workers; 96 captions make 4 MIS partitions of 16-set shards.
    "cluster": RunProfile(
        name="cluster", mis_preset="tiny", net_preset="tiny-latent", train_preset="tiny", autoencoder_preset="tiny",
        base_model_preset="tiny", mis_overrides={"num_captions": 96, "sets_per_shard": 16},
        train_overrides={"steps": 30}, executor="celery",
        eval=EVAL_PRESETS["smoke"],
    ),
}


def caption_files(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))
