"""DPM-Solver++ at 10 / 20 steps against the paper's DDIM 50 (issue 13): position-1 oracle consistency on the test
sets and seconds per generated image, each model at its own guidance scale, all samplers measured in one run.

    python benchmarks/bench_samplers.py --model models/demo/m2m_dino/final=3 --model models/demo/m2m_self/final=2 \
        --features assets/demo/features --oracle models/demo/oracle --threads 1

Prints a markdown table; writes it with the raw numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETTINGS = (("ddim", 50), ("ddim", 25), ("dpm++", 20), ("dpm++", 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="CHECKPOINT=GUIDANCE",
                        help="a checkpoint folder and its (validation-chosen) guidance scale; repeatable")
    parser.add_argument("--features", type=Path, required=True, help="feature caches with a test/ split")
    parser.add_argument("--oracle", type=Path, required=True)
    parser.add_argument("--sets", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_samplers.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.evaluation.learnability import position1_consistency
    from m2m_pipeline.evaluation.oracle import AttributeOracle
    from m2m_pipeline.evaluation.protocol import load_test_sets

    oracle = AttributeOracle.load(args.oracle)
    test_shards = sorted(str(s) for s in (args.features / "test").glob("mis-*.tar"))
    sets = load_test_sets(test_shards, args.sets, 4)
    rows = []
    for spec in args.model:
        path, sep, guidance = spec.rpartition("=")
        if not sep:
            parser.error(f"--model {spec!r}: expected CHECKPOINT=GUIDANCE")
        bundle = load_bundle(path)
        bundle.check_cache(test_shards)
        for sampler, steps in SETTINGS:
            start = time.perf_counter()
            c = position1_consistency(bundle.net, bundle.autoencoder, sets, oracle, context_images=4, steps=steps,
                                      guidance_scale=float(guidance), window=4, context_encoder=bundle.context_encoder,
                                      sampler=sampler)
            seconds = (time.perf_counter() - start) / len(sets.keys)
            rows.append({"model": f"M2M-{bundle.net.config.variant}", "checkpoint": path, "sampler": sampler,
                         "steps": steps, "guidance_scale": float(guidance), "seconds_per_image": seconds, **c})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| model | sampler | steps | colour | background | shape | s / image | vs DDIM 50 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and (b["sampler"], b["steps"]) == ("ddim", 50))
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['colour']:.2f} | {r['background']:.2f} | "
                     f"{r['shape']:.2f} | {r['seconds_per_image']:.3f} | "
                     f"{r['seconds_per_image'] / base['seconds_per_image']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "table": table, "sets": len(sets.keys)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
