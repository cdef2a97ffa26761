"""Task evaluation (docs/tasks.md): held-out items split into context and targets; targets generated with
dual guidance (Eq. 7) and scored against the truth, next to the baselines and the model before fine-tuning.

NVS: `context_images` views of a held-out object (1, as Zero-1-to-3) -> `target_images` views at its other
(held-out) poses, PSNR / SSIM (LPIPS with local weights). Procedures: the first `context_images` steps ->
the next `target_images`, PSNR / SSIM plus the stand-in's attribute check (|measured - true progress|).
Every number is per image; the summary is the mean ± std over held-out items of each item's mean over its
targets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from m2m_pipeline.io import atomic_write_bytes, atomic_write_text
from m2m_pipeline.network import M2MUNet
from m2m_pipeline.sampling import generate
from m2m_pipeline.tasks.finetune import (
    FinetuneConfig,
    Task,
    TaskEvalConfig,
    TaskFeatures,
    default_device,
    init_task_model,
    make_splits,
    task_autoencoder,
    task_dataset,
)
from m2m_pipeline.tasks.metrics import (
    copy_input_view,
    image_metrics,
    lpips_available,
    repeat_last_step,
)
from m2m_pipeline.tasks.procedures import (
    ATTRIBUTES_NAME,
    load_attributes,
    progress_error,
)

Method = Callable[[dict[str, Any], list[int]], torch.Tensor]  # (batch, per-item seeds) -> (B, K, 3, H, W)
BASELINE = {"camera": "copy_input_view", "position": "repeat_last_step"}
LOWER_IS_BETTER = ("lpips", "progress_error")


# ---------------------------------------------------------------------- examples and methods
def heldout_batches(task: Task, root: str | os.PathLike, keys: Sequence[str], ec: TaskEvalConfig,
                    image_size: int, items: int | None = None, autoencoder: Any | None = None,
                    device: str | torch.device | None = "cpu", encode_batch_size: int = 64
                    ) -> list[dict[str, Any]]:
    """Fixed examples of the given items: context_images + target_images views / consecutive steps each,
    drawn with `ec.seed` (the same for every method and every run); "images" are the pixels (CPU), "latents"
    their codes under `autoencoder` (the pixels themselves when it is None), encoded in batches on `device`."""
    keys = list(keys)[: items if items is not None else ec.max_items]
    if not keys:
        raise ValueError("no held-out items to evaluate")
    data = task_dataset(task, root, keys, ec.context_images + ec.target_images, image_size, seed=ec.seed)
    features = TaskFeatures(data, autoencoder, device=device, encode_batch_size=encode_batch_size)
    return list(features.batches(ec.batch_size, shuffle=False, drop_last=False))


def context_encoder_of(net: M2MUNet, dino: str | os.PathLike | None = None, autoencoder: Any | None = None
                       ) -> Callable | None:
    """What generate() encodes each context latent with: None (M2M-Self attends to the latents) or, for
    M2M-DINO, the DINO encoder (on the network's device) applied to the decoded image (the latent itself for
    pixel models)."""
    if net.config.variant != "dino":
        return None
    from m2m_pipeline.bundle import checkpoint_encoder_spec, context_dino

    encoder = context_dino(net, checkpoint_encoder_spec(net, dino=dino), dino)  # the encoder it was trained with
    encoder.to(net.device)
    if autoencoder is None:
        return encoder.encode
    return lambda z: encoder.encode(autoencoder.decode(z))


def model_method(net: M2MUNet, ec: TaskEvalConfig, s_I: float | None = None, s_C: float | None = None,
                 context_encoder: Callable | None = None, autoencoder: Any | None = None) -> Method:
    """Autoregressive generation of the targets with dual guidance; deterministic DDIM (eta 0); latents are
    decoded with `autoencoder` (pixel models: none). `context_encoder`: `context_encoder_of(net)`, built once
    by the caller (a real DINOv2 is gigabytes). Samples on the network's device; returns CPU images."""
    net = net.eval()

    def predict(batch: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        context = batch["latents"][:, : ec.context_images].to(net.device)  # (B, n_c, C, h, w)
        g_I, g_C = ec.s_I if s_I is None else s_I, ec.s_C if s_C is None else s_C
        if g_I == 1.0 and g_C == 1.0:
            # Eq. 7 at s_I = s_C = 1 is eps(z_0, c_C) alone: one network branch instead of three, same images.
            g_C = None
        out = generate(net, context, ec.target_images, context_encoder=context_encoder,
                       task_cond=batch["task_cond"], steps=ec.steps,
                       guidance_scale=g_I, task_guidance_scale=g_C, seed=seeds, progress=False)
        if autoencoder is not None:
            b, k = out.shape[:2]
            out = autoencoder.decode(out.flatten(0, 1)).unflatten(0, (b, k))  # (B, K, 3, S, S)
        return out.float().clamp(-1, 1).cpu()

    return predict


def baseline_method(task: Task, ec: TaskEvalConfig) -> Method:
    def predict(batch: dict[str, Any], seeds: list[int]) -> torch.Tensor:
        context = batch["images"][:, : ec.context_images]
        if task == "camera":  # the context view nearest in relative pose (the strongest copy baseline)
            cond = batch["task_cond"]
            return copy_input_view(context, ec.target_images, cond[:, : ec.context_images],
                                   cond[:, ec.context_images:])
        return repeat_last_step(context, ec.target_images)

    return predict


# ---------------------------------------------------------------------- scoring
def score(task: Task, root: str | os.PathLike, batch: dict[str, Any], pred: torch.Tensor, ec: TaskEvalConfig,
          with_lpips: bool) -> dict[str, torch.Tensor]:
    """Per image (B, K) metrics of `pred` against the batch's targets."""
    target = batch["images"][:, ec.context_images:]
    values = image_metrics(pred, target, with_lpips=with_lpips)
    keys = batch["key"]
    if task == "position" and all((Path(root) / k / ATTRIBUTES_NAME).is_file() for k in keys):
        metas = [load_attributes(root, k) for k in keys]
        steps = batch["steps"][:, ec.context_images:]
        # in units of one step (1 / (n - 1) of the progress): < 0.5 means the right step was drawn
        n = torch.tensor([m["n_steps"] - 1 for m in metas], dtype=torch.float64)[:, None]
        values["progress_error"] = progress_error(pred, metas, steps) * n
    return values


def run_methods(methods: dict[str, Method], task: Task, root: str | os.PathLike, batches: list[dict[str, Any]],
                ec: TaskEvalConfig, with_lpips: bool = False, progress: bool = True
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """values[method][metric]: (items, K); predictions[method]: (items, K, 3, H, W)."""
    values: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in methods}
    preds: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    offset = 0
    bar = tqdm(total=len(methods) * len(batches), desc=f"evaluate {task}", disable=not progress)
    for batch in batches:
        b = batch["images"].shape[0]
        seeds = [ec.seed + offset + i for i in range(b)]  # item i of the split samples with seed + i
        for name, method in methods.items():
            pred = method(batch, seeds)
            preds[name].append(pred)
            for metric, v in score(task, root, batch, pred, ec, with_lpips).items():
                values[name].setdefault(metric, []).append(v.double())
            bar.update(1)
        offset += b
    bar.close()
    return ({m: {k: torch.cat(v) for k, v in per.items()} for m, per in values.items()},
            {m: torch.cat(p) for m, p in preds.items()})


def summarize(values: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """{method: {metric_mean, metric_std, items}}: mean ± std (population) over items of each item's mean over
    its K targets. NaN values (a failed attribute check: no foreground) count as failures, not as zeros:
    `progress_fail` is their share, and the error means are over the images that were readable."""
    out: dict[str, dict[str, float]] = {}
    for method, metrics in values.items():
        row: dict[str, float] = {}
        for metric, v in metrics.items():
            per_item = v.nanmean(dim=1)  # (items,)
            per_item = per_item[~per_item.isnan()]
            row[f"{metric}_mean"] = float(per_item.mean()) if len(per_item) else float("nan")
            row[f"{metric}_std"] = float(per_item.std(correction=0)) if len(per_item) > 1 else 0.0
            if metric == "progress_error":
                row["progress_fail"] = float(v.isnan().double().mean())
                row["progress_within_half_step"] = float((v < 0.5).double().mean())  # NaN compares False
            row["items"] = float(v.shape[0])
        out[method] = row
    return out


def paired_comparison(values: dict[str, dict[str, torch.Tensor]], reference: str, metric: str = "psnr"
                      ) -> dict[str, dict[str, float]]:
    """Each method against `reference` on the same items: the mean over items of (method - reference) of the
    item means, its standard error (sample std / sqrt(items)), and how many items the method does better on.
    Paired, because the items differ far more from each other than the methods do on one item."""
    ref = values[reference][metric].nanmean(dim=1)  # (items,)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    out = {}
    for method, metrics in values.items():
        if method == reference:
            continue
        d = metrics[metric].nanmean(dim=1) - ref
        n = len(d)
        out[method] = {"reference": reference, "metric": metric, "diff_mean": float(d.mean()),
                       "diff_se": float(d.std(correction=1) / n ** 0.5) if n > 1 else float("nan"),
                       "better": float((sign * d > 0).sum()), "items": float(n)}
    return out


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An evaluation report as flat MLflow metrics: <split>/<method>/<metric> (split: test or validation)
    and the paired comparison as <split>/<method>/paired_<metric>_{diff_mean,diff_se,better}."""
    split = report.get("split", "test")
    out = {f"{split}/{method}/{m}": v for method, row in report["summary"].items() for m, v in row.items()}
    for method, p in report.get("paired", {}).items():
        out.update({f"{split}/{method}/paired_{p['metric']}_{k}": p[k] for k in ("diff_mean", "diff_se", "better")})
    return out


def paired_table(paired: dict[str, dict[str, float]]) -> str:
    lines = []
    for method, p in paired.items():
        lines.append(f"- {method} - {p['reference']}, {p['metric']} paired over items: {p['diff_mean']:+.3f} ± "
                     f"{p['diff_se']:.3f} (standard error), better on {int(p['better'])}/{int(p['items'])}")
    return "\n".join(lines) + "\n"


def metrics_table(summary: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per method, mean ± std over held-out items."""
    metrics = [m for m in ("psnr", "ssim", "lpips", "progress_error")
               if any(f"{m}_mean" in row for row in summary.values())]
    extra = [k for k in ("progress_within_half_step",) if any(k in row for row in summary.values())]
    head = ["method", "items"] + [f"{m} ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)"
                                  for m in metrics] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        cells = [method, f"{int(row['items'])}"]
        cells += [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" if f"{m}_mean" in row else "-" for m in metrics]
        cells += [f"{row[k]:.2f}" if k in row else "-" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- guidance sweep
def sweep_guidance(net: M2MUNet, task: Task, root: str | os.PathLike, keys: Sequence[str], ec: TaskEvalConfig,
                   progress: bool = True, context_encoder: Callable | None = None, autoencoder: Any | None = None,
                   encode_batch_size: int = 64) -> tuple[float, float, list[dict[str, float]]]:
    """(s_I, s_C) with the best mean PSNR on validation items (never test items), over the grid
    ec.sweep_s_I x ec.sweep_s_C; returns the choice and every grid point's PSNR."""
    batches = heldout_batches(task, root, keys, ec, net.config.image_size, items=ec.sweep_items,
                              autoencoder=autoencoder, device=net.device, encode_batch_size=encode_batch_size)
    rows = []
    for s_I in ec.sweep_s_I:
        for s_C in ec.sweep_s_C:
            method = model_method(net, ec, s_I, s_C, context_encoder, autoencoder)
            values, _ = run_methods({"m": method}, task, root, batches, ec, progress=False)
            rows.append({"s_I": s_I, "s_C": s_C, "psnr": float(values["m"]["psnr"].mean())})
            if progress:
                tqdm.write(f"sweep s_I={s_I} s_C={s_C}: validation PSNR {rows[-1]['psnr']:.2f} dB")
    best = max(rows, key=lambda r: r["psnr"])
    return best["s_I"], best["s_C"], rows


# ---------------------------------------------------------------------- figures
def _tile(images: torch.Tensor) -> np.ndarray:
    """(K, 3, H, W) in [-1, 1] -> (H, K*W, 3) uint8."""
    from m2m_pipeline.visualize import to_uint8

    return np.concatenate(list(to_uint8(images)), axis=1)


GRID_TILE_MAX = 128  # px a grid tile is drawn at, at most: 16 / 32 px images x 3, 512 px images / 4


def save_grid(context: torch.Tensor, predictions: dict[str, torch.Tensor], truth: torch.Tensor | None,
              path: str | os.PathLike, scale: int = 3, gap: int = 4, max_tile: int = GRID_TILE_MAX) -> Path:
    """One row per item: context | each method's targets | truth (None: no truth columns), white gaps between
    the groups. Small images are enlarged `scale` times (nearest: pixels stay visible), large ones reduced so
    a tile is at most `max_tile` px (box filter)."""
    from PIL import Image

    side = context.shape[-1]
    if side * scale > max_tile:  # reduce every image first, so the gaps keep their width
        size = max(1, max_tile)
        shrink = lambda x: torch.nn.functional.interpolate(  # noqa: E731
            x.flatten(0, 1).float(), size=(size, size), mode="area").unflatten(0, tuple(x.shape[:2]))
        context, truth = shrink(context), None if truth is None else shrink(truth)
        predictions = {k: shrink(v) for k, v in predictions.items()}
        scale = 1

    groups = [context] + list(predictions.values()) + ([truth] if truth is not None else [])
    rows = []
    for i in range(context.shape[0]):
        parts = []
        for g in groups:
            tile = _tile(g[i])
            parts += [tile, np.full((tile.shape[0], gap, 3), 255, np.uint8)]
        rows += [np.concatenate(parts[:-1], axis=1), np.full((2, sum(p.shape[1] for p in parts[:-1]), 3), 255,
                                                              np.uint8)]
    image = Image.fromarray(np.concatenate(rows[:-1], axis=0))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return _save_png(image, path)


def save_bar_chart(summary: dict[str, dict[str, float]], path: str | os.PathLike, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["psnr_mean"] for n in names]
    stds = [summary[n]["psnr_std"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar(names, means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C3"][: len(names)])
    for x, m in enumerate(means):
        ax.text(x, m, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="PSNR (dB), mean ± std over items", title=title)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _save_png(image: Any, path: str | os.PathLike) -> Path:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------- the whole evaluation
def evaluate_finetune(cfg: FinetuneConfig, root: str | os.PathLike, checkpoint: str | os.PathLike,
                      out_dir: str | os.PathLike, *, base: str | os.PathLike | None = None,
                      grid_items: int = 4, progress: bool = True, dino: str | os.PathLike | None = None,
                      split: Literal["test", "validation"] = "test",
                      autoencoder: str | os.PathLike | None = None,
                      device: str | torch.device | None = None) -> dict[str, Any]:
    """Fine-tuned model vs the model before fine-tuning (the base, or the untrained task model) vs the
    task's copy baseline on the test split (or the validation split, to follow a run without looking at
    test items; no guidance sweep then). Writes metrics.json, table.md, grid.png (every method),
    figure.png (context | fine-tuned, as Figs. 7-8) and psnr.png to out_dir.
    `autoencoder`: the AutoencoderKL folder of a latent model (both models share the base's).
    `device` (default: cuda when present): where both models sample and the encoders encode."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task, ec = cfg.task, cfg.eval
    device = default_device(device)
    splits = make_splits(task, root, cfg.held_out, cfg.validation, cfg.split_seed, cfg.min_steps)
    keys = {"test": splits.test, "validation": splits.validation}.get(split)
    if not keys:
        raise ValueError(f"split must be 'test' or 'validation' with items in it, got {split!r} "
                         f"({len(keys or [])} items)")
    tuned = M2MUNet.from_pretrained(checkpoint)
    if tuned.config.task != task:
        raise ValueError(f"{checkpoint}: a '{tuned.config.task}' model cannot be evaluated on task '{task}'")
    before = init_task_model(task, base, cfg.net_preset, seed=cfg.train.seed, spatial_bias=cfg.spatial_bias)
    tuned, before = tuned.to(device), before.to(device)
    if before.config.autoencoder != tuned.config.autoencoder:
        raise ValueError(f"{checkpoint} works in '{tuned.config.autoencoder}' space, the model before fine-tuning "
                         f"in '{before.config.autoencoder}' space; evaluate against its own base")
    ae = task_autoencoder(tuned, autoencoder)
    if isinstance(ae, torch.nn.Module):
        ae.to(device)
    tuned_encoder = context_encoder_of(tuned, dino, ae)
    before_encoder = (tuned_encoder if before.config.variant == tuned.config.variant
                      else context_encoder_of(before, dino, ae))
    s_I, s_C, sweep = ec.s_I, ec.s_C, []
    if ec.sweep_s_I and ec.sweep_s_C and splits.validation and split == "test":
        s_I, s_C, sweep = sweep_guidance(tuned, task, root, splits.validation, ec, progress=progress,
                                         context_encoder=tuned_encoder, autoencoder=ae,
                                         encode_batch_size=cfg.encode_batch_size)
    methods = {"fine-tuned": model_method(tuned, ec, s_I, s_C, tuned_encoder, ae),
               "before fine-tuning": model_method(before, ec, s_I, s_C, before_encoder, ae),
               BASELINE[task]: baseline_method(task, ec)}
    batches = heldout_batches(task, root, keys, ec, tuned.config.image_size, autoencoder=ae, device=device,
                              encode_batch_size=cfg.encode_batch_size)
    with_lpips = lpips_available()
    values, preds = run_methods(methods, task, root, batches, ec, with_lpips, progress)
    summary = summarize(values)
    paired = paired_comparison(values, BASELINE[task])
    sampler = {"steps": ec.steps, "s_I": s_I, "s_C": s_C, "eta": 0.0, "seed": ec.seed,
               "seeds": f"item i of the {split} split: seed + i", "split": split, "context_images": ec.context_images,
               "target_images": ec.target_images, "test_items": len(values["fine-tuned"]["psnr"]),
               "lpips": with_lpips, "base": str(base) if base else "untrained (from scratch)",
               "variant": tuned.config.variant, "device": str(device)}
    table = metrics_table(summary) + "\n" + paired_table(paired)
    context = torch.cat([b["images"][:, : ec.context_images] for b in batches])[:grid_items]
    truth = torch.cat([b["images"][:, ec.context_images:] for b in batches])[:grid_items]
    files = {
        "grid": save_grid(context, {k: v[:grid_items] for k, v in preds.items()}, truth, out / "grid.png"),
        # Figs. 7-8: the given images, then the fine-tuned model's generations (no baselines, no truth)
        "figure": save_grid(context, {"fine-tuned": preds["fine-tuned"][:grid_items]}, None, out / "figure.png"),
        "psnr_chart": save_bar_chart(summary, out / "psnr.png", f"{task}: held-out PSNR"),
    }
    report = {"task": task, "summary": summary, "paired": paired, "sampler": sampler, "sweep": sweep,
              "split": split, f"{split}_keys": keys,
              "per_item": {m: {k: v.tolist() for k, v in per.items()} for m, per in values.items()}}
    atomic_write_text(out / "metrics.json", [json.dumps(report, indent=1)])
    grid_note = ("grid.png rows: held-out items; columns: context | " + " | ".join(methods) + " | truth\n"
                 "figure.png (as Figs. 7-8): context | fine-tuned\n")
    atomic_write_text(out / "table.md", [table, "\n", json.dumps(sampler), "\n\n", grid_note])
    files.update(metrics=out / "metrics.json", table=out / "table.md")
    return {**report, "table": table, "files": files}
