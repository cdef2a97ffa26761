"""The CPU demo's learnability measurement: does the first image generated after a set's preceding images
keep the set's colour, background and shape (the oracle judges), and how do guidance and step count
change that? Sampling settings are chosen here on the *validation* split, then applied once to the test
split (the README's learnability table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from m2m_pipeline.evaluation.protocol import ProtocolConfig, TestSets, generate_for_protocol
from m2m_pipeline.evaluation.studies import LEARNABILITY_TARGETS, oracle_consistency


@dataclass(frozen=True)
class SamplingSweep:
    """The grid tried on validation sets; the point with the best learnability score wins."""

    guidance_scales: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 6.0)
    steps: tuple[int, ...] = (25, 50)
    num_sets: int = 64                   # validation sets per grid point (position 1 only)

    def __post_init__(self) -> None:
        if not self.guidance_scales or not self.steps or self.num_sets < 1:
            raise ValueError("SamplingSweep needs at least one guidance scale, one step count and one set")


def learnability_score(consistency: dict[str, float]) -> float:
    """What the sweep maximises: the mean consistency over the learnability attributes (colour, background,
    shape), each at position 1."""
    return sum(consistency[name] for name in LEARNABILITY_TARGETS) / len(LEARNABILITY_TARGETS)


def position1_consistency(net, autoencoder, sets: TestSets, oracle, *, context_images: int, steps: int,
                          guidance_scale: float, window: int | None, seed: int = 0, unconditional: bool = False,
                          context_encoder: Callable | None = None, sampler: str = "ddim") -> dict[str, float]:
    """Oracle consistency of the first image generated after each set's first `context_images` images."""
    from m2m_pipeline.evaluation.oracle import attribute_targets  # shapes world only: paper runs never load it

    cfg = ProtocolConfig(context_images=context_images, generated_images=1, window=window, steps=steps,
                         guidance_scale=guidance_scale, seed=seed, unconditional=unconditional, sampler=sampler)
    context = dataclasses.replace(sets, latents=sets.latents[:, :context_images])
    _, generated = generate_for_protocol(net, autoencoder, context, cfg, context_encoder, progress=False)
    targets = attribute_targets(sets.attributes) if sets.attributes else attribute_targets(captions=sets.captions)
    return {k: float(v[0]) for k, v in oracle_consistency(oracle, generated, targets).items()}


@torch.no_grad()
def choose_sampling(net, autoencoder, validation: TestSets, oracle, sweep: SamplingSweep, *, context_images: int,
                    window: int | None, seed: int = 0, context_encoder: Callable | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best grid point, every grid point) by `learnability_score` on validation sets; ties go to fewer steps,
    then to lower guidance (cheaper, and closer to the plain conditional model)."""
    rows = []
    sets = _first(validation, sweep.num_sets)
    for steps in sweep.steps:
        for s in sweep.guidance_scales:
            c = position1_consistency(net, autoencoder, sets, oracle, context_images=context_images, steps=steps,
                                      guidance_scale=s, window=window, seed=seed, context_encoder=context_encoder)
            rows.append({"steps": steps, "guidance_scale": s, "score": learnability_score(c), **c})
    best = max(rows, key=lambda r: (round(r["score"], 6), -r["steps"], -r["guidance_scale"]))
    return best, rows


def sweep_table(rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    """Markdown: one row per grid point, the chosen one in bold."""
    lines = ["| steps | guidance | colour | background | shape | score |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "**" if r is best or (r["steps"], r["guidance_scale"]) == (best["steps"], best["guidance_scale"]) else ""
        lines.append(f"| {mark}{r['steps']}{mark} | {mark}{r['guidance_scale']:g}{mark} | {r['colour']:.3f} | "
                     f"{r['background']:.3f} | {r['shape']:.3f} | {mark}{r['score']:.3f}{mark} |")
    return "\n".join(lines) + "\n"


def _first(sets: TestSets, n: int) -> TestSets:
    n = min(n, len(sets.keys))
    return TestSets(sets.latents[:n], sets.captions[:n], sets.keys[:n],
                    None if sets.attributes is None else sets.attributes[:n], sets.shards)
