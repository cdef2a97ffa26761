"""Sampling speed per generated image (Fig. 9): SD baseline vs M2M-DINO vs M2M-Self (cached / uncached).

Measured in one run with `m2m_pipeline.speed.measure_sampling_speed` (see there for what is timed); prints
the table with ratios to the SD baseline of the same run and writes the Fig. 9 plot.

    python benchmarks/bench_sampling.py --preset demo            # CPU figures in docs/model.md
    python benchmarks/bench_sampling.py --preset paper --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from m2m_pipeline.speed import (
    format_table,
    measure_sampling_speed,
    plot_speed,
    rows_to_dicts,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--generated", type=int, default=2, help="images generated per measurement")
    ap.add_argument("--context", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_sampling"), help="folder for fig9.png + json")
    args = ap.parse_args()
    print(f"preset={args.preset} device={args.device} threads={torch.get_num_threads()} DDIM steps={args.steps} "
          f"guidance={args.guidance} generated per run={args.generated} repeats={args.repeats} (median)")
    rows = measure_sampling_speed(args.preset, args.context, steps=args.steps, generated=args.generated,
                                  repeats=args.repeats, guidance=args.guidance, device=args.device)
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(rows_to_dicts(rows), indent=1) + "\n")
    print(f"plot: {plot_speed(rows, args.out / 'fig9.png', f'Sampling time per image ({args.preset})')}")


if __name__ == "__main__":
    main()
