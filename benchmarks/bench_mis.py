"""MIS data throughput on this machine (prints; not a timed test).

1. StableDiffusionSetGenerator (all images of several captions in one denoising batch, text embedded once)
   vs a naive loop calling diffusers' StableDiffusionPipeline once per image: same tiny random model,
   same scheduler (Euler), guidance 7.5, same steps and resolution.
2. Feature-cache images/s (pixel autoencoder + random DINOv2, tiny/demo-style presets).
3. Training-loader examples/s over the feature shards.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_mis.py [--steps 10] [--captions 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing the package

import torch  # noqa: E402

from m2m_pipeline.data import (  # noqa: E402
    Caption,
    build_feature_shards,
    generate_shard,
    get_preset,
    make_loader,
)
from m2m_pipeline.data.generators import image_seed  # noqa: E402
from m2m_pipeline.data.shapes import ShapesSetGenerator, random_captions  # noqa: E402
from m2m_pipeline.data.stable_diffusion import StableDiffusionSetGenerator  # noqa: E402
from m2m_pipeline.data.tiny_sd import build_tiny_stable_diffusion  # noqa: E402

PROMPTS = ["a red dog on a beach", "a bowl of ramen on a wooden table", "a castle in the mountains at dusk",
           "an astronaut riding a horse", "a watercolor painting of a lighthouse", "a cat wearing sunglasses"]


def bench_generation(sd_path: Path, steps: int, num_captions: int, resolution: int, device: str = "cpu",
                     naive_images: int = 25) -> tuple[float, float]:
    """Images/s of the batched set generator and of a naive one-pipeline-call-per-image loop (same dtype:
    the generator's, fp16 on CUDA)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    captions = [Caption(f"bench{i:04d}", PROMPTS[i % len(PROMPTS)]) for i in range(num_captions)]
    batched = StableDiffusionSetGenerator.from_pretrained(sd_path, resolution=resolution, num_inference_steps=steps,
                                                          device=device)
    batched.generate(captions[:1], indices=[0])  # warm-up
    sync()
    start = time.perf_counter()
    sets = batched.generate(captions)
    sync()
    batched_rate = sum(len(s.images) for s in sets) / (time.perf_counter() - start)
    dtype = batched.pipeline.unet.dtype
    del batched

    naive = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False, torch_dtype=dtype,
                                                    use_safetensors=True).to(device)
    naive.scheduler = EulerDiscreteScheduler.from_config(naive.scheduler.config)
    naive.set_progress_bar_config(disable=True)
    # one caption's set (25 images), one pipeline call per image, as a straightforward script would
    naive(PROMPTS[0], num_inference_steps=steps, height=resolution, width=resolution, output_type="np")  # warm-up
    sync()
    start = time.perf_counter()
    for index in range(naive_images):
        generator = torch.Generator(device).manual_seed(image_seed(captions[0].id, index))
        naive(captions[0].text, num_inference_steps=steps, guidance_scale=7.5, height=resolution, width=resolution,
              generator=generator, output_type="np")
    sync()
    naive_rate = naive_images / (time.perf_counter() - start)
    return batched_rate, naive_rate


def bench_features_and_loader(root: Path, num_sets: int) -> tuple[float, float, int]:
    cfg = get_preset("demo").replace(sets_per_shard=max(1, num_sets // 4))
    generator = ShapesSetGenerator(cfg.resolution, cfg.images_per_set, cfg.seed)
    rows = random_captions(num_sets, seed=0)
    captions = [Caption(f"set{i:06d}", text) for i, (_, text) in enumerate(rows)]
    for index in range(0, num_sets, cfg.sets_per_shard):
        generate_shard(index // cfg.sets_per_shard, captions[index : index + cfg.sets_per_shard], generator,
                       root / "mis", cfg, progress=False)
    start = time.perf_counter()
    build_feature_shards(root / "mis", root / "features", cfg, device="cpu", progress=False)
    feature_rate = num_sets * cfg.images_per_set / (time.perf_counter() - start)

    loader = make_loader(root / "features", n_images=5, batch_size=16, num_workers=0, shuffle_buffer=256)
    start = time.perf_counter()
    examples = sum(len(batch["key"]) for batch in loader)
    loader_rate = examples / (time.perf_counter() - start)
    return feature_rate, loader_rate, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps for both SD paths")
    parser.add_argument("--captions", type=int, default=4, help="captions in the batched generator's batch")
    parser.add_argument("--resolution", type=int, default=16, help="pixels per side of the tiny SD images")
    parser.add_argument("--sets", type=int, default=256, help="32 px shapes sets for the feature/loader benchmark")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sd_path = build_tiny_stable_diffusion(root / "tiny-sd", sample_size=args.resolution // 2)
        batched, naive = bench_generation(sd_path, args.steps, args.captions, args.resolution)
        features, loader, examples = bench_features_and_loader(root, args.sets)

    print(f"device: cpu, {torch.get_num_threads()} threads; tiny random SD ({args.resolution} px), Euler, "
          f"guidance 7.5, {args.steps} steps")
    rows = [
        (f"StableDiffusionSetGenerator ({args.captions} captions x 25 images per batch)", batched, "images/s"),
        ("naive StableDiffusionPipeline, one call per image", naive, "images/s"),
        ("speed-up", batched / naive, "x"),
        ("feature cache (pixel latents + random DINOv2, 32 px)", features, "images/s"),
        (f"training loader (N=5, batch 16, {examples} examples)", loader, "examples/s"),
    ]
    for label, value, unit in rows:
        print(f"{label:<66} {value:9.1f} {unit}")

if __name__ == "__main__":
    main()
