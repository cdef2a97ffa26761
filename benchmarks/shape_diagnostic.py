"""Does a model draw shapes at all? (issue 11, docs/model.md "what limits shape"). For the first image generated
after 4 test-set images (position 1, W = 4, guided and unconditional) and for the real 5th image of each set:
the oracle's mean top probability for shape (how recognisable the outline is), the share of images it reads
with >= 0.9 confidence, the distribution of the shapes it reads, and consistency with the set.

    python benchmarks/shape_diagnostic.py --model runs/ablation/latent-dino-2x-steps/final=2:25 \
        --features assets/demo/features --oracle models/demo/oracle --autoencoder models/demo/autoencoder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def shape_stats(oracle, images: torch.Tensor, target: torch.Tensor) -> dict[str, object]:
    """images (B, 3, H, W) in [-1, 1]; target (B,) shape ids."""
    from m2m_pipeline.data.shapes import SHAPES

    p = oracle.probabilities(images[:, None])["shape"][:, 0]  # (B, 4)
    top, read = p.max(-1)
    return {"top_probability": round(float(top.mean()), 3), "confident_share": round(float((top >= 0.9).float().mean()), 3),
            "consistency": round(float((read == target).float().mean()), 3),
            "read_as": {s: round(float((read == i).float().mean()), 3) for i, s in enumerate(SHAPES)}}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="CHECKPOINT=GUIDANCE:STEPS")
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--oracle", type=Path, required=True)
    parser.add_argument("--autoencoder", type=Path, default=None, help="folder with vae/ (latent models)")
    parser.add_argument("--sets", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.evaluation.oracle import AttributeOracle, attribute_targets
    from m2m_pipeline.evaluation.protocol import ProtocolConfig, generate_for_protocol, load_test_sets

    oracle = AttributeOracle.load(args.oracle)
    shards = sorted(str(s) for s in (args.features / "test").glob("mis-*.tar"))
    sets = load_test_sets(shards, args.sets, 5)
    target = attribute_targets(sets.attributes)["shape"]
    results = {}
    for spec in args.model:
        path, _, sampling = spec.rpartition("=")
        guidance, _, steps = sampling.partition(":")
        bundle = load_bundle(path, vae=args.autoencoder)
        real = bundle.autoencoder.decode(sets.latents[:, 4])  # the real 5th image, through the autoencoder
        results.setdefault("real 5th image (autoencoder reconstruction)", shape_stats(oracle, real, target))
        context = dataclasses.replace(sets, latents=sets.latents[:, :4])
        for name, uncond in (("guided", False), ("unconditional", True)):
            cfg = ProtocolConfig(context_images=4, generated_images=1, window=4, steps=int(steps),
                                 guidance_scale=float(guidance), unconditional=uncond)
            _, generated = generate_for_protocol(bundle.net, bundle.autoencoder, context, cfg,
                                                 bundle.context_encoder, progress=False)
            results[f"{Path(path).parent.name} {name}"] = shape_stats(oracle, generated[:, 0], target)
            print(json.dumps({f"{Path(path).parent.name} {name}": results[f"{Path(path).parent.name} {name}"]}),
                  flush=True)
    print("| images | oracle top p (shape) | share read at >= 0.9 | consistency | read as circle / square / "
          "triangle / cross |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['top_probability']:.2f} | {r['confident_share']:.2f} | {r['consistency']:.2f} | "
              + " / ".join(f"{v:.2f}" for v in r["read_as"].values()) + " |")
    if args.autoencoder is not None:
        latent_noise_table(oracle, bundle.autoencoder, sets.latents, target)


@torch.no_grad()
def latent_noise_table(oracle, autoencoder, latents: torch.Tensor, target: torch.Tensor,
                       levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)) -> None:
    """Is the decoder fragile to sampler error? Oracle shape accuracy on decode(z + s * eps) of the test latents
    (B, n, C, h, w), s in latent standard deviations."""
    z = latents.flatten(0, 1)
    std = float(z.std())
    shape = target.repeat_interleave(latents.shape[1])
    g = torch.Generator().manual_seed(0)
    print("| latent noise (x latent std) | " + " | ".join(f"{s:g}" for s in levels) + " |\n|---|"
          + "---|" * len(levels))
    accs = []
    for s in levels:
        x = autoencoder.decode(z + s * std * torch.randn(z.shape, generator=g))
        accs.append(float((oracle.predict(x[:, None])["shape"][:, 0] == shape).float().mean()))
    print("| oracle shape accuracy | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
