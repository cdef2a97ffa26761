"""The evaluation report of a checkpoint (docs/orchestration.md: the library owns every result): the Sec. 8.4 protocol
(per-position FID / IS / CLIP / oracle consistency), the studies behind the paper's figures (drift over 25
images, number of preceding images, zero-shot real photographs), the learnability verdict, and sampling speed.
Two kinds (EvalSpec.scorers): "oracle", the shapes world's; "paper", Table 1 with Inception FID / IS and CLIP
(no oracle, no verdict, no photographs).

`evaluate_checkpoint` is the one entry point: the Dagster evaluation assets call it and only add metadata,
MLflow and DVC; `m2m evaluate --report PRESET` calls it from a terminal. `EVAL_PRESETS` holds each profile's
sizes (smoke, demo, paper); the Dagster profiles reference them.
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

from m2m_pipeline.evaluation.learnability import SamplingSweep
from m2m_pipeline.io import atomic_write_bytes, sha256_file
from m2m_pipeline.sampling import DEFAULT_POLICY, PAPER_POLICY, context_policy

SCORERS = ("oracle", "paper")  # EvalSpec.scorers


@dataclass(frozen=True)
class EvalSpec:
    num_sets: int = 4                     # test sets of the Sec. 8.4 protocol (the paper: 10,000)
    context_images: int = 4               # preceding images given to the model (Sec. 8.4: 4)
    generated_images: int = 4             # images generated autoregressively after them (Sec. 8.4: 10)
    steps: int = 50                       # DDIM steps (Sec. 8.6: 50)
    guidance_scale: float = 3.0           # docs/model.md "Learnability": guidance matters a lot at CPU scale
    # Which earlier images each generated image sees (sampling.CONTEXT_POLICIES): DEFAULT_POLICY, anchors-4
    # (docs/evaluation.md "Drift"); the paper preset keeps the paper's W = 4 sliding window (PAPER_POLICY) to reproduce its table.
    context_policy: str = DEFAULT_POLICY
    # Autocast of the network calls while sampling (m2m_pipeline/precision.py): the evaluation assets pass the
    # run's compute.dtype; scorers (Inception, CLIP, oracle) always run in float32.
    precision: str = "float32"
    drift_images: int = 25                # images generated in the drift study (consistency by position)
    drift_sets: int = 8                   # test sets of the drift study
    context_counts: tuple[int, ...] = (1, 2, 3, 4)  # preceding images in the Fig. 6 study
    zero_shot_images: int = 4             # images generated after each set of real photographs (Fig. 5)
    coco_sets: int = 16                   # MSCOCO sets, one per category (Figs. 16, 17; evaluation/coco_zero_shot.py)
    oracle_overrides: dict[str, Any] = field(default_factory=dict)  # train_oracle kwargs (OracleConfig fields)
    autoencoder_min_accuracy: float | None = 0.99  # oracle accuracy on reconstructions, per attribute (None: report)
    benchmark_contexts: tuple[int, ...] = (1, 2, 4)  # context sizes the sampling benchmark times
    benchmark_images: int = 2             # images generated per timed call
    benchmark_steps: int = 20             # DDIM steps per timed image
    benchmark_repeats: int = 2            # interleaved timed rounds (median reported), after one warm-up
    # Guidance and DDIM steps chosen on the validation split before the test protocol (None: use the two
    # fields above as they are).
    sweep: SamplingSweep | None = None
    # Which judges score the report (docs/evaluation.md): "oracle", the shapes world's attribute oracle
    # (consistency, oracle-feature FID / IS, learnability verdict; the CPU profiles), or "paper", Table 1's
    # scorers on real captions (clean-fid Inception FID / IS, open_clip CLIP-T / CLIP-I; no oracle). It shapes
    # the asset graph (the oracle and learnability assets exist only for "oracle"): RunProfile.shapes_world.
    scorers: str = "oracle"
    draw_seed: int = 0                    # seed of the random draw of the test (and validation) sets

    def __post_init__(self) -> None:
        context_policy(self.context_policy)  # an unknown name fails here, naming the choices
        if self.scorers not in SCORERS:
            raise ValueError(f"EvalSpec.scorers must be one of {SCORERS}, got {self.scorers!r}")
        if self.scorers == "paper" and self.sweep is not None:
            raise ValueError("EvalSpec.sweep scores validation sets with the shapes-world oracle; the 'paper' "
                             "scorers have none (set sweep=None)")
        if self.draw_seed < 0:
            raise ValueError(f"EvalSpec.draw_seed must be >= 0, got {self.draw_seed}")
        for name in ("num_sets", "context_images", "generated_images", "steps", "drift_images", "drift_sets",
                     "zero_shot_images", "benchmark_images", "benchmark_steps", "benchmark_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 0 or not self.context_counts or min(self.context_counts) < 1:
            raise ValueError(f"EvalSpec: guidance_scale >= 0 and context_counts >= 1, got {self.guidance_scale}, "
                             f"{self.context_counts}")

    @property
    def window(self) -> int | None:
        return context_policy(self.context_policy).window

    @property
    def anchors(self) -> int:
        return context_policy(self.context_policy).anchors


# Each run profile's evaluation sizes (orchestration/profiles.py references them by name).
EVAL_PRESETS: dict[str, EvalSpec] = {
    "smoke": EvalSpec(num_sets=4, context_images=4, generated_images=2, steps=4, drift_images=3, drift_sets=2,
                      zero_shot_images=1, benchmark_images=1, benchmark_steps=2, benchmark_repeats=1,
                      # an untrained smoke model needs no 99% oracle: a small one keeps CI fast (accuracy reported)
                      oracle_overrides={"train_images": 1500, "heldout_images": 300, "epochs": 2,
                                        "min_accuracy": None}, autoencoder_min_accuracy=None,
                      sweep=SamplingSweep(guidance_scales=(2.0, 3.0), steps=(4,), num_sets=2)),
    "demo": EvalSpec(num_sets=64, context_images=4, generated_images=10, steps=25, drift_images=25,
                      drift_sets=12, benchmark_images=2, benchmark_steps=20, sweep=SamplingSweep()),
    "paper": EvalSpec(num_sets=10_000, context_images=4, generated_images=10, steps=50, guidance_scale=7.5,
                      context_policy=PAPER_POLICY, drift_sets=64, benchmark_images=2, benchmark_steps=50,
                      scorers="paper"),
}
# `make paper-dryrun`: the paper preset (its scorers, W = 4 policy, guidance) with every size cut to a few seconds:
# two sets (FID needs two), one position (each FID is a 2048-d matrix square root: ~30-60 s on a CPU), one DDIM
# step per study (orchestration/dryrun.py); nothing it reports is a result.
EVAL_PRESETS["dryrun"] = dataclasses.replace(
    EVAL_PRESETS["paper"], num_sets=2, generated_images=1, steps=1, drift_images=2, drift_sets=1,
    context_counts=(1,), zero_shot_images=1, coco_sets=2, benchmark_contexts=(1,), benchmark_images=1,
    benchmark_steps=1, benchmark_repeats=1, autoencoder_min_accuracy=None)


def _decode(autoencoder: Any, z: torch.Tensor) -> torch.Tensor:
    b, k = z.shape[:2]
    return autoencoder.decode(z.flatten(0, 1)).unflatten(0, (b, k)).cpu()


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str | os.PathLike, test_dir: str | os.PathLike,
                        oracle_dir: str | os.PathLike | None, out: str | os.PathLike, ev: EvalSpec, *,
                        variant: str | None = None, validation_dir: str | os.PathLike | None = None,
                        vae: str | os.PathLike | None = None, dino: str | os.PathLike | None = None,
                        device: str = "cpu", seed: int = 0, inception_weights: str | os.PathLike | None = None,
                        clip_model: str | None = None, clip_pretrained: str | os.PathLike | None = None
                        ) -> dict[str, Any]:
    """Everything one model's evaluation report holds; writes report.json, table.txt and the figures to `out`.
    The evaluation assets and `m2m evaluate --report` both call this (same numbers, same seeds). The test
    sets are `ev.num_sets` drawn at random with `ev.draw_seed` (protocol.load_test_sets).

    `ev.scorers == "paper"` (real captions, no shapes world): Table 1 of Sec. 8.4 with clean-fid Inception
    FID / IS (`inception_weights`) and open_clip CLIP-T / CLIP-I (`clip_model`, `clip_pretrained`), the drift
    and Fig. 6 studies by CLIP image-image consistency; see `_paper_report`. `oracle_dir` is not used.

    `ev.scorers == "oracle"` (the shapes world, `oracle_dir` a trained attribute oracle):
    0. With `eval.sweep` and validation shards: guidance and DDIM steps chosen on validation sets (position-1
       learnability score, evaluation/learnability.py), then used for everything below; never on test sets.
    1. The Sec. 8.4 protocol with guidance (`eval.generated_images` after `eval.context_images`), scored with
       the oracle (consistency, caption agreement) and oracle-feature FID / IS (the offline feature network).
    2. The same protocol with the image condition dropped (position 1): the unconditional branch.
    3. Drift: consistency by position over `eval.drift_images` generated images (the paper's limitation).
    4. Fig. 6: consistency of the first generated image vs the number of preceding images.
    5. Fig. 5: zero-shot continuation of real photographs (scikit-image's bundled files).
    6. Fig. 4: a grid of preceding | generated images.
    """
    from m2m_pipeline.bundle import load_bundle

    checkpoint, test_dir, out = Path(checkpoint), Path(test_dir), Path(out)
    if ev.scorers == "paper" and (inception_weights is None or clip_model is None):
        raise ValueError("EvalSpec.scorers 'paper' needs inception_weights (clean-fid's inception-2015-12-05.pt) "
                         "and clip_model (+ clip_pretrained): the paper's FID / IS and CLIP scorers")
    if ev.scorers == "oracle" and oracle_dir is None:
        raise ValueError("EvalSpec.scorers 'oracle' needs oracle_dir, a trained shapes-world attribute oracle")
    validation_dir = None if validation_dir is None else Path(validation_dir)
    bundle = load_bundle(checkpoint, vae=vae, dino=dino, device=device)
    net = bundle.net
    variant = variant or net.config.variant
    if net.config.variant != variant:
        raise ValueError(f"{checkpoint} holds an M2M-{net.config.variant} model, expected M2M-{variant}")
    if ev.scorers == "paper":
        return _paper_report(bundle, checkpoint, test_dir, out, ev, variant, inception_weights, clip_model,
                             clip_pretrained, device, seed)
    return _oracle_report(bundle, checkpoint, test_dir, Path(oracle_dir), out, ev, variant, validation_dir, seed)


def _timer(timings: dict[str, float]):
    def timed(name: str, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        return value
    return timed


def _oracle_report(bundle: Any, checkpoint: Path, test_dir: Path, oracle_dir: Path, out: Path, ev: EvalSpec,
                   variant: str, validation_dir: Path | None, seed: int) -> dict[str, Any]:
    """The shapes world's report (evaluate_checkpoint, scorers "oracle")."""
    from m2m_pipeline.evaluation import protocol, studies
    from m2m_pipeline.evaluation.fid import oracle_feature_network
    from m2m_pipeline.evaluation.oracle import AttributeOracle, attribute_targets

    net, autoencoder, encoder = bundle.net, bundle.autoencoder, bundle.context_encoder
    oracle = AttributeOracle.load(oracle_dir)
    ev, sampling_sweep = _choose_on_validation(bundle, ev, oracle, validation_dir, seed)
    test = _test_sets(bundle, test_dir, ev)
    targets = attribute_targets(test.attributes) if test.attributes else attribute_targets(captions=test.captions)
    scorers = protocol.Scorers(fid_network=oracle_feature_network(oracle), oracle=oracle, oracle_dir=str(oracle_dir))
    spec, cfg = _sampling(ev, seed)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timed = _timer(timings)
    context = dataclasses.replace(test, latents=test.latents[:, :ev.context_images])
    preceding, generated = timed("protocol_generate", lambda: protocol.generate_for_protocol(
        net, autoencoder, context, cfg, encoder, progress=False))
    per, ref = timed("protocol_score", lambda: protocol.score_sets(
        preceding, generated, test.captions, test.attributes, scorers, progress=False))
    guided = {k: float(v[0]) for k, v in studies.oracle_consistency(oracle, generated[:, :1], targets).items()}
    uncond_cfg = dataclasses.replace(cfg, generated_images=1, unconditional=True)
    _, uncond = timed("unconditional", lambda: protocol.generate_for_protocol(
        net, autoencoder, context, uncond_cfg, encoder, progress=False))
    unconditional = {k: float(v[0]) for k, v in studies.oracle_consistency(oracle, uncond, targets).items()}

    drift, drift_images, by_count, (photos, zero_shot, names) = _studies(bundle, ev, test, context, targets, oracle,
                                                                          spec, timed, seed)
    chance = studies.chance_consistency()
    files = _figures(out, variant, net.config.image_size, ev, preceding, generated, drift_images, drift, by_count,
                     photos, _decode(autoencoder, zero_shot), chance)
    report = protocol.EvaluationReport(per, protocol.summarize(per), ref, {
        "variant": variant, "checkpoint": str(checkpoint), **dataclasses.asdict(cfg), "num_sets": len(test.keys),
        "context_policy": context_policy(ev.context_policy).to_dict(),
        "sampler": "DDIM (diffusers DDIMScheduler, eta 0, SD settings)",
        "seeds": f"{seed}..{seed + len(test.keys) - 1} (set i uses seed + i)",
        "fid": scorers.fid_network.info, "oracle_dir": str(oracle_dir),
        "oracle_heldout_accuracy": oracle.heldout_accuracy, "fid_reference": "first preceding image of every set",
        "test_sets": test.draw, "device": str(net.device)}, timings)
    record = {
        "kind": "oracle", "report": report.to_dict(), "test_sets": test.draw, "position1": {"guided": guided, "unconditional": unconditional},
        "verdict": studies.learnability_verdict(guided, unconditional), "chance": chance,
        "drift": {name: v.tolist() for name, v in drift.items()},
        "context_count": {str(n): {name: float(v[0]) for name, v in c.items()} for n, c in by_count.items()},
        "zero_shot_photos": names, "files": {k: str(v) for k, v in files.items()},
        "sampling": {"guidance_scale": ev.guidance_scale, "steps": ev.steps,
                     "chosen_on": "validation split" if sampling_sweep is not None else "the EvalSpec"},
        "sweep": sampling_sweep,
    }
    atomic_write_bytes(out / "report.json", (json.dumps(record, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / "table.txt", (report.table() + "\n").encode())
    return {**record, "table": report.table(), "files": files, "report_path": out / "report.json",
            "num_sets": len(test.keys), "seconds": timings}


def _paper_report(bundle: Any, checkpoint: Path, test_dir: Path, out: Path, ev: EvalSpec, variant: str,
                  inception_weights: str | os.PathLike, clip_model: str, clip_pretrained: str | os.PathLike | None,
                  device: str, seed: int) -> dict[str, Any]:
    """Table 1 of Sec. 8.4 on sets with real captions (evaluate_checkpoint, scorers "paper"); nothing of the
    shapes world (no oracle, no verdict, no zero-shot photographs: the MSCOCO zero-shot is its own asset).

    1. The protocol: per position n = 1..generated_images after context_images preceding images, FID and IS on
       clean-fid Inception features, CLIP text-image (vs the set's caption) and image-image (vs all of the
       set's preceding images, mean), 100 x cosine; mean +- std over positions = the `table1` row.
    2. Drift: CLIP image-image consistency by position over drift_images images (drift_sets sets).
    3. Fig. 6: CLIP image-image consistency of the first generated image after k = context_counts preceding
       images, against the same references for every k (the set's first max(context_images, max(context_counts))
       images), the same seeds, so only k changes.
    4. Fig. 4: a grid of preceding | generated images; one plot of each metric vs n.
    """
    from m2m_pipeline.evaluation import protocol, studies
    from m2m_pipeline.evaluation.clip_score import ClipScorer
    from m2m_pipeline.evaluation.fid import inception_feature_network

    net, autoencoder, encoder = bundle.net, bundle.autoencoder, bundle.context_encoder
    test = _test_sets(bundle, test_dir, ev)
    fid_network = inception_feature_network(inception_weights, device=device)
    clip = ClipScorer(clip_model, clip_pretrained, device=device)
    spec, cfg = _sampling(ev, seed)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timed = _timer(timings)
    context = dataclasses.replace(test, latents=test.latents[:, :ev.context_images])
    per, ref, preceding, generated = timed("protocol", lambda: protocol.run_paper_protocol(
        net, autoencoder, context, cfg, fid_network, clip, encoder, progress=False))
    summary = protocol.summarize(per)
    k_drift = min(ev.drift_sets, len(test.keys))
    drift, drift_images = timed("drift", lambda: studies.clip_consistency(
        net, autoencoder, clip, context.latents[:k_drift], context.latents[:k_drift], ev.drift_images, spec,
        context_encoder=encoder, batch_size=cfg.batch_size, keep=8))
    by_count = timed("context_sweep", lambda: {k: float(studies.clip_consistency(
        net, autoencoder, clip, test.latents[:, :k], test.latents, 1, spec, context_encoder=encoder,
        batch_size=cfg.batch_size)[0][0]) for k in ev.context_counts})
    files = _paper_figures(out, variant, net.config.image_size, preceding, generated, drift_images, per, ref,
                           drift.tolist(), by_count)
    provenance = {
        "variant": variant, "checkpoint": str(checkpoint), **dataclasses.asdict(cfg), "num_sets": len(test.keys),
        "context_policy": context_policy(ev.context_policy).to_dict(),
        "sampler": "DDIM (diffusers DDIMScheduler, eta 0, SD settings)",
        "seeds": f"{seed}..{seed + len(test.keys) - 1} (set i uses seed + i)",
        "fid": {**fid_network.info, "library": "clean-fid fid_from_feats", "is_library": "torchmetrics InceptionScore",
                "is_splits": cfg.is_splits},
        "clip": clip.info, "fid_reference": "first preceding image of every set",
        "clip_image_image_reference": f"mean over the set's {ev.context_images} preceding images",
        "clip_text_image_reference": "the set's caption", "std": "population std over positions",
        "test_sets": test.draw, "test_shards": len(test.shards), "versions": protocol._versions(),
        "device": str(net.device)}
    weights = checkpoint / "model.safetensors"
    provenance["checkpoint_sha256"] = sha256_file(weights) if weights.is_file() else None
    report = protocol.EvaluationReport(per, summary, ref, provenance, timings)
    record = {
        "kind": "paper", "report": report.to_dict(), "table1": protocol.table1_row(summary), "test_sets": test.draw,
        "drift": {"clip_image_image": drift.tolist()},
        "context_count": {str(k): {"clip_image_image": v} for k, v in by_count.items()},
        "files": {k: str(v) for k, v in files.items()},
        "sampling": {"guidance_scale": ev.guidance_scale, "steps": ev.steps, "chosen_on": "the EvalSpec"},
        "sweep": None,
    }
    atomic_write_bytes(out / "report.json", (json.dumps(record, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / "table.txt", (report.table() + "\n").encode())
    return {**record, "table": report.table(), "files": files, "report_path": out / "report.json",
            "num_sets": len(test.keys), "seconds": timings}


# Per-position plots of the paper report: metric -> (file stem, axis label, reference key in report.reference)
PAPER_PLOTS: dict[str, tuple[str, str, str | None]] = {
    "fid": ("fid", "FID (Inception) vs first preceding images", "fid_real_second_vs_first"),
    "inception_score": ("inception_score", "Inception Score", None),
    "clip_text_image": ("clip_text_image", "CLIP text-image (100 x cos)", "clip_text_image_real"),
    "clip_image_image": ("clip_image_image", "CLIP image-image (100 x cos)", "clip_image_image_real"),
}


def _paper_figures(out: Path, variant: str, image_size: int, preceding: torch.Tensor, generated: torch.Tensor,
                   drift_images: torch.Tensor, per: dict[str, list[float]], ref: dict[str, Any],
                   drift: list[float], by_count: dict[int, float]) -> dict[str, Path]:
    """Fig. 4 grid, one plot per Table 1 metric vs n, the drift grid and plot, the Fig. 6 plot."""
    from m2m_pipeline.evaluation.figures import line_plot
    from m2m_pipeline.visualize import save_set_grid

    scale = max(1, 64 // image_size)
    k = len(per["fid"])
    real_i = {"real preceding images": ref["clip_image_image_real"]} if "clip_image_image_real" in ref else {}
    files = {
        "grid": save_set_grid(preceding, generated[:, :min(4, generated.shape[1])], out / "grid.png", scale=scale),
        "drift_grid": save_set_grid(preceding[:len(drift_images)], drift_images, out / "drift_grid.png",
                                    scale=scale),
        "drift": line_plot({"CLIP image-image": (range(1, len(drift) + 1), drift)}, out / "drift.png",
                           title=f"M2M-{variant}: consistency by position", xlabel="generated image n",
                           ylabel="CLIP image-image (100 x cos)", hlines=real_i),
        "context_count": line_plot({"first generated image": (list(by_count), list(by_count.values()))},
                                   out / "context_count.png",
                                   title=f"M2M-{variant}: first generated image vs preceding images",
                                   xlabel="preceding images", ylabel="CLIP image-image (100 x cos)", hlines=real_i),
    }
    for metric, (stem, label, ref_key) in PAPER_PLOTS.items():
        files[stem] = line_plot({f"M2M-{variant}": (range(1, k + 1), per[metric])}, out / f"{stem}.png",
                                title=f"M2M-{variant}: {label} by position", xlabel="generated image n",
                                ylabel=label, hlines={"real images": ref[ref_key]} if ref_key in ref else None)
    return files


def _test_sets(bundle: Any, test_dir: Path, ev: EvalSpec) -> Any:
    """The EvalSpec's random draw of test sets from `test_dir`, with enough preceding images for every study;
    the shards' encoders checked against the checkpoint's first (both report kinds)."""
    from m2m_pipeline.evaluation import protocol

    shards = sorted(str(s) for s in test_dir.glob("mis-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no test feature shards in {test_dir}")
    bundle.check_cache(shards)
    n_ctx = max(ev.context_images, max(ev.context_counts))
    return protocol.load_test_sets(shards, ev.num_sets, n_ctx, seed=ev.draw_seed)


def _sampling(ev: EvalSpec, seed: int) -> tuple[Any, Any]:
    """The studies' SamplingSpec and the protocol's ProtocolConfig of one EvalSpec (both report kinds)."""
    from m2m_pipeline.evaluation import protocol, studies

    spec = studies.SamplingSpec(steps=ev.steps, guidance_scale=ev.guidance_scale, window=ev.window,
                                anchors=ev.anchors, seed=seed, precision=ev.precision)
    cfg = protocol.ProtocolConfig(context_images=ev.context_images, generated_images=ev.generated_images,
                                  window=ev.window, anchors=ev.anchors, steps=ev.steps,
                                  guidance_scale=ev.guidance_scale, seed=seed, precision=ev.precision)
    return spec, cfg


def _choose_on_validation(bundle: Any, ev: EvalSpec, oracle: Any, validation_dir: Path | None, seed: int
                          ) -> tuple[EvalSpec, dict[str, Any] | None]:
    """Guidance and DDIM steps chosen on the validation sets (EvalSpec.sweep), never on test sets."""
    from m2m_pipeline.evaluation import protocol
    from m2m_pipeline.evaluation.learnability import choose_sampling, sweep_table

    val_shards = sorted(str(s) for s in validation_dir.glob("mis-*.tar")) if validation_dir is not None else []
    if ev.sweep is None or not val_shards:
        return ev, None
    bundle.check_cache(val_shards)
    val = protocol.load_test_sets(val_shards, ev.sweep.num_sets, ev.context_images, seed=ev.draw_seed)
    best, rows = choose_sampling(bundle.net, bundle.autoencoder, val, oracle, ev.sweep,
                                 context_images=ev.context_images, window=ev.window, seed=seed,
                                 context_encoder=bundle.context_encoder)
    chosen = dataclasses.replace(ev, guidance_scale=best["guidance_scale"], steps=best["steps"])
    return chosen, {"best": best, "rows": rows, "validation_sets": len(val.keys), "table": sweep_table(rows, best)}


def _studies(bundle: Any, ev: EvalSpec, test: Any, context: Any, targets: dict[str, Any], oracle: Any, spec: Any,
             timed: Any, seed: int) -> tuple[Any, torch.Tensor, dict[int, Any], tuple[torch.Tensor, torch.Tensor, list]]:
    """Drift over a long run, the number of preceding images (Fig. 6), zero-shot real photographs (Fig. 5)."""
    from m2m_pipeline.evaluation import studies

    net, autoencoder, encoder = bundle.net, bundle.autoencoder, bundle.context_encoder
    # Drift over a long autoregressive run (fewer sets: 25 images each).
    k_drift = ev.drift_sets
    drift_z = timed("drift", lambda: studies.continue_sets(net, context.latents[:k_drift], ev.drift_images, spec,
                                                           context_encoder=encoder))
    drift_images = _decode(autoencoder, drift_z)
    drift = studies.oracle_consistency(oracle, drift_images, {k: v[:k_drift] for k, v in targets.items()})
    # Fig. 6: 1..4 preceding images, same seeds.
    sweep = timed("context_sweep", lambda: studies.context_count_sweep(net, test.latents, spec, ev.context_counts,
                                                                     context_encoder=encoder))
    by_count = {n: studies.oracle_consistency(oracle, _decode(autoencoder, z), targets) for n, z in sweep.items()}
    # Fig. 5: real photographs, zero-shot.
    photos, names = studies.real_photo_sets(net.config.image_size, views=ev.context_images, seed=seed)
    photo_z = torch.stack([autoencoder.encode(p.to(net.device)) for p in photos])  # (S, views, C, h, w)
    zero_shot = timed("zero_shot", lambda: studies.continue_sets(net, photo_z, ev.zero_shot_images, spec,
                                                                 context_encoder=encoder))

    return drift, drift_images, by_count, (photos, zero_shot, names)


def _figures(out: Path, variant: str, image_size: int, ev: EvalSpec, preceding: torch.Tensor,
             generated: torch.Tensor, drift_images: torch.Tensor, drift: dict[str, Any], by_count: dict[int, Any],
             photos: torch.Tensor, zero_shot_images: torch.Tensor, chance: dict[str, float]) -> dict[str, Path]:
    """Fig. 4 grid, drift grid and plot, Fig. 5 zero-shot grid, Fig. 6 plot."""
    from m2m_pipeline.evaluation.figures import line_plot
    from m2m_pipeline.visualize import save_set_grid

    k_drift = drift_images.shape[0]
    scale = max(1, 64 // image_size)
    rows = min(8, len(preceding))
    files = {
        "grid": save_set_grid(preceding[:rows], generated[:rows, :min(4, generated.shape[1])], out / "grid.png",
                              scale=scale),
        "drift_grid": save_set_grid(preceding[:k_drift], drift_images, out / "drift_grid.png", scale=scale),
        "zero_shot": save_set_grid(photos, zero_shot_images, out / "zero_shot.png", scale=scale),
        "drift": line_plot({name: (range(1, ev.drift_images + 1), drift[name].tolist())
                            for name in ("colour", "shape", "background")},
                           out / "drift.png", title=f"M2M-{variant}: consistency by position ({k_drift} sets)",
                           xlabel="generated image n", ylabel="consistency with the set",
                           hlines={f"chance {n}": chance[n] for n in ("colour", "shape", "background")},
                           ylim=(0, 1.02)),
        "context_count": line_plot({name: (list(by_count), [by_count[n][name][0].item() for n in by_count])
                                    for name in ("colour", "shape", "background")},
                                   out / "context_count.png",
                                   title=f"M2M-{variant}: first generated image vs preceding images",
                                   xlabel="preceding images", ylabel="consistency with the set",
                                   hlines={f"chance {n}": chance[n] for n in ("colour", "shape", "background")},
                                   ylim=(0, 1.02)),
    }
    return files


def sampling_benchmark(checkpoints: dict[str, Path], net_preset: str, ev: EvalSpec, out: str | os.PathLike,
                       device: str = "cpu", title: str = "") -> tuple[list[dict[str, Any]], Path]:
    """Fig. 9: seconds per generated image of the SD baseline, M2M-DINO and M2M-Self (KV cache on / off) at
    each context size, with ratios to the SD baseline measured in the same run; writes speed.json + fig9.png."""
    from m2m_pipeline.network import M2MUNet
    from m2m_pipeline.speed import measure_sampling_speed, plot_speed, rows_to_dicts

    out = Path(out)
    nets = {v: M2MUNet.from_pretrained(c, map_location=device) for v, c in checkpoints.items()}
    speed = measure_sampling_speed(net_preset, ev.benchmark_contexts, steps=ev.benchmark_steps,
                                   generated=ev.benchmark_images, repeats=ev.benchmark_repeats,
                                   guidance=ev.guidance_scale, device=device, nets=nets)
    rows = [{**row, "steps": ev.benchmark_steps, "images": ev.benchmark_images, "device": device}
            for row in rows_to_dicts(speed)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "benchmark.json", (json.dumps(rows, indent=1) + "\n").encode())
    plot = plot_speed(speed, out / "fig9.png", f"Sampling time per image ({title or net_preset}, {device})")
    return rows, plot


def learnability_table(reports: dict[str, Path], checkpoints: dict[str, Path], out: Path) -> dict[str, Any]:
    """Per variant: position-1 consistency (guided / unconditional / chance / target) and training time;
    writes learnability.json + learnability.md. Nothing is re-measured here: it reads the reports."""
    rows: dict[str, dict[str, Any]] = {}
    for variant, path in reports.items():
        record = json.loads(path.read_text())
        state_file = checkpoints[variant] / "train_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        row: dict[str, Any] = {"train_steps": state.get("step"), "train_seconds": state.get("seconds")}
        for name, v in record["verdict"].items():
            row.update({f"{name}_guided": v["guided"], f"{name}_unconditional": v["unconditional"],
                        f"{name}_chance": v["chance"], f"{name}_target": v["target"], f"{name}_met": v["met"]})
        row["sets"] = record["report"]["provenance"]["num_sets"]
        row["guidance_scale"] = record["report"]["provenance"]["guidance_scale"]
        rows[variant] = row
    names = list(json.loads(next(iter(reports.values())).read_text())["verdict"])
    head = "| model | train | " + " | ".join(f"{n} (target)" for n in names) + " | unconditional (chance) |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for variant, row in rows.items():
        minutes = "?" if row["train_seconds"] is None else f"{row['train_seconds'] / 60:.1f} min"
        cells = [f"{row[f'{n}_guided']:.2f} (>= {row[f'{n}_target']:.2f}) {'met' if row[f'{n}_met'] else 'NOT met'}"
                 for n in names]
        uncond = ", ".join(f"{n} {row[f'{n}_unconditional']:.2f} ({row[f'{n}_chance']:.2f})" for n in names)
        lines.append(f"| M2M-{variant} | {row['train_steps']} steps, {minutes} | " + " | ".join(cells)
                     + f" | {uncond} |")
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    all_met = all(row[f"{n}_met"] for row in rows.values() for n in names)
    atomic_write_bytes(out / "learnability.json",
                       (json.dumps({"rows": rows, "all_met": all_met}, indent=1) + "\n").encode())
    atomic_write_bytes(out / "learnability.md", markdown.encode())
    return {"rows": rows, "markdown": markdown, "all_met": all_met, "path": out / "learnability.md"}
