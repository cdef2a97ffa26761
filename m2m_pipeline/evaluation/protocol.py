"""The evaluation protocol of Sec. 8.4 (docs/evaluation.md "Protocol") on a checkpoint and a test split.

The test sets are drawn at random with a recorded seed (`load_test_sets`). Per test set: the first
`context_images` images (index order) are the preceding images; `generated_images` images are generated
autoregressively after them with `sampling.generate`. Per position n = 1..K:
- FID: n-th generated image of every set vs the *first* preceding image of every set;
- IS of the n-th generated images;
- CLIP text-image vs the set's caption, image-image vs the set's preceding images (mean over them);
- oracle (shapes world): attribute / content / style consistency with the set's true attributes and
  caption agreement.
Each metric is reported per position and as mean +- std (population std) over the K positions, with a
provenance record saying exactly how it was measured.
`run_paper_protocol` is Table 1's path at the paper's scale (Inception FID / IS and CLIP only, streamed batch
by batch: docs/evaluation.md "The paper report").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from m2m_pipeline.evaluation.consistency import (
    attribute_consistency,
    caption_agreement,
    chance_levels,
)
from m2m_pipeline.evaluation.fid import (
    FeatureNetwork,
    extract_features,
    extract_features_and_logits,
    fid_from_features,
    inception_score,
    inception_score_from_logits,
)
from m2m_pipeline.io import atomic_write_text, sha256_file
from m2m_pipeline.sampling import (
    CONTEXT_POLICIES,
    DEFAULT_POLICY,
    PAPER_POLICY,
    context_policy,
)


@dataclass(frozen=True)
class ProtocolConfig:
    context_images: int = 4           # preceding images per set (Sec. 8.4: 4)
    generated_images: int = 10        # generated autoregressively after them (Sec. 8.4: 10)
    # Context window W and anchors: sampling.DEFAULT_POLICY, anchors-4 (the 4 preceding real images kept + the
    # 4 most recent; docs/evaluation.md "Drift", chosen on validation). The paper's W = 4 without anchors: ProtocolConfig.paper().
    window: int | None = CONTEXT_POLICIES[DEFAULT_POLICY].window
    anchors: int = CONTEXT_POLICIES[DEFAULT_POLICY].anchors
    steps: int = 50                   # denoising steps (Appendix A: DDIM, 50)
    sampler: str = "ddim"             # m2m_pipeline.sampling.SCHEDULERS name (the paper: DDIM)
    guidance_scale: float = 7.5       # s of Eq. 6 (Appendix A: 7.5)
    num_sets: int | None = None       # test sets evaluated (None: all; the paper: 10,000)
    seed: int = 0                     # set i samples with seed + i: same images whatever the batching
    batch_size: int = 16              # sets sampled together (memory only; results do not depend on it)
    unconditional: bool = False       # drop the image condition (window 0): consistency should sit at chance
    is_splits: int = 1                # Inception Score splits per position
    precision: str = "float32"        # autocast of the network calls while sampling (compute.dtype; scores in fp32)

    @classmethod
    def paper(cls, **overrides: Any) -> ProtocolConfig:
        """Sec. 8.4 as the paper ran it: a sliding window of the 4 most recent images, no anchors."""
        return cls.with_policy(PAPER_POLICY, **overrides)

    @classmethod
    def with_policy(cls, name: str, **overrides: Any) -> ProtocolConfig:
        policy = context_policy(name)
        return cls(**{"window": policy.window, "anchors": policy.anchors, **overrides})

    def __post_init__(self):
        if self.context_images < 1 or self.generated_images < 1:
            raise ValueError("context_images and generated_images must be >= 1 (FID needs a first preceding image)")
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be >= 0 or None, got {self.window}")


def _anchors_text(provenance: dict[str, Any]) -> str:
    k = provenance.get("anchors", 0)  # reports written before anchors were recorded had none
    return f" with the first {k} anchored" if k else " (no anchors: the paper protocol)" if provenance["window"] == 4 else ""


@dataclass
class TestSets:
    latents: torch.Tensor                      # (B, n_c, C, H, W) first n_c latents of every set
    captions: list[str]
    keys: list[str]
    attributes: list[dict[str, Any]] | None    # ground truth when the shards carry it (shapes world)
    shards: list[str]
    # How the sets were drawn (load_test_sets): seed, number of candidate sets, sha256 of the chosen keys.
    draw: dict[str, Any] = field(default_factory=dict)


def keys_digest(keys: Sequence[str]) -> str:
    """sha256 of the set keys, one per line in order: what a report records to name its test sets."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def load_test_sets(shards: str | os.PathLike | Sequence[str | os.PathLike], num_sets: int | None,
                   context_images: int, seed: int = 0) -> TestSets:
    """The first `context_images` latents (index order) of `num_sets` sets drawn uniformly at random, without
    replacement, from all sets of the test shards with `seed` (Sec. 8.4: "a random selection of 10K samples
    from the test split"); None or more than there are: every set.

    The draw depends only on the shards' manifests (their keys, in shard order) and the seed, so two models
    evaluated on the same shards with the same seed see the same sets. Candidates are counted from the
    manifests without reading a shard; then only the shards holding a chosen set are read, each to its end,
    so its bytes are checked against its manifest before any of its sets is evaluated. The sets come back in
    shard order (set i samples with seed + i in the protocol)."""
    from m2m_pipeline.data.errors import ShardError
    from m2m_pipeline.data.loader import expand_shards
    from m2m_pipeline.data.shards import (
        decode_json,
        decode_npy,
        decode_text,
        manifest_path,
        read_manifest,
        read_samples,
    )

    urls = expand_shards(shards)
    listed: list[list[str]] = []
    for url in urls:
        manifest = read_manifest(url)
        if manifest is None:
            raise ShardError(url, None, f"no manifest {manifest_path(url)}; test sets are drawn from the manifests' "
                                        f"keys and every shard read is verified against its manifest")
        listed.append(manifest["keys"])
    total = sum(len(k) for k in listed)
    if total == 0:
        raise ValueError(f"no sets in test shards {urls}")
    n = total if num_sets is None else min(num_sets, total)
    if n < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    chosen = np.arange(total) if n == total else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    offsets = np.cumsum([0, *(len(k) for k in listed)])
    wanted: dict[int, set[str]] = {}
    for i in chosen.tolist():
        s = int(np.searchsorted(offsets, i, side="right")) - 1
        wanted.setdefault(s, set()).add(listed[s][i - offsets[s]])
    latents, captions, keys, attributes = [], [], [], []
    for s, names in sorted(wanted.items()):
        url = urls[s]
        for raw in read_samples([url]):  # raises at the shard's end if its bytes or keys differ
            key = raw["__key__"]
            if key not in names:
                continue  # read on: the shard is verified only at its end
            z = decode_npy(raw, "latents.npy", url, key)
            if z.ndim != 4 or len(z) < context_images:
                raise ValueError(f"{url}: set {key} has latents {z.shape}; need (K >= {context_images}, C, H, W)")
            latents.append(torch.from_numpy(z[:context_images].astype(np.float32)))
            keys.append(key)
            captions.append(decode_text(raw, "caption.txt", url, key) if "caption.txt" in raw else "")
            attributes.append(decode_json(raw, "attributes.json", url, key) if "attributes.json" in raw else None)
    known = None if any(a is None for a in attributes) else attributes
    draw = {"seed": seed, "candidates": total, "drawn": len(keys), "shards": len(urls), "shards_read": len(wanted),
            "method": "uniform without replacement over every set of the shards (numpy default_rng(seed).choice)",
            "keys_sha256": keys_digest(keys)}
    return TestSets(torch.stack(latents), captions, keys, known, urls, draw)


@dataclass
class Scorers:
    """Which metrics run; None skips one (the report says which ran)."""
    fid_network: FeatureNetwork | None = None   # FID + IS feature network (oracle offline, Inception at scale)
    clip: Any | None = None                     # ClipScorer
    oracle: Any | None = None                   # AttributeOracle (shapes world)
    oracle_dir: str | None = None


@dataclass
class EvaluationReport:
    per_position: dict[str, list[float]]            # metric -> K values, position n = 1..K
    summary: dict[str, dict[str, float]]            # metric -> {"mean", "std"} over positions
    reference: dict[str, Any]                       # real-image floors / ceilings and chance levels
    provenance: dict[str, Any]                      # exactly how it was measured
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvaluationReport:
        return cls(**json.loads(Path(path).read_text()))

    def to_json(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, [json.dumps(self.to_dict(), indent=1, default=str) + "\n"])
        return Path(path)

    def table(self) -> str:
        """Plain-text table: one row per metric, mean +- std, then the per-position values."""
        k = len(next(iter(self.per_position.values()), []))
        width = max([len("metric"), *map(len, self.per_position)]) + 2
        head = f"{'metric':<{width}}{'mean +- std':>20}  " + " ".join(f"{f'n={n}':>7}" for n in range(1, k + 1))
        lines = [head, "-" * len(head)]
        for name, values in self.per_position.items():
            s = self.summary[name]
            lines.append(f"{name:<{width}}{s['mean']:>11.3f} +- {s['std']:<6.3f}  " + " ".join(f"{v:>7.3f}" for v in values))
        p = self.provenance
        lines.append("")
        lines.append(f"sets {p['num_sets']}, {p['context_images']} preceding + {p['generated_images']} generated, "
                     f"W={p['window']}{_anchors_text(p)}, {p['sampler']} {p['steps']} steps, guidance {p['guidance_scale']}, "
                     f"{'UNCONDITIONAL, ' if p['unconditional'] else ''}seeds {p['seeds']}")
        if "fid" in p:
            lines.append(f"FID/IS: {p['fid']['network']} ({p['fid'].get('resize', '')})")
        if "clip" in p:
            lines.append(f"CLIP: {p['clip']['model']} pretrained={p['clip']['pretrained']}, {p['clip']['scale']}")
        ref = {k: v for k, v in self.reference.items() if not isinstance(v, dict)}
        if ref:
            lines.append("reference (real images): " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()))
        if "chance" in self.reference:
            lines.append("chance: " + ", ".join(f"{k} {v:.3f}" for k, v in self.reference["chance"].items()))
        return "\n".join(lines)


def _decode(autoencoder, z: torch.Tensor) -> torch.Tensor:
    b, k = z.shape[:2]
    return autoencoder.decode(z.flatten(0, 1)).unflatten(0, (b, k)).float().cpu()  # (B, K, 3, H, W)



def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "clean-fid", "open_clip_torch", "torchmetrics", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _generated_batches(net, autoencoder, test_sets: TestSets, config: ProtocolConfig, context_encoder=None,
                       progress: bool = True, desc: str = "evaluate: generating"):
    """(start, context latents (b, n_c, C, h, w), generated pixels (b, K, 3, H, W)) per batch of sets; set i
    samples with seed + i, so the images do not depend on the batching."""
    from m2m_pipeline.sampling import generate

    b = len(test_sets.keys)
    window = 0 if config.unconditional else config.window
    for start in tqdm(range(0, b, config.batch_size), desc=desc, disable=not progress):
        context = test_sets.latents[start : start + config.batch_size].to(net.device)
        seeds = [config.seed + i for i in range(start, start + len(context))]
        z = generate(net, context, config.generated_images, context_encoder=context_encoder, steps=config.steps,
                     guidance_scale=config.guidance_scale, window=window, anchors=config.anchors, seed=seeds,
                     sampler=config.sampler, progress=False, precision=config.precision)  # (b, K, C, H, W)
        yield start, context, _decode(autoencoder, z)


@torch.no_grad()
def generate_for_protocol(net, autoencoder, test_sets: TestSets, config: ProtocolConfig, context_encoder=None,
                          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(preceding pixels (B, n_c, 3, H, W), generated pixels (B, K, 3, H, W)), both in [-1, 1]."""
    generated = [g for _, _, g in _generated_batches(net, autoencoder, test_sets, config, context_encoder, progress)]
    return _decode(autoencoder, test_sets.latents.to(net.device)), torch.cat(generated)


# Table 1's columns and the per-position metric each one summarises (mean +- std over the positions).
TABLE1_COLUMNS: dict[str, str] = {"FID": "fid", "IS": "inception_score", "CLIP-T": "clip_text_image",
                                  "CLIP-I": "clip_image_image"}


def table1_row(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The Table 1 row of one model: exactly FID, IS, CLIP-T, CLIP-I as {mean, std} over positions."""
    return {column: dict(summary[metric]) for column, metric in TABLE1_COLUMNS.items()}


@torch.no_grad()
def run_paper_protocol(net, autoencoder, test_sets: TestSets, config: ProtocolConfig, fid_network: FeatureNetwork,
                       clip: Any, context_encoder=None, keep: int = 8, progress: bool = True
                       ) -> tuple[dict[str, list[float]], dict[str, Any], torch.Tensor, torch.Tensor]:
    """Table 1's metrics per position, computed batch by batch while generating: only Inception features and
    logits and CLIP embeddings are kept (10,000 sets x 14 images of 512 px would not fit in memory), so
    the numbers equal `score_sets` on the whole arrays with the same scorers. Returns (per-position metrics,
    real-image references, preceding and generated pixels of the first `keep` sets for the grid).

    FID: n-th generated images vs the first preceding image of every set; IS: of the n-th generated images;
    CLIP text-image: vs the set's caption; CLIP image-image: mean over all of the set's preceding images."""
    real, second, feats, logits, clip_t, clip_i, real_t, real_i = [], [], [], [], [], [], [], []
    kept_prec, kept_gen = [], []
    for start, context, gen in _generated_batches(net, autoencoder, test_sets, config, context_encoder, progress):
        b, k = gen.shape[:2]
        prec = _decode(autoencoder, context)  # (b, n_c, 3, H, W)
        real.append(extract_features(prec[:, 0], fid_network))
        if prec.shape[1] > 1:
            second.append(extract_features(prec[:, 1], fid_network))
        f, lg = extract_features_and_logits(gen.flatten(0, 1), fid_network)  # one resize per image for both
        feats.append(f.reshape(b, k, -1))
        logits.append(lg.reshape(b, k, -1))
        ge, pe = clip.image_embeddings(gen), clip.image_embeddings(prec)  # (b, K, E), (b, n_c, E)
        te = clip.text_embeddings(test_sets.captions[start : start + b])  # (b, E)
        clip_t.append(clip.text_image_from_embeddings(ge, te))             # (b, K)
        clip_i.append(clip.image_image_from_embeddings(ge, pe))            # (b, K)
        real_t.append(clip.text_image_from_embeddings(pe[:, 0], te))
        if prec.shape[1] > 1:
            real_i.append(clip.image_image_from_embeddings(pe[:, -1], pe[:, :-1]))
        if start < keep:
            kept_prec.append(prec[: keep - start])
            kept_gen.append(gen[: keep - start])
    real_f, feats_a, logits_a = np.concatenate(real), np.concatenate(feats), np.concatenate(logits)
    t, i = torch.cat(clip_t), torch.cat(clip_i)
    k = feats_a.shape[1]
    per = {"fid": [fid_from_features(feats_a[:, n], real_f) for n in range(k)],
           "inception_score": [inception_score_from_logits(logits_a[:, n], config.is_splits) for n in range(k)],
           "clip_text_image": [float(t[:, n].mean()) for n in range(k)],
           "clip_image_image": [float(i[:, n].mean()) for n in range(k)]}
    ref: dict[str, Any] = {"clip_text_image_real": float(torch.cat(real_t).mean())}
    if second:  # FID of two real images per set: the floor at this number of sets
        ref["fid_real_second_vs_first"] = fid_from_features(np.concatenate(second), real_f)
        ref["clip_image_image_real"] = float(torch.cat(real_i).mean())
    return per, ref, torch.cat(kept_prec), torch.cat(kept_gen)


def score_sets(preceding: torch.Tensor, generated: torch.Tensor, captions: Sequence[str],
               attributes: Sequence[dict[str, Any]] | None, scorers: Scorers, is_splits: int = 1,
               progress: bool = True) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-position metrics of generated (B, K, 3, H, W) against preceding (B, n_c, 3, H, W)."""
    k = generated.shape[1]
    per: dict[str, list[float]] = {}
    ref: dict[str, Any] = {}
    bar = tqdm(total=k, desc="evaluate: scoring positions", disable=not progress)
    if scorers.fid_network is not None:
        net = scorers.fid_network
        real = extract_features(preceding[:, 0], net)
        feats = [extract_features(generated[:, n], net) for n in range(k)]
        per["fid"] = [fid_from_features(f, real) for f in feats]
        per["inception_score"] = [inception_score(generated[:, n], net, splits=is_splits) for n in range(k)]
        if preceding.shape[1] > 1:  # FID of two real images per set: the floor at this number of sets
            ref["fid_real_second_vs_first"] = fid_from_features(extract_features(preceding[:, 1], net), real)
    if scorers.clip is not None:
        clip = scorers.clip
        per["clip_text_image"] = [float(clip.text_image(generated[:, n], captions).mean()) for n in range(k)]
        per["clip_image_image"] = [float(clip.image_image(generated[:, n], preceding).mean()) for n in range(k)]
        ref["clip_text_image_real"] = float(clip.text_image(preceding[:, 0], captions).mean())
        if preceding.shape[1] > 1:
            ref["clip_image_image_real"] = float(clip.image_image(preceding[:, -1], preceding[:, :-1]).mean())
    if scorers.oracle is not None:
        # the shapes world only: imported here so the paper's path never loads the oracle module
        from m2m_pipeline.evaluation.oracle import attribute_targets

        predicted = scorers.oracle.predict(generated)  # {attr: (B, K)}
        targets = attribute_targets(attributes) if attributes is not None else attribute_targets(captions=captions)
        for name, values in attribute_consistency(predicted, targets).items():
            per[f"consistency_{name}"] = values.tolist()
        per["caption_agreement"] = caption_agreement(predicted, captions).tolist()
        real = attribute_consistency(scorers.oracle.predict(preceding), targets)
        ref.update({f"consistency_{name}_real": float(v.mean()) for name, v in real.items()
                    if name in ("content", "style")})
        ref["chance"] = chance_levels()
    bar.update(k)
    bar.close()
    return per, ref


def summarize(per_position: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean and population std over positions (the K positions are the whole population)."""
    out = {}
    for name, values in per_position.items():
        v = np.asarray(values, dtype=np.float64)
        out[name] = {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else math.nan,
                     "std": float(np.nanstd(v)) if np.isfinite(v).any() else math.nan}
    return out


def run_protocol(net, autoencoder, test_sets: TestSets, config: ProtocolConfig, scorers: Scorers,
                 context_encoder=None, checkpoint: str | os.PathLike | None = None,
                 progress: bool = True) -> EvaluationReport:
    """Generate after every test set's preceding images and score every position; see the module doc."""
    if all(s is None for s in (scorers.fid_network, scorers.clip, scorers.oracle)):
        raise ValueError("no metric configured: give an FID feature network, a CLIP model or an oracle")
    t0 = time.perf_counter()
    preceding, generated = generate_for_protocol(net, autoencoder, test_sets, config, context_encoder, progress)
    t1 = time.perf_counter()
    per, ref = score_sets(preceding, generated, test_sets.captions, test_sets.attributes, scorers,
                          config.is_splits, progress)
    t2 = time.perf_counter()
    b = len(test_sets.keys)
    provenance: dict[str, Any] = {
        **asdict(config), "num_sets": b, "window": 0 if config.unconditional else config.window,
        "sampler": "DDIM (diffusers DDIMScheduler, eta 0, SD settings)", "seeds": f"{config.seed}..{config.seed + b - 1}",
        "fid_reference": "first preceding image of every set", "std": "population std over positions",
        "test_shards": test_sets.shards, "set_keys_sha256": keys_digest(test_sets.keys), "test_draw": test_sets.draw,
        "model": {"variant": net.config.variant, "image_size": net.config.image_size,
                  "autoencoder": net.config.autoencoder},
        "versions": _versions(), "device": str(net.device),
    }
    if checkpoint is not None:
        weights = Path(checkpoint) / "model.safetensors"
        provenance["checkpoint"] = str(checkpoint)
        provenance["checkpoint_sha256"] = sha256_file(weights) if weights.is_file() else None
    if scorers.fid_network is not None:
        provenance["fid"] = {**scorers.fid_network.info, "library": "clean-fid fid_from_feats",
                             "is_library": "torchmetrics InceptionScore", "is_splits": config.is_splits}
    if scorers.clip is not None:
        provenance["clip"] = scorers.clip.info
    if scorers.oracle is not None:
        provenance["oracle"] = {"dir": scorers.oracle_dir, "config": scorers.oracle.config.to_dict(),
                                "heldout_accuracy": scorers.oracle.heldout_accuracy,
                                "targets": "set attributes from the shards" if test_sets.attributes is not None
                                else "attributes parsed from captions"}
    return EvaluationReport(per, summarize(per), ref, provenance,
                            {"generate": round(t1 - t0, 2), "score": round(t2 - t1, 2)})
