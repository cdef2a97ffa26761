"""What the evaluation assets compute today: sample grids and sampling speed (FID / CLIP scores come with
the evaluation issue). Plain functions over checkpoints and test feature shards; no dagster here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2m_pipeline.data.io import atomic_write_bytes
from m2m_pipeline.orchestration.resources import ComputeResource, Resolved


def load_test_sets(test_dir: Path, num_sets: int, num_images: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first `num_images` latents (in index order) of the first `num_sets` test sets: (B, n, C, H, W)."""
    from m2m_pipeline.data import read_samples
    from m2m_pipeline.data.shards import decode_npy

    shards = sorted(test_dir.glob("mis-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no test feature shards in {test_dir}")
    latents, keys, captions = [], [], []
    for raw in read_samples(shards):
        z = decode_npy(raw, "latents.npy", raw["__url__"], raw["__key__"])
        if len(z) < num_images:
            raise ValueError(f"{raw['__url__']}: set {raw['__key__']} has {len(z)} images, need {num_images}")
        latents.append(torch.from_numpy(z[:num_images].astype(np.float32)))
        keys.append(raw["__key__"])
        captions.append(raw["caption.txt"].decode("utf-8"))
        if len(latents) == num_sets:
            break
    return torch.stack(latents), keys, captions


def _model(checkpoint: Path, r: Resolved, compute: ComputeResource) -> tuple[Any, Any, Any]:
    from m2m_pipeline.data import load_feature_encoders
    from m2m_pipeline.network import M2MUNet

    device = compute.resolved_device()
    if not (checkpoint / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}; materialize the training asset first")
    net = M2MUNet.from_pretrained(checkpoint, map_location=device).eval()
    autoencoder, dino = load_feature_encoders(r.mis, device)
    encoder = None
    if net.config.variant == "dino":
        encoder = lambda z: dino.encode(autoencoder.decode(z))
    return net, autoencoder, encoder


def _decode(autoencoder: Any, z: torch.Tensor) -> torch.Tensor:
    b, k = z.shape[:2]
    return autoencoder.decode(z.flatten(0, 1)).unflatten(0, (b, k)).cpu()


@torch.no_grad()
def sample_report(r: Resolved, variant: str, checkpoint: Path, test_dir: Path, out: Path, compute: ComputeResource,
                  seed: int = 0) -> dict[str, Any]:
    """Generate `eval.generated_images` images after `eval.context_images` test images for `eval.num_sets`
    sets; write grid.png (preceding | generated) and report.json."""
    from m2m_pipeline.sampling import generate
    from m2m_pipeline.visualize import save_set_grid

    ev = r.eval
    net, autoencoder, encoder = _model(checkpoint, r, compute)
    if net.config.variant != variant:
        raise ValueError(f"{checkpoint} holds an M2M-{net.config.variant} model, expected M2M-{variant}")
    context, keys, captions = load_test_sets(test_dir, ev.num_sets, ev.context_images)
    context = context.to(net.device)
    start = time.perf_counter()
    z = generate(net, context, ev.generated_images, context_encoder=encoder, steps=ev.steps,
                 guidance_scale=ev.guidance_scale, window=ev.window,
                 seed=[seed + i for i in range(len(keys))], progress=False)  # own noise per set
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 64 // context.shape[-1])
    grid = save_set_grid(_decode(autoencoder, context), _decode(autoencoder, z), out / "grid.png", scale=scale)
    report = {"variant": variant, "checkpoint": str(checkpoint), "sets": len(keys), "keys": keys,
              "captions": captions, "context_images": ev.context_images, "generated_images": ev.generated_images,
              "steps": ev.steps, "guidance_scale": ev.guidance_scale, "window": ev.window, "seed": seed,
              "seconds": seconds, "seconds_per_image": seconds / max(1, len(keys) * ev.generated_images),
              "device": str(net.device)}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return {**report, "grid": grid, "report": out / "report.json"}


def benchmark(r: Resolved, checkpoints: dict[str, Path], out: Path, compute: ComputeResource
              ) -> tuple[list[dict[str, Any]], Path]:
    """Fig. 9: seconds per generated image of the SD baseline, M2M-DINO and M2M-Self (KV cache on / off) at
    each context size, with ratios to the SD baseline measured in the same run; writes speed.json + fig9.png."""
    from m2m_pipeline.network import M2MUNet
    from m2m_pipeline.speed import measure_sampling_speed, plot_speed, rows_to_dicts

    ev = r.eval
    device = compute.resolved_device()
    nets = {v: M2MUNet.from_pretrained(c, map_location=device) for v, c in checkpoints.items()}
    preset = r.net_preset
    speed = measure_sampling_speed(preset, ev.benchmark_contexts, steps=ev.benchmark_steps,
                                   generated=ev.benchmark_images, repeats=ev.benchmark_repeats,
                                   guidance=ev.guidance_scale, device=device, nets=nets)
    rows = [{**row, "steps": ev.benchmark_steps, "images": ev.benchmark_images, "device": device}
            for row in rows_to_dicts(speed)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "benchmark.json", (json.dumps(rows, indent=1) + "\n").encode())
    plot = plot_speed(speed, out / "fig9.png", f"Sampling time per image ({r.profile.name}, {device})")
    return rows, plot
