"""Zero-shot continuation of real MSCOCO images (Sec. 8.3, Figs. 5, 16 and 17), as a figure and a number.

Per set (4 real images sharing one object category, m2m_pipeline/data/coco.py): the real images are encoded with
the checkpoint's autoencoder at the network's image size, the model generates `generated_images` after them
(studies.continue_sets, the sampler of every study), they are decoded, and the figure is the paper's layout
(rows = sets, real | generated). The paper shows the figure only; here the consistency is also measured with
CLIP (clip_score.ClipScorer, 100 x cosine): generated image n against the set's real images, mean over sets, per
position n and per category, next to two references measured the same way on the real images alone -
**real vs real** (each real image against the other real images of its set: what sharing a category scores)
and **other category** (each real image against the real images of a set of another category: what two unrelated
COCO images score). docs/evaluation.md, "MSCOCO zero-shot continuation".

`coco_zero_shot` is the one entry point: `m2m coco-zero-shot` and the paper profile's `coco_zero_shot` asset
call it (no dagster here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m2m_pipeline.data.coco import CocoSets, CocoSetsConfig
from m2m_pipeline.evaluation.studies import SamplingSpec, continue_sets
from m2m_pipeline.io import atomic_write_bytes

GRID_ROWS = 16      # sets shown in the figure (all sets are scored)
PREVIEW_CELL = 128  # px per image of the preview grid (Dagster metadata inlines it; 512 px cells are ~MBs)


@dataclass(frozen=True)
class CocoZeroShotSpec:
    """Sizes and sampling of one zero-shot study (recorded in its report)."""

    sets: CocoSetsConfig = field(default_factory=CocoSetsConfig)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    generated_images: int = 4               # Figs. 5, 16, 17: 4 generated after 4 real
    batch_size: int = 8                     # sets sampled together (memory only: set b always uses seed + b)

    def __post_init__(self) -> None:
        if self.generated_images < 1 or self.batch_size < 1:
            raise ValueError(f"CocoZeroShotSpec: generated_images and batch_size must be >= 1, got "
                             f"{self.generated_images}, {self.batch_size}")

    @classmethod
    def from_eval(cls, ev: Any, seed: int = 0, max_sets: int | None = None, **sets: Any) -> CocoZeroShotSpec:
        """A profile's EvalSpec: views = context_images, generated = zero_shot_images, its DDIM steps, guidance
        and context policy, at most `coco_sets` sets (one per category); `seed` draws the sets and samples."""
        return cls(sets=CocoSetsConfig(views=ev.context_images, seed=seed,
                                       max_sets=ev.coco_sets if max_sets is None else max_sets, **sets),
                   sampling=SamplingSpec(steps=ev.steps, guidance_scale=ev.guidance_scale, window=ev.window,
                                         anchors=ev.anchors, seed=seed, precision=ev.precision),
                   generated_images=ev.zero_shot_images)


def _other_category(sets: CocoSets) -> list[int] | None:
    """For each set, the next set (cyclically) of another category; None when there is one category only."""
    cats = [s.category_id for s in sets.sets]
    if len(set(cats)) < 2:
        return None
    n = len(cats)
    return [next(j % n for j in range(i + 1, i + n) if cats[j % n] != cats[i]) for i in range(n)]


def clip_consistency(scorer: Any, real: torch.Tensor, generated: torch.Tensor, sets: CocoSets) -> dict[str, Any]:
    """CLIP image-image consistency: real (S, V, 3, H, W), generated (S, K, 3, H, W), in [-1, 1].

    by_position[n-1] = mean over sets of the mean over the V real images of score(generated n, real v);
    real_vs_real = mean over sets and v of score(real v, the set's other real images);
    other_category = the same against the real images of a set of another category (None with one category).
    """
    s, v = real.shape[:2]
    real_e, gen_e = scorer.image_embeddings(real), scorer.image_embeddings(generated)  # (S, V, E), (S, K, E)
    score = scorer.image_image_from_embeddings  # the protocol's CLIP-I definition (clamping included)
    per_set = score(gen_e, real_e)  # (S, K)
    real_real = None if v < 2 else torch.stack(
        [score(real_e[:, i], real_e[:, [j for j in range(v) if j != i]]) for i in range(v)], dim=1).mean(1)  # (S,)
    other = _other_category(sets)
    other_real = None if other is None else score(real_e, real_e[other]).mean(1)  # (S,)
    per_category: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(x.category for x in sets.sets):  # first-seen order
        rows = [i for i, x in enumerate(sets.sets) if x.category == name]
        per_category[name] = {
            "sets": len(rows), "by_position": per_set[rows].mean(0).tolist(),
            "real_vs_real": None if real_real is None else float(real_real[rows].mean())}
    return {"by_position": per_set.mean(0).tolist(), "mean": float(per_set.mean()),
            "std_over_sets": per_set.std(0, unbiased=False).tolist(),
            "real_vs_real": None if real_real is None else float(real_real.mean()),
            "other_category": None if other_real is None else float(other_real.mean()),
            "per_set": per_set.tolist(), "per_category": per_category, "sets": s}


def consistency_table(variant: str, clip: dict[str, Any]) -> str:
    """Markdown: position n -> score, the two references; then one row per category."""
    k = len(clip["by_position"])
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    lines = [f"| M2M-{variant} ({clip['sets']} sets) | " + " | ".join(f"n={n}" for n in range(1, k + 1))
             + " | mean | real vs real | other category |", "|---|" + "---|" * (k + 3),
             "| generated vs real | " + " | ".join(fmt(x) for x in clip["by_position"])
             + f" | {fmt(clip['mean'])} | {fmt(clip['real_vs_real'])} | {fmt(clip['other_category'])} |"]
    for name, row in clip["per_category"].items():
        mean = sum(row["by_position"]) / k
        lines.append(f"| {name} ({row['sets']}) | " + " | ".join(fmt(x) for x in row["by_position"])
                     + f" | {fmt(mean)} | {fmt(row['real_vs_real'])} | |")
    return "\n".join(lines) + "\n"


def _preview(real: torch.Tensor, generated: torch.Tensor, path: Path) -> Path:
    from m2m_pipeline.visualize import save_set_grid

    small = lambda x: F.interpolate(x.flatten(0, 1), size=(PREVIEW_CELL, PREVIEW_CELL), mode="bilinear",
                                    antialias=True, align_corners=False).unflatten(0, x.shape[:2])
    return save_set_grid(small(real), small(generated), path)


@torch.no_grad()
def coco_zero_shot(checkpoint: str | os.PathLike, sets: CocoSets, out: str | os.PathLike, scorer: Any | None,
                   spec: CocoZeroShotSpec = CocoZeroShotSpec(), *, vae: str | os.PathLike | None = None,
                   dino: str | os.PathLike | None = None, device: str = "cpu", grid_rows: int = GRID_ROWS,
                   progress: bool = False) -> dict[str, Any]:
    """Continue every COCO set with the checkpoint; write grid.png (+ grid_preview.png at large sizes),
    consistency.md and report.json (atomic) to `out`; return the record with the paths.

    scorer: a ClipScorer, or None for the figure alone (the report then says CLIP was not measured).
    """
    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.data.coco import load_set_images
    from m2m_pipeline.visualize import save_set_grid

    if sets.config.views != len(sets.sets[0].image_ids):
        raise ValueError(f"sets hold {len(sets.sets[0].image_ids)} images, their config says {sets.config.views}")
    checkpoint, out = Path(checkpoint), Path(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bundle = load_bundle(checkpoint, vae=vae, dino=dino, device=device)
    net, autoencoder = bundle.net, bundle.autoencoder
    size = net.config.image_size
    real = load_set_images(sets, size)  # (S, V, 3, H, W); bad or oversized files fail here, before sampling
    timings["load"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    latents = torch.stack([autoencoder.encode(r.to(net.device)) for r in real])  # (S, V, C, h, w)
    chunks = []
    for b in range(0, len(latents), spec.batch_size):  # set b samples with seed + b, whatever the batching
        chunk = dataclasses.replace(spec.sampling, seed=spec.sampling.seed + b)
        z = continue_sets(net, latents[b:b + spec.batch_size], spec.generated_images, chunk,
                          context_encoder=bundle.context_encoder, progress=progress)
        chunks.append(autoencoder.decode(z.flatten(0, 1).to(net.device)).unflatten(0, z.shape[:2]).cpu())
    generated = torch.cat(chunks).float().clamp(-1, 1)
    timings["generate"] = round(time.perf_counter() - start, 2)

    out.mkdir(parents=True, exist_ok=True)
    rows = min(grid_rows, len(real))
    files = {"grid": save_set_grid(real[:rows], generated[:rows], out / "grid.png", scale=max(1, 64 // size))}
    files["preview"] = _preview(real[:rows], generated[:rows], out / "grid_preview.png") if size > PREVIEW_CELL \
        else files["grid"]

    variant = net.config.variant
    clip = None
    if scorer is not None:
        start = time.perf_counter()
        clip = clip_consistency(scorer, real, generated, sets)
        timings["clip"] = round(time.perf_counter() - start, 2)
        table = consistency_table(variant, clip)
        atomic_write_bytes(out / "consistency.md", table.encode())
        files["table"] = out / "consistency.md"
    else:
        table = "CLIP not measured (no CLIP model given)\n"
    record = {
        "variant": variant, "checkpoint": str(checkpoint), "image_size": size, "device": str(net.device),
        "encoders": bundle.spec.describe(), "clip_image_image": clip,
        "clip": None if scorer is None else scorer.info,
        "score": "100 x cosine of CLIP image embeddings; generated image n vs each real image of its set, mean over "
                 "the set's real images, then over sets",
        "generated_images": spec.generated_images, "sampling": spec.sampling.to_dict(),
        "seeds": f"{spec.sampling.seed}..{spec.sampling.seed + len(real) - 1} (set b samples with seed + b)",
        "coco": sets.provenance(), "grid_rows": rows, "seconds": timings,
        "files": {k: str(v) for k, v in files.items()},
    }
    atomic_write_bytes(out / "report.json", (json.dumps(record, indent=1, default=str) + "\n").encode())
    return {**record, "table": table, "files": files, "report_path": out / "report.json",
            "real": real, "generated": generated}
