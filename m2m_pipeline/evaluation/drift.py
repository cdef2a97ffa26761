"""Drift over long autoregressive runs (the paper's stated limitation, Sec. 9; docs/evaluation.md "Drift"), per context policy.

A context policy says which earlier images image n attends to (`sampling.window_indices`): the paper protocol's
sliding window of the 4 most recent images, attention-sink style anchors (the real preceding images always
kept, as Rolling Forcing / LongLive keep their first frames), or every preceding image. The study generates
`num_images` images after the real preceding ones for each test set and each policy, with the same seeds,
and measures per position n: oracle consistency with the set (colour, background, shape), oracle-feature FID
of the n-th images against the sets' real held-out images, and seconds per image (policies change the
attention length). The real-image ceiling is the oracle on the sets' own held-out images (decoded through the
same autoencoder); chance is one over the number of values.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2m_pipeline.io import atomic_write_bytes
from m2m_pipeline.sampling import CONTEXT_POLICIES, PAPER_POLICY, ContextPolicy  # noqa: F401 - re-exported

ATTRIBUTES = ("colour", "background", "shape")  # what the drift table and plots show (background: pattern + colour)




@dataclass(frozen=True)
class DriftSpec:
    num_images: int = 25         # images generated after the real preceding ones (positions n = 1..num_images)
    context_images: int = 4      # real preceding images
    steps: int = 25              # DDIM steps
    guidance_scale: float = 3.0  # s of Eq. 6
    seed: int = 0                # set b uses seed + b (the same for every policy)
    context_noise: int = 0       # M2M-Self trained with context noise: the fixed t_c of every context image

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def policies_named(names: Sequence[str]) -> list[ContextPolicy]:
    unknown = [n for n in names if n not in CONTEXT_POLICIES]
    if unknown:
        raise ValueError(f"unknown context policies {unknown}; choose from {sorted(CONTEXT_POLICIES)}")
    return [CONTEXT_POLICIES[n] for n in names]


def _per_position_fid(features: np.ndarray, real: np.ndarray) -> list[float]:
    """features (B, K, D) of the generated images, real (M, D) -> FID of position k's B images vs the real ones."""
    from m2m_pipeline.evaluation.fid import fid_from_features

    return [fid_from_features(features[:, k], real) for k in range(features.shape[1])]


def drift_study(net: Any, autoencoder: Any, context_encoder: Callable | None, latents: torch.Tensor,
                targets: dict[str, torch.Tensor], oracle: Any, fid_network: Any, policies: Sequence[ContextPolicy],
                spec: DriftSpec, progress: bool = False) -> dict[str, Any]:
    """latents (B, K, C, h, w): every image of B test sets (the first `spec.context_images` are the context,
    the rest the real held-out images); targets: the sets' attributes (oracle.attribute_targets)."""
    from m2m_pipeline.evaluation.fid import extract_features
    from m2m_pipeline.evaluation.studies import chance_consistency, oracle_consistency
    from m2m_pipeline.sampling import generate

    b, k = latents.shape[:2]
    n_ctx = spec.context_images
    if b < 2 or k <= n_ctx:
        raise ValueError(f"the drift study needs >= 2 test sets with more than {n_ctx} images; got {b} x {k}")
    decode = lambda z: autoencoder.decode(z.flatten(0, 1).to(net.device)).unflatten(0, z.shape[:2]).cpu()  # noqa: E731
    real = decode(latents[:, n_ctx:])  # (B, K - n_ctx, 3, H, W): the ceiling's and FID's references
    real_feats = extract_features(real.flatten(0, 1), fid_network)
    ceiling = {name: float(v.mean()) for name, v in oracle_consistency(oracle, real, targets).items()}
    out: dict[str, Any] = {"spec": spec.to_dict(), "sets": b, "ceiling": ceiling, "chance": chance_consistency(),
                           "policies": {}}
    context = latents[:, :n_ctx].to(net.device)
    for policy in policies:
        start = time.perf_counter()
        z = generate(net, context, spec.num_images, context_encoder=context_encoder, steps=spec.steps,
                     guidance_scale=spec.guidance_scale, window=policy.window, anchors=policy.anchors,
                     seed=[spec.seed + i for i in range(b)], progress=progress, context_noise=spec.context_noise)
        seconds = time.perf_counter() - start
        images = decode(z)  # (B, num_images, 3, H, W)
        feats = extract_features(images.flatten(0, 1), fid_network).reshape(b, spec.num_images, -1)
        consistency = oracle_consistency(oracle, images, targets)
        out["policies"][policy.name] = {
            **policy.to_dict(), "seconds_per_image": seconds / (b * spec.num_images),
            "consistency": {name: v.tolist() for name, v in consistency.items()},
            "fid": _per_position_fid(feats, real_feats)}
    return out


def _at(values: list[float], n: int) -> float | None:
    return values[n - 1] if n <= len(values) else None


# What a policy (or a context-noise level) is chosen by, on the validation split: the mean over positions
# n = 1..K of the colour and background consistency (the targets; shape is barely learned at n = 1).
SELECTION_ATTRIBUTES = ("colour", "background")


def selection_score(policy_result: dict[str, Any]) -> float:
    """Mean colour + background consistency over every position of one policy's drift result."""
    values = [v for a in SELECTION_ATTRIBUTES for v in policy_result["consistency"][a]]
    return float(np.mean(values))


def drift_table(result: dict[str, Any], positions: Sequence[int] = (1, 10, 25)) -> str:
    """Markdown: per policy, consistency at n = positions, FID at n = 1 and 10, seconds per image, and the
    selection score (mean colour + background over n = 1..K, what a policy is chosen by on validation)."""
    fmt = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    head = " | ".join(f"{a} n={n}" for a in ATTRIBUTES for n in positions)
    lines = [f"| policy | {head} | FID n=1 | FID n=10 | s / image | mean c+b |",
             "|---|" + "---|" * (len(ATTRIBUTES) * len(positions) + 4)]
    for name, p in result["policies"].items():
        cells = " | ".join(fmt(_at(p["consistency"][a], n)) for a in ATTRIBUTES for n in positions)
        lines.append(f"| {name} | {cells} | {fmt(_at(p['fid'], 1), 1)} | {fmt(_at(p['fid'], 10), 1)} | "
                     f"{p['seconds_per_image']:.3f} | {selection_score(p):.3f} |")
    ceiling = " | ".join(fmt(result["ceiling"][a]) for a in ATTRIBUTES for _ in positions)
    chance = " | ".join(fmt(result["chance"][a], 3) for a in ATTRIBUTES for _ in positions)
    lines += [f"| real images (ceiling) | {ceiling} | | | | |", f"| chance | {chance} | | | | |"]
    return "\n".join(lines)


def drift_plots(result: dict[str, Any], out: str | Path, title: str) -> list[Path]:
    """One plot per attribute: consistency by position, a line per policy, ceiling and chance dashed."""
    from m2m_pipeline.evaluation.figures import line_plot

    out = Path(out)
    files = []
    for attribute in ATTRIBUTES:
        series = {name: (range(1, len(p["consistency"][attribute]) + 1), p["consistency"][attribute])
                  for name, p in result["policies"].items()}
        files.append(line_plot(series, out / f"drift_{attribute}.png", title=f"{title}: {attribute}",
                               xlabel="generated image n", ylabel="consistency with the set", ylim=(0, 1.02),
                               hlines={"real images": result["ceiling"][attribute],
                                       "chance": result["chance"][attribute]}))
    series = {name: (range(1, len(p["fid"]) + 1), p["fid"]) for name, p in result["policies"].items()}
    files.append(line_plot(series, out / "drift_fid.png", title=f"{title}: FID by position",
                           xlabel="generated image n", ylabel="oracle-feature FID"))
    return files


def write_drift(result: dict[str, Any], out: str | Path, title: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "drift.json", json.dumps(result, indent=1).encode("utf-8"))
    atomic_write_bytes(out / "drift.md", (drift_table(result) + "\n").encode("utf-8"))
    plots = drift_plots(result, out, title)
    return {"json": out / "drift.json", "table": out / "drift.md", **{p.stem: p for p in plots}}


def drift_metrics(result: dict[str, Any]) -> dict[int, dict[str, float]]:
    """MLflow metrics by step = n: drift/<policy>/<attribute> and drift/<policy>/fid."""
    by_step: dict[int, dict[str, float]] = {}
    for name, p in result["policies"].items():
        for attribute in ATTRIBUTES:
            for n, v in enumerate(p["consistency"][attribute], start=1):
                by_step.setdefault(n, {})[f"drift/{name}/{attribute}"] = float(v)
        for n, v in enumerate(p["fid"], start=1):
            by_step.setdefault(n, {})[f"drift/{name}/fid"] = float(v)
    return by_step


def run_drift(checkpoint: str | Path, test_shards: Any, oracle_dir: str | Path, out: str | Path,
              policies: Sequence[str], spec: DriftSpec, num_sets: int, device: str = "cpu",
              progress: bool = False) -> dict[str, Any]:
    """`m2m drift`: load the checkpoint with its encoders and the oracle, run the study, write json/md/plots."""
    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.data.loader import expand_shards
    from m2m_pipeline.evaluation.fid import oracle_feature_network
    from m2m_pipeline.evaluation.oracle import AttributeOracle, attribute_targets
    from m2m_pipeline.evaluation.protocol import load_test_sets

    chosen = policies_named(policies)
    bundle = load_bundle(checkpoint, device=device)
    shards = expand_shards(test_shards)
    bundle.check_cache(shards)
    from m2m_pipeline.data.shards import read_manifest

    per_set = (read_manifest(shards[0]) or {}).get("images_per_set") or spec.context_images + 1
    test = load_test_sets(shards, num_sets, per_set)  # every image: context + real held-out references
    if test.attributes is None:
        raise ValueError(f"{shards[0]}: the drift study's oracle needs the shapes world's attributes in the shards")
    oracle = AttributeOracle.load(oracle_dir)
    with torch.no_grad():
        result = drift_study(bundle.net, bundle.autoencoder, bundle.context_encoder, test.latents,
                             attribute_targets(test.attributes), oracle, oracle_feature_network(oracle), chosen,
                             spec, progress=progress)
    result.update(checkpoint=str(checkpoint), variant=bundle.net.config.variant, keys=test.keys,
                  test_sets=test.draw)  # drawn at random with a recorded seed (protocol.load_test_sets)
    result["files"] = {k: str(v) for k, v in write_drift(result, out, f"M2M-{bundle.net.config.variant}").items()}
    return result
