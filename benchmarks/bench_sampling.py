"""Sampling speed per generated image (Fig. 9): SD baseline vs M2M-DINO vs M2M-Self (cached / uncached).

All models share the preset's U-Net dimensions and are measured in one run, on one machine, with DDIM,
classifier-free guidance (both branches in one batch) and the same number of steps. The SD baseline is the
same U-Net with its text cross-attention and a 77-token text context. Prints a table and ratios to SD.

    python benchmarks/bench_sampling.py --preset demo            # CPU figures in the closing note
    python benchmarks/bench_sampling.py --preset paper --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from m2m_pipeline.encoders import DinoEncoder, PixelAutoencoder
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.sampling import classifier_free_guidance, generate, make_ddim


@torch.no_grad()
def sd_baseline(unet: UNet2DConditionModel, cfg: M2MConfig, num_images: int, steps: int, guidance: float,
                device: torch.device) -> None:
    """Text-to-image sampling with the plain U-Net: 77 text tokens, CFG, DDIM (what SD's pipeline does)."""
    text = torch.randn(2, 77, cfg.cross_attention_dim, device=device)  # [uncond; cond] prompt embeddings
    scheduler = make_ddim(cfg, steps)
    for _ in range(num_images):
        z = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
        for t in scheduler.timesteps:
            eps = unet(torch.cat([z, z]), t, encoder_hidden_states=text).sample
            u, c = eps.chunk(2)
            z = scheduler.step(classifier_free_guidance(u, c, guidance), t, z).prev_sample


def timed_round_robin(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, measured interleaved (one call of each per round) so that drift in
    machine load hits every configuration alike; one untimed warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up: allocator growth, thread-pool start, kernel selection
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--generated", type=int, default=2, help="images generated per measurement")
    ap.add_argument("--context", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    cfg = M2MConfig.preset(args.preset)
    sd = UNet2DConditionModel(**cfg.unet_kwargs()).to(device).eval()
    nets = {v: M2MUNet(M2MConfig.preset(args.preset, v)).to(device).eval() for v in ("self", "dino")}
    # DINO encoder of the generated images is part of M2M-DINO's cost: the preset's own size for CPU presets.
    if args.preset == "paper":
        from transformers import Dinov2Config, Dinov2Model

        dino = DinoEncoder(Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                                    intermediate_size=6144, patch_size=14, image_size=224)),
                           image_size=224, resize_size=256).to(device)
        decode = None  # a VAE decode would add the same cost to every row; leave it out
    else:
        dino = DinoEncoder.random(image_size=cfg.image_size, hidden_size=cfg.dino_dim, seed=0).to(device)
        decode = PixelAutoencoder().decode

    def dino_of(z: torch.Tensor) -> torch.Tensor:
        images = decode(z) if decode else torch.rand(z.shape[0], 3, 224, 224, device=z.device) * 2 - 1
        return dino.encode(images)

    k, steps = args.generated, args.steps
    print(f"preset={args.preset} device={device} threads={torch.get_num_threads()} DDIM steps={steps} "
          f"guidance={args.guidance} generated per run={k} repeats={args.repeats} (median)")
    fns = {"sd": lambda: sd_baseline(sd, cfg, k, steps, args.guidance, device)}
    for n in args.context:
        ctx = torch.randn(1, n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
        common = dict(steps=steps, guidance_scale=args.guidance, window=n, progress=False)
        fns[f"dino/{n}"] = lambda ctx=ctx, common=common: generate(nets["dino"], ctx, k, context_encoder=dino_of,
                                                                   **common)
        fns[f"self_cached/{n}"] = lambda ctx=ctx, common=common: generate(nets["self"], ctx, k, use_cache=True,
                                                                          **common)
        fns[f"self_uncached/{n}"] = lambda ctx=ctx, common=common: generate(nets["self"], ctx, k, use_cache=False,
                                                                            **common)
    t = {name: seconds / k for name, seconds in timed_round_robin(fns, args.repeats).items()}
    sd_time = t["sd"]
    rows = [(n, t[f"dino/{n}"], t[f"self_cached/{n}"], t[f"self_uncached/{n}"]) for n in args.context]

    print(f"\nseconds per generated image (SD baseline, text-to-image: {sd_time:.3f} s)")
    print(f"{'context':>7} | {'SD':>7} | {'DINO':>7} | {'Self cached':>11} | {'Self uncached':>13} | "
          f"{'DINO/SD':>7} | {'SelfC/SD':>8} | {'SelfU/SD':>8}")
    for n, td, tc, tu in rows:
        print(f"{n:>7} | {sd_time:7.3f} | {td:7.3f} | {tc:11.3f} | {tu:13.3f} | {td / sd_time:7.2f} | "
              f"{tc / sd_time:8.2f} | {tu / sd_time:8.2f}")


if __name__ == "__main__":
    main()
