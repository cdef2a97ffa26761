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
from m2m_pipeline.evaluation.learnability import SamplingSweep


@dataclass(frozen=True)
class EvalSpec:
    num_sets: int = 4                     # test sets of the Sec. 8.4 protocol (the paper: 10,000)
    context_images: int = 4               # preceding images given to the model (Sec. 8.4: 4)
    generated_images: int = 4             # images generated autoregressively after them (Sec. 8.4: 10)
    steps: int = 50                       # DDIM steps (Sec. 8.6: 50)
    guidance_scale: float = 3.0           # design-notes 12: guidance matters a lot at CPU scale
    window: int | None = 4                # context window W: the most recent 4 images, as many as training saw
    drift_images: int = 25                # images generated in the drift study (consistency by position)
    drift_sets: int = 8                   # test sets of the drift study
    context_counts: tuple[int, ...] = (1, 2, 3, 4)  # preceding images in the Fig. 6 study
    zero_shot_images: int = 4             # images generated after each set of real photographs (Fig. 5)
    oracle_overrides: dict[str, Any] = field(default_factory=dict)  # train_oracle kwargs (OracleConfig fields)
    autoencoder_min_accuracy: float | None = 0.99  # oracle accuracy on reconstructions, per attribute (None: report)
    benchmark_contexts: tuple[int, ...] = (1, 2, 4)  # context sizes the sampling benchmark times
    benchmark_images: int = 2             # images generated per timed call
    benchmark_steps: int = 20             # DDIM steps per timed image
    benchmark_repeats: int = 2            # interleaved timed rounds (median reported), after one warm-up
    # Guidance and DDIM steps chosen on the validation split before the test protocol (None: use the two
    # fields above as they are).
    sweep: SamplingSweep | None = None


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
    # AutoencoderConfig preset the profile trains as its `autoencoder` asset (the CPU presets' stand-in for
    # SD's VAE, m2m_pipeline/autoencoder.py); None: the MIS preset names its own (SD's VAE, or pixels).
    autoencoder_preset: str | None = None

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

    def replace(self, **changes: Any) -> RunProfile:
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, RunProfile] = {
    # CI: the whole chain in a few minutes on 2 CPU cores (16 px sets, tiny nets, a few dozen steps).
    "smoke": RunProfile(
        name="smoke", mis_preset="tiny", net_preset="tiny-latent", train_preset="tiny", autoencoder_preset="tiny",
        train_overrides={"steps": 30},
        eval=EvalSpec(num_sets=4, context_images=4, generated_images=2, steps=4, drift_images=3, drift_sets=2,
                      zero_shot_images=1, benchmark_images=1, benchmark_steps=2, benchmark_repeats=1,
                      # an untrained smoke model needs no 99% oracle: a small one keeps CI fast (accuracy reported)
                      oracle_overrides={"train_images": 1500, "heldout_images": 300, "epochs": 2,
                                        "min_accuracy": None}, autoencoder_min_accuracy=None,
                      sweep=SamplingSweep(guidance_scales=(2.0, 3.0), steps=(4,), num_sets=2)),
    ),
    # CPU demo: procedural MIS at 32 px, its own autoencoder (32 px -> 8x8x8 latents), latent demo nets.
    "demo": RunProfile(
        name="demo", mis_preset="demo", net_preset="demo", train_preset="demo", autoencoder_preset="demo",
        eval=EvalSpec(num_sets=64, context_images=4, generated_images=10, steps=25, drift_images=25,
                      drift_sets=12, benchmark_images=2, benchmark_steps=20, sweep=SamplingSweep()),
    ),
    # The paper: SD-2.1-base MIS from CC12M on GPUs; partitions are groups of shards (~122 k shards in all).
    "paper": RunProfile(
        name="paper", mis_preset="paper", net_preset="paper", train_preset="paper",
        caption_source="data/cc12m/*.tsv", shard_groups=256, gpu=True,
        eval=EvalSpec(num_sets=10_000, context_images=4, generated_images=10, steps=50, guidance_scale=7.5,
                      drift_sets=64, benchmark_images=2, benchmark_steps=50),
    ),
}


def caption_files(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))
