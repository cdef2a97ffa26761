"""The evaluation assets' calls into the library (m2m_pipeline.evaluation.report owns every result): the
profile's sizes and device go in, nothing else is computed here; no dagster here.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

from m2m_pipeline.orchestration.resources import ComputeResource, Resolved


def train_oracle_for(r: Resolved, out: Path, compute: ComputeResource) -> tuple[Any, dict[str, Any]]:
    """The profile's attribute oracle (shapes world), trained once into `out` and reused."""
    from m2m_pipeline.evaluation.oracle import load_or_train_oracle

    oracle = load_or_train_oracle(out, r.mis.resolution, progress=False, **dict(r.eval.oracle_overrides))
    return oracle, {"heldout_accuracy": oracle.heldout_accuracy, "image_size": oracle.config.image_size,
                    "train_images": oracle.config.train_images, "epochs": oracle.config.epochs}


def evaluate_variant(r: Resolved, variant: str, checkpoint: Path, test_dir: Path, oracle_dir: Path | None,
                     out: Path, compute: ComputeResource, seed: int = 0, validation_dir: Path | None = None
                     ) -> dict[str, Any]:
    """`evaluate_checkpoint` with the profile's EvalSpec, DINO folder, device and, for the paper's scorers
    (EvalSpec.scorers "paper"), the Inception and CLIP files the settings resolved (`oracle_dir` None)."""
    from m2m_pipeline.evaluation.report import evaluate_checkpoint

    if not (checkpoint / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}; materialize the training asset first")
    ev = dataclasses.replace(r.eval, precision=compute.dtype)  # sampling autocast follows the run's compute.dtype
    return evaluate_checkpoint(checkpoint, test_dir, oracle_dir, out, ev, variant=variant,
                               validation_dir=validation_dir, dino=r.mis.dino_path,
                               device=compute.resolved_device(), seed=seed, inception_weights=r.inception_weights,
                               clip_model=r.clip_model, clip_pretrained=r.clip_pretrained)


def benchmark(r: Resolved, checkpoints: dict[str, Path], out: Path, compute: ComputeResource
              ) -> tuple[list[dict[str, Any]], Path]:
    """`sampling_benchmark` (Fig. 9) with the profile's sizes and device."""
    from m2m_pipeline.evaluation.report import sampling_benchmark

    return sampling_benchmark(checkpoints, r.net_preset, r.eval, out, compute.resolved_device(), r.profile.name)
