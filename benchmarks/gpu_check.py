"""The GPU check (issue 14): the figures to take the day a GPU is lent, in one run, one table.

1. Training step at paper shapes (SD-2.1-base U-Net, 64x64x4 latents, N = 5), bf16 autocast, gradient
   checkpointing: seconds per step, peak memory and MFU (FLOPs of one step counted with
   torch.utils.flop_counter on the real architecture / time / the GPU's peak) for a plain U-Net without
   Image-Set Attention (the baseline), M2M-DINO and M2M-Self, with ratios to the baseline.
2. Fig. 9 at paper shapes, DDIM 50: SD baseline vs M2M-DINO (DINOv2-giant encode included) vs M2M-Self with
   and without its KV cache (`m2m_pipeline.speed.measure_sampling_speed`), bf16 autocast.
3. MIS generation at 512 px: the batched `StableDiffusionSetGenerator` vs a naive StableDiffusionPipeline
   loop (`benchmarks/bench_mis.py`'s bench_generation) on a local SD-2.1-base folder (--sd-folder) or a
   random one in the real layout (`m2m_pipeline.reference_layouts`).

    python benchmarks/gpu_check.py --out gpu_check.json              # one H100-class GPU, < 8 minutes
    python benchmarks/gpu_check.py --preset tiny-latent --layout small --resolution 64 --steps 2 --device cpu

Weights are random unless --sd-folder is given: timings and memory are the real models', outputs noise.
Not run in CI (the second line is what its test runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing the package

import torch  # noqa: E402


def autocast(device: str, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def training_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One method at a time (its own peak memory); FLOPs counted on one step of the real module."""
    from torch.utils.flop_counter import FlopCounterMode

    from m2m_pipeline.speed import TRAINING_METHODS, timed_round_robin, training_step_fns

    rows = []
    for method in TRAINING_METHODS:
        (net, step), = training_step_fns(args.preset, args.batch_size, args.n_images, torch.device(args.device),
                                         methods=(method,), gradient_checkpointing=True).values()
        with autocast(args.device, args.dtype):
            step()  # warm-up, then FLOPs of one step, then timed steps
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            seconds = timed_round_robin({method: step}, args.repeats)[method]
        flops = counter.get_total_flops()
        rows.append({"method": method, "parameters": sum(p.numel() for p in net.parameters()),
                     "seconds_per_step": seconds, "images_per_second": args.batch_size * args.n_images / seconds,
                     "flops_per_step": flops, "mfu": flops / seconds / (args.peak_tflops * 1e12),
                     "peak_memory_gib": peak_memory_gib(args.device)})
        del net, step
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]["seconds_per_step"]
    for r in rows:
        r["ratio_to_baseline"] = r["seconds_per_step"] / base
    return rows


def sampling_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from m2m_pipeline.speed import measure_sampling_speed, rows_to_dicts

    with autocast(args.device, args.dtype):
        rows = measure_sampling_speed(args.preset, contexts=args.contexts, steps=args.sampling_steps,
                                      generated=args.generated, repeats=1, device=args.device)
    return rows_to_dicts(rows)


def mis_rows(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from bench_mis import bench_generation

    from m2m_pipeline.reference_layouts import build_sd21_base

    folder = Path(args.sd_folder) if args.sd_folder else build_sd21_base(scratch / "sd21", scale=args.layout)
    batched, naive = bench_generation(folder, args.steps, args.captions, args.resolution, device=args.device,
                                      naive_images=args.naive_images)
    return {"sd_folder": str(folder) if args.sd_folder else f"random {args.layout} SD-2.1-base layout",
            "resolution": args.resolution, "steps": args.steps, "batched_images_per_second": batched,
            "naive_images_per_second": naive, "speedup": batched / naive}


def format_report(report: dict[str, Any]) -> str:
    lines = ["| check | item | value |", "|---|---|---|"]
    for r in report["training"]:
        mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
        lines.append(f"| training step ({report['args']['batch_size']} sets x {report['args']['n_images']}, "
                     f"{report['args']['dtype']}) | {r['method']} ({r['parameters'] / 1e6:.2f} M) | "
                     f"{r['seconds_per_step']:.3f} s ({r['ratio_to_baseline']:.2f}x baseline), "
                     f"{r['images_per_second']:.1f} img/s, MFU {100 * r['mfu']:.1f} %{mem} |")
    for r in report["sampling"]:
        lines.append(f"| Fig. 9, DDIM {report['args']['sampling_steps']} | {r['method']}, {r['context']} context | "
                     f"{r['seconds_per_image']:.3f} s / image ({r['ratio_to_sd']:.2f}x SD) |")
    m = report["mis"]
    lines.append(f"| MIS {m['resolution']} px, {m['steps']} steps | batched set generator vs naive pipeline | "
                 f"{m['batched_images_per_second']:.2f} vs {m['naive_images_per_second']:.2f} img/s "
                 f"({m['speedup']:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", help="M2MConfig preset of the training / sampling checks")
    ap.add_argument("--layout", choices=["full", "small"], default="full", help="random SD folder's scale")
    ap.add_argument("--sd-folder", default=None, help="a local SD-2.1-base folder (default: random, real layout)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=2, help="sets per training micro-batch")
    ap.add_argument("--n-images", type=int, default=5, help="images per set (paper: 5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (H100/H200 dense bf16: 989)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--generated", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25, help="denoising steps of the MIS check")
    ap.add_argument("--captions", type=int, default=2, help="captions per batched MIS call (25 images each)")
    ap.add_argument("--naive-images", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    start = time.perf_counter()
    report: dict[str, Any] = {"args": vars(args), "device_name": torch.cuda.get_device_name()
                              if args.device.startswith("cuda") else "cpu"}
    report["training"] = training_rows(args)
    report["sampling"] = sampling_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        report["mis"] = mis_rows(args, Path(tmp))
    report["seconds"] = time.perf_counter() - start
    print(f"{report['device_name']}, {report['seconds']:.0f} s")
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
