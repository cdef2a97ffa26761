"""Training throughput (issue 11): images/s of one optimizer step of M2M-DINO and M2M-Self against a plain
diffusers U-Net of the same size without Image-Set Attention, measured interleaved in one run
(`m2m_pipeline.speed.measure_training_throughput`), then a torch.profiler table of one step of each.

    python benchmarks/bench_training.py --preset demo                 # the CPU figures in docs/model.md
    python benchmarks/bench_training.py --preset demo --threads 1     # one core, as make demo trains
"""

from __future__ import annotations

import argparse

import torch

from m2m_pipeline.speed import format_training_table, measure_training_throughput, training_step_fns


def profile_step(preset: str, batch_size: int, n_images: int, device: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for name, (_, step) in training_step_fns(preset, batch_size, n_images, torch.device(device)).items():
        step()  # warm-up
        with profile(activities=activities) as prof:
            step()
        print(f"\n--- torch.profiler, one training step of {name} (top {rows} by self CPU time) ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch-size", type=int, default=None, help="sets per step (default: the training preset's)")
    ap.add_argument("--n-images", type=int, default=None, help="images per set (default: the training preset's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile-rows", type=int, default=12, help="rows of the profiler table (0: no profile)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from m2m_pipeline.training import TrainConfig

    tc = TrainConfig.preset(args.preset) if args.preset in ("tiny", "demo", "paper") else TrainConfig()
    b, n = args.batch_size or tc.batch_size, args.n_images or tc.n_images
    print(f"preset={args.preset} device={args.device} threads={torch.get_num_threads()} batch={b} sets x {n} "
          f"images, {args.repeats} interleaved rounds (median)")
    rows = measure_training_throughput(args.preset, batch_size=b, n_images=n, repeats=args.repeats,
                                       device=args.device)
    print(format_training_table(rows))
    by = {r.method: r for r in rows}
    print(f"DINO / baseline = {by['dino'].ratio_to_baseline:.2f} (target <= 1.15); "
          f"Self / baseline = {by['self'].ratio_to_baseline:.2f} (target <= 2.2); online DINO store: "
          f"DINO-online / DINO = {by['dino-online'].seconds_per_step / by['dino'].seconds_per_step:.2f}")
    if args.profile_rows:
        profile_step(args.preset, b, n, args.device, args.profile_rows)


if __name__ == "__main__":
    main()
