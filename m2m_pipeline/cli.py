"""The `m2m` console script: train, train-autoencoder, train-base-model, generate, demo, evaluate, finetune, evaluate-task."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from m2m_pipeline.autoencoder import AUTOENCODER_PRESETS
from m2m_pipeline.base_model import BASE_MODEL_PRESETS
from m2m_pipeline.data.config import MIS_PRESETS
from m2m_pipeline.network.config import NOISE_SCHEDULES, PRESETS
from m2m_pipeline.sampling import CONTEXT_POLICIES, DEFAULT_POLICY, SCHEDULERS
from m2m_pipeline.cli_types import (
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    FiniteFloat,
    FriendlyGroup,
)

if TYPE_CHECKING:
    from m2m_pipeline.tracking import MlflowRun


def _base_preset(net_preset: str) -> str:
    """The MIS / training / autoencoder preset of a network preset: "demo-pixel" and "demo" share "demo"."""
    return net_preset.split("-")[0]


# --preset choices, read from the presets themselves: every network preset (train), the network presets whose
# MIS preset is the procedural shapes world (demo, --data procedural), the procedural MIS presets (probes).
NET_PRESETS = sorted(PRESETS)
PROCEDURAL_MIS_PRESETS = sorted(name for name, cfg in MIS_PRESETS.items() if cfg.generator == "shapes")
PROCEDURAL_NET_PRESETS = [p for p in NET_PRESETS if _base_preset(p) in PROCEDURAL_MIS_PRESETS]


def _procedural_features(net_preset: str, workdir: Path, progress: bool = True) -> Path:
    """Caption TSV -> filtered table -> MIS shards -> feature shards for the procedural shapes world, with the
    autoencoder a latent preset diffuses (trained into WORKDIR/autoencoder first). Returns the train split's
    feature folder; the feature manifests, and so the checkpoints trained on them, record the autoencoder."""
    from m2m_pipeline.autoencoder import (
        REPORT_NAME,
        AutoencoderConfig,
        train_autoencoder,
    )
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.data.procedural import build_procedural_mis
    from m2m_pipeline.network import M2MConfig

    cfg = get_preset(_base_preset(net_preset))
    if cfg.generator != "shapes":
        raise click.UsageError(f"--data procedural needs a procedural MIS preset; '{net_preset}' uses {cfg.generator}")
    if M2MConfig.preset(net_preset).autoencoder == "vae":
        autoencoder = workdir / "autoencoder"
        if not (autoencoder / REPORT_NAME).is_file():
            train_autoencoder(AutoencoderConfig.preset(_base_preset(net_preset)), autoencoder, progress=progress)
        cfg = cfg.replace(autoencoder="vae", autoencoder_path=str(autoencoder))
    return build_procedural_mis(cfg, workdir, progress=progress)["train"]


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: M2M_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """M2M: many-to-many image generation with auto-regressive diffusion models."""
    ctx.meta["m2m.debug"] = debug


@main.command()
@click.option("--preset", type=click.Choice(NET_PRESETS), default="demo",
              show_default=True, help="Network preset (M2MConfig); training and MIS presets: the name before '-'.")
@click.option("--variant", type=click.Choice(["self", "dino"]), default="self", show_default=True,
              help="M2M-Self (clean latents through the U-Net) or M2M-DINO (DINOv2 tokens).")
@click.option("--data", "data", default="procedural", show_default=True,
              help="Feature shards (folder, glob or brace pattern) or 'procedural' to build the shapes world first.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: checkpoints land in OUT/checkpoint-<step>/ and OUT/final/.")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Optimizer steps (default: the preset's).")
@click.option("--batch-size", type=POSITIVE_INT, default=None, help="Image sets per step (default: the preset's).")
@click.option("--lr", type=POSITIVE_FLOAT, default=None, help="AdamW learning rate (default: the preset's).")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Local Stable Diffusion folder: initialise from its U-Net (Sec. 6.1).")
@click.option("--from-scratch", is_flag=True, default=False,
              help="Train from random weights; required (and warned about) for the paper preset without --init-from.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seed of data order, noise and drops.")
@click.option("--resume", "resume_from", default=None,
              help="Continue from a checkpoint folder, or 'latest' (the newest complete one in OUT; none: start).")
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=None,
              help="Wall-clock budget; stops cleanly and saves (0: none).")
@click.option("--grad-accum", type=POSITIVE_INT, default=None, help="Micro-batches per optimizer step (default: preset's).")
@click.option("--global-batch-size", type=POSITIVE_INT, default=None,
              help="Global batch; gradient accumulation is derived from it and the number of processes.")
@click.option("--ema/--no-ema", default=None, help="Keep an EMA of the weights (default: on).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward (default: the preset's).")
@click.option("--checkpoint-every", type=NON_NEGATIVE_INT, default=None,
              help="Steps between checkpoints (0: only the final one; default: preset's).")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI: log step-wise metrics there (rank 0).")
def train(preset: str, variant: str, data: str, out_dir: Path, steps: int | None, batch_size: int | None,
          lr: float | None, init_from: Path | None, from_scratch: bool, seed: int, resume_from: str | None, max_seconds: float | None,
          grad_accum: int | None, global_batch_size: int | None, ema: bool | None,
          gradient_checkpointing: bool | None, checkpoint_every: int | None, mlflow_uri: str | None) -> None:
    """Train M2M on MIS feature shards. For several processes/GPUs: `accelerate launch [--num_processes P]
    -m m2m_pipeline.cli train ...` (docs/training.md)."""
    from m2m_pipeline.network import M2MConfig
    from m2m_pipeline.training import TrainConfig, initial_network
    from m2m_pipeline.training import train as run_training

    net_cfg = M2MConfig.preset(preset, variant)
    options = {"steps": steps, "batch_size": batch_size, "lr": lr, "grad_accum": grad_accum,
               "global_batch_size": global_batch_size, "use_ema": ema, "checkpoint_every": checkpoint_every,
               "gradient_checkpointing": gradient_checkpointing}
    overrides = {k: v for k, v in options.items() if v is not None}
    if grad_accum is not None and global_batch_size is None:
        overrides["global_batch_size"] = 0  # an explicit accumulation wins over the preset's global batch
    # this variant's own subset and derived steps (the paper: 9 M sets for Self, 6 M for DINO)
    train_cfg = TrainConfig.preset(_base_preset(preset), seed=seed, **overrides).for_variant(variant)
    shards = _procedural_features(preset, out_dir / "data") if data == "procedural" else data
    try:
        net = initial_network(init_from, net_cfg, from_scratch)
    except ValueError as exn:
        raise click.UsageError(str(exn)) from exn
    with _tracked(mlflow_uri, f"m2m-{variant}-{preset}",
                  {"preset": preset, "variant": variant, **train_cfg.to_dict()}) as run:
        result = run_training(net_cfg, train_cfg, shards, out_dir, net=net, on_metrics=run.metrics_logger("train"),
                              resume_from=resume_from, max_seconds=max_seconds)
    click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; final loss {result.final_loss:.4f}; "
               f"skipped {result.skipped_steps}; checkpoint {result.checkpoint_dir}"
               + (" (time budget reached)" if result.stopped_early else ""))


@main.command("train-autoencoder")
@click.option("--preset", type=click.Choice(sorted(AUTOENCODER_PRESETS)), default="demo", show_default=True,
              help="AutoencoderConfig preset (m2m_pipeline/autoencoder.py).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: OUT/vae/ (load it with VaeAutoencoder.from_pretrained(OUT)), OUT/autoencoder.json.")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Optimizer steps (default: the preset's).")
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=None,
              help="Wall-clock cap (default: the preset's; 0: none).")
@click.option("--latent-channels", type=POSITIVE_INT, default=None, help="C of the latents (preset's).")
@click.option("--block-out-channels", default=None,
              help="Comma-separated channels per level, e.g. 32,64,64 (f = 2^(levels - 1); preset's).")
@click.option("--crop-size", type=NON_NEGATIVE_INT, default=None,
              help="Train on random crops of this size except the last --full-image-steps (0: whole images).")
@click.option("--full-image-steps", type=NON_NEGATIVE_INT, default=None, help="Last steps on whole images.")
@click.option("--initial-logvar", type=FiniteFloat(min=-20.0, max=5.0), default=None,
              help="Initial posterior log-variance (preset's).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's).")
@click.option("--oracle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An attribute-oracle folder: also report its accuracy on held-out reconstructions.")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI: log the run there.")
def train_autoencoder_cmd(preset: str, out_dir: Path, steps: int | None, max_seconds: float | None,
                          latent_channels: int | None, block_out_channels: str | None, crop_size: int | None,
                          full_image_steps: int | None, initial_logvar: float | None, seed: int,
                          threads: int | None, oracle: Path | None, mlflow_uri: str | None) -> None:
    """Train the CPU presets' AutoencoderKL on the procedural shapes world (SD's VAE role; docs/model.md)."""
    import torch

    from m2m_pipeline.autoencoder import (
        AutoencoderConfig,
        oracle_reconstruction_accuracy,
        train_autoencoder,
    )

    if threads:
        torch.set_num_threads(threads)
    channels = None
    if block_out_channels is not None:
        try:
            channels = tuple(int(c) for c in block_out_channels.split(","))
        except ValueError:
            raise click.BadParameter(f"{block_out_channels!r} is not a comma-separated list of integers",
                                     param_hint="--block-out-channels") from None
    overrides = {k: v for k, v in {"steps": steps, "max_seconds": max_seconds, "latent_channels": latent_channels,
                                   "block_out_channels": channels, "crop_size": crop_size,
                                   "full_image_steps": full_image_steps, "initial_logvar": initial_logvar}.items()
                 if v is not None}
    cfg = AutoencoderConfig.preset(preset, seed=seed, **overrides)
    with _tracked(mlflow_uri, f"autoencoder-{preset}", {"preset": preset, "kind": "autoencoder", **cfg.to_dict()}) as run:
        report = train_autoencoder(cfg, out_dir, on_metrics=run.metrics_logger("autoencoder"))
    click.echo(f"autoencoder: {report['steps']} steps in {report['train_seconds']:.0f} s; latents "
               f"{tuple(report['latent_shape'])} (f = {report['downsample']}); held-out PSNR "
               f"{report['heldout_psnr_db']:.2f} dB; saved to {out_dir}/vae")
    if oracle is not None:
        from m2m_pipeline.evaluation.oracle import AttributeOracle

        acc = oracle_reconstruction_accuracy(out_dir, AttributeOracle.load(oracle))
        click.echo("oracle accuracy on held-out reconstructions: " + ", ".join(
            f"{k} {v:.4f}" for k, v in acc["reconstruction"].items()) + f" ({acc['images']} images)")


@main.command("train-base-model")
@click.option("--preset", type=click.Choice(sorted(BASE_MODEL_PRESETS)), default="demo", show_default=True,
              help="BaseModelConfig preset (m2m_pipeline/base_model.py).")
@click.option("--autoencoder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder with vae/ (m2m train-autoencoder's output, or models/demo/autoencoder).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output: a Stable Diffusion pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/); "
                   "start M2M from it with `m2m train --init-from OUT`.")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Optimizer steps (default: the preset's).")
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=None,
              help="Wall-clock budget (default: the preset's; 0: none).")
@click.option("--schedule", type=click.Choice(sorted(NOISE_SCHEDULES)), default=None,
              help="Noise schedule instead of the network preset's (M2M started from it must use the same).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's).")
@click.option("--oracle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An attribute-oracle folder: report its accuracy on samples of held-out captions.")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI: log the run there.")
def train_base_model_cmd(preset: str, autoencoder: Path, out_dir: Path, steps: int | None, max_seconds: float | None,
                         schedule: str | None, seed: int, threads: int | None, oracle: Path | None, mlflow_uri: str | None) -> None:
    """Train the CPU presets' text-to-image model (SD-2.1-base's role; M2M starts from it, Sec. 6.1)."""
    import torch

    from m2m_pipeline.base_model import BaseModelConfig, train_base_model

    if threads:
        torch.set_num_threads(threads)
    overrides = {k: v for k, v in {"steps": steps, "max_seconds": max_seconds, "schedule": schedule}.items()
                 if v is not None}
    cfg = BaseModelConfig.preset(preset, seed=seed, **overrides)
    judge = None
    if oracle is not None:
        from m2m_pipeline.evaluation.oracle import AttributeOracle

        judge = AttributeOracle.load(oracle)
    with _tracked(mlflow_uri, f"base-model-{preset}", {"preset": preset, "kind": "base_model", **cfg.to_dict()}) as run:
        report = train_base_model(cfg, autoencoder, out_dir, oracle=judge, on_metrics=run.metrics_logger("base_model"))
        run.log_metrics({f"base_model/samples_{k}": v for k, v in report.get("oracle_accuracy", {}).items()})
    click.echo(f"base model: {report['steps']} steps in {report['train_seconds']:.0f} s; saved to {out_dir}")
    if "oracle_accuracy" in report:
        click.echo("oracle accuracy on samples of held-out captions: " + ", ".join(
            f"{k} {v:.4f}" for k, v in report["oracle_accuracy"].items()))


def _tracked(uri: str | None, run_name: str, params: dict) -> "MlflowRun":
    """The MLflow run of a CLI training (rank 0, when --mlflow-uri is given; otherwise a no-op run)."""
    import os

    from m2m_pipeline.tracking import MlflowRun, NullRun

    if not uri or int(os.environ.get("RANK", "0")) != 0:
        return NullRun()
    run = MlflowRun.start(run_name, tracking_uri=uri)
    run.log_params(params)
    return run


def _to_rgb(img):
    """Any PIL mode -> 8-bit RGB. Transparency is composited over white (the usual background of object
    renders); 16/32-bit and float greyscale are rescaled to 8 bits first, since PIL's own convert("RGB")
    clips them (a 16-bit PNG would come out almost white)."""
    import numpy as np
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255) else 255.0
        top = 1.0 if img.mode == "F" and a.max() <= 1.0 else top
        img = Image.fromarray(np.clip(np.rint(a / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _read_images(paths: list[Path], size: int):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
        elif p.is_file():
            files.append(p)
        else:
            raise click.BadParameter(f"{p} is neither an image file nor a folder", param_hint="--context")
    if not files:
        raise click.BadParameter(f"no images found in {[str(p) for p in paths]}", param_hint="--context")
    images = []
    for f in files:
        try:
            img = _to_rgb(Image.open(f))  # any mode (1, L, I;16, P, RGBA, CMYK) -> RGB
        except OSError as e:
            raise click.BadParameter(f"cannot read image {f}: {e}", param_hint="--context") from e
        img = ImageOps.fit(img, (size, size), Image.BICUBIC)  # centre crop to square, then resize
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)[None], files  # (1, n, 3, H, W)


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="M2M checkpoint folder (config.json + model.safetensors).")
@click.option("--context", "context", type=click.Path(path_type=Path), multiple=True,
              help="Preceding images: a folder or image files (repeatable), in order. None: generate from scratch.")
@click.option("--num-images", "-k", type=POSITIVE_INT, default=4, show_default=True, help="Images to generate.")
@click.option("--steps", type=POSITIVE_INT, default=50, show_default=True, help="Denoising steps.")
@click.option("--sampler", type=click.Choice(sorted(SCHEDULERS)), default="ddim", show_default=True,
              help="ddim: the paper's DDIM (eta 0); dpm++: DPM-Solver++ (2nd order), ~10-20 steps.")
@click.option("--guidance", type=NON_NEGATIVE_FLOAT, default=7.5, show_default=True, help="Image guidance s (Eq. 6) / s_I (Eq. 7).")
@click.option("--task-guidance", type=NON_NEGATIVE_FLOAT, default=None, help="Task guidance s_C (Eq. 7), task models only.")
@click.option("--policy", type=click.Choice(sorted(CONTEXT_POLICIES)), default=DEFAULT_POLICY, show_default=True,
              help="Which earlier images each new image sees: anchors-4 keeps the first 4 images + the 4 most "
                   "recent (against drift, docs/evaluation.md 'Drift'); window-4 is the paper's sliding window; all: every one.")
@click.option("--window", type=NON_NEGATIVE_INT, default=None,
              help="Context window W, overriding --policy's (0: no context).")
@click.option("--anchors", type=NON_NEGATIVE_INT, default=None, help="First images always kept in the window, "
                                                                    "overriding --policy's.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="Seed; image k depends on (seed, k) only.")
@click.option("--no-cache", is_flag=True, help="Recompute context keys/values at every step (slower, same images).")
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="Local Stable Diffusion folder for the VAE (latent-space checkpoints).")
@click.option("--dino", type=click.Path(path_type=Path), default=None,
              help="Local DINOv2 folder (M2M-DINO); default for pixel presets: the seeded random encoder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder for generated PNGs and grid.png.")
def generate(checkpoint: Path, context: tuple[Path, ...], num_images: int, steps: int, sampler: str, guidance: float,
             task_guidance: float | None, policy: str, window: int | None, anchors: int | None, seed: int,
             no_cache: bool, vae: Path | None, dino: Path | None, out_dir: Path) -> None:
    """Continue a set of images with a trained M2M checkpoint."""
    import torch

    chosen = CONTEXT_POLICIES[policy]
    window = chosen.window if window is None else window
    anchors = chosen.anchors if anchors is None else anchors

    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.sampling import generate_images
    from m2m_pipeline.visualize import save_set_grid

    bundle = load_bundle(checkpoint, vae=vae, dino=dino)  # errors name the file or the option (one line)
    net, cfg, autoencoder, dino_encoder = bundle.net, bundle.net.config, bundle.autoencoder, bundle.dino
    if context:
        images, _ = _read_images(list(context), cfg.image_size)
    else:
        images = torch.zeros(1, 0, 3, cfg.image_size, cfg.image_size)
    out = generate_images(net, images, num_images, autoencoder, dino_encoder, steps=steps, sampler=sampler,
                          guidance_scale=guidance, task_guidance_scale=task_guidance, window=window, anchors=anchors, seed=seed,
                          use_cache=not no_cache)
    from PIL import Image

    from m2m_pipeline.visualize import to_uint8

    out_dir.mkdir(parents=True, exist_ok=True)

    for k, arr in enumerate(to_uint8(out[0])):
        Image.fromarray(arr).save(out_dir / f"generated_{k:03d}.png")
    grid = save_set_grid(images, out, out_dir / "grid.png", scale=max(1, 128 // cfg.image_size))
    click.echo(f"wrote {num_images} images and {grid}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Output folder.")
@click.option("--variant", type=click.Choice(["self", "dino"]), default="self", show_default=True)
@click.option("--steps", type=POSITIVE_INT, default=300, show_default=True, help="Training steps (brief demo).")
@click.option("--preset", type=click.Choice(PROCEDURAL_NET_PRESETS), default="demo",
              show_default=True)
def demo(out_dir: Path, variant: str, steps: int, preset: str) -> None:
    """Train the demo preset briefly on the procedural world and write a preceding | generated grid."""

    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.data import make_loader
    from m2m_pipeline.network import M2MConfig
    from m2m_pipeline.sampling import generate
    from m2m_pipeline.training import TrainConfig
    from m2m_pipeline.training import train as run_training
    from m2m_pipeline.visualize import save_set_grid

    start = time.perf_counter()
    features = _procedural_features(preset, out_dir / "data")
    net_cfg = M2MConfig.preset(preset, variant)
    result = run_training(net_cfg, TrainConfig.preset(_base_preset(preset), steps=steps), features,
                          out_dir / variant)

    bundle = load_bundle(result.checkpoint_dir)  # the encoders its features were built with
    net, ae = bundle.net, bundle.autoencoder
    batch = next(iter(make_loader(features, n_images=4, batch_size=4, seed=123)))
    context = batch["latents"]
    out = generate(net, context, 4, context_encoder=bundle.context_encoder, steps=25, guidance_scale=3.0, seed=0)
    decode = lambda z: ae.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2])  # noqa: E731
    grid = save_set_grid(decode(context), decode(out), out_dir / f"grid_{variant}.png", scale=4)
    click.echo(f"demo done in {time.perf_counter() - start:.0f} s: loss {result.losses[0]:.3f} -> "
               f"{result.final_loss:.3f}; grid {grid}")


@main.command("ablation")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/ablation"),
              show_default=True, help="Rows land in OUT/<row>/, the table in OUT/ablation.md.")
@click.option("--rows", "rows", multiple=True, help="Rows to run (repeat; default: all of m2m_pipeline/ablation.py).")
@click.option("--row", "single", default=None, hidden=True, help="Run one row in this process (used by the runner).")
@click.option("--seconds", type=POSITIVE_FLOAT, default=900.0, show_default=True,
              help="Wall-clock training budget of every row.")
@click.option("--parallel", type=POSITIVE_INT, default=2, show_default=True, help="Rows trained at once.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch threads (the runner gives each row 1).")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Repository root holding make demo's assets/demo and models/demo.")
@click.option("--trained", "trained_args", multiple=True, metavar="ROW=CHECKPOINT",
              help="Evaluate ROW from a checkpoint trained with exactly its configuration instead of training it "
                   "(e.g. latent-dino=models/demo/m2m_dino/final); refused if the configuration differs.")
@click.option("--table-only", is_flag=True, help="Only rebuild OUT/ablation.md from the rows already run.")
def ablation_cmd(out_dir: Path, rows: tuple[str, ...], single: str | None, seconds: float, parallel: int,
                 threads: int | None, root: Path, trained_args: tuple[str, ...], table_only: bool) -> None:
    """The learnability ablation (docs/model.md): pixel vs latent and more, same budget and protocol."""
    from m2m_pipeline import ablation

    trained = {}
    for arg in trained_args:
        name, sep, path = arg.partition("=")
        if not sep or not Path(path).is_dir():
            raise click.BadParameter(f"{arg!r}: expected ROW=CHECKPOINT with an existing checkpoint folder",
                                     param_hint="--trained")
        trained[name] = Path(path).resolve()

    if threads:
        import torch

        torch.set_num_threads(threads)
    inputs = ablation.AblationInputs.from_demo(root.resolve(), out_dir.resolve())
    names = list(rows) or [r.name for r in ablation.ROWS]
    unknown = [n for n in names + ([single] if single else []) + list(trained) if n not in ablation.ROWS_BY_NAME]
    if unknown:
        raise click.BadParameter(f"unknown rows {unknown}; choose from {sorted(ablation.ROWS_BY_NAME)}",
                                 param_hint="--rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    if single:
        record = ablation.run_row(single, inputs, seconds, trained.get(single))
        click.echo(json.dumps({"row": single, "train": record["train"], "test": record["eval"]["test"]}))
        return
    click.echo(ablation.write_table(names, inputs.out) if table_only else
               ablation.run_all(names, inputs, seconds, parallel, trained))


@main.command("probe-features")
@click.option("--preset", type=click.Choice(PROCEDURAL_MIS_PRESETS), default="demo", show_default=True,
              help="MIS preset: image size and the random DINOv2 stand-in its feature caches use.")
@click.option("--autoencoder", "autoencoder_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Also probe this autoencoder's latents (a folder holding vae/).")
@click.option("--dino", "dino_path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local DINOv2 folder instead of the preset's random stand-in.")
@click.option("--train-images", type=POSITIVE_INT, default=5000, show_default=True)
@click.option("--heldout-images", type=POSITIVE_INT, default=1000, show_default=True)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch threads.")
def probe_features(preset: str, autoencoder_dir: Path | None, dino_path: Path | None, train_images: int,
                   heldout_images: int, threads: int | None) -> None:
    """Linear-probe accuracy per attribute of pixels, DINO tokens and autoencoder latents (docs/model.md)."""
    import torch

    from m2m_pipeline.data import get_preset
    from m2m_pipeline.data.features import encoder_spec
    from m2m_pipeline.encoders import DinoEncoder, VaeAutoencoder
    from m2m_pipeline.evaluation.probe import format_probe_table, probe_representations

    if threads:
        torch.set_num_threads(threads)
    cfg = get_preset(preset)
    if dino_path is None:
        dino, dino_name = encoder_spec(cfg).build_dino(), "DINO tokens (random stand-in)"
    else:
        dino, dino_name = DinoEncoder.from_pretrained(dino_path), f"DINOv2 tokens ({dino_path.name})"
    encoders = {"pixels": lambda x: x, dino_name: dino.encode}
    if autoencoder_dir is not None:
        encoders["autoencoder latents"] = VaeAutoencoder.from_pretrained(autoencoder_dir).encode
    results = probe_representations(encoders, cfg.resolution, train_images, heldout_images)
    click.echo(format_probe_table(results))


@main.command("plan")
@click.option("--preset", type=click.Choice(["paper"]), default="paper", show_default=True,
              help="The M2MConfig, MISConfig and TrainConfig presets of this name.")
@click.option("--gpus", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--gpu-memory", type=POSITIVE_FLOAT, default=80.0, show_default=True, help="GiB per GPU.")
@click.option("--gpu-tflops", type=POSITIVE_FLOAT, default=312.0, show_default=True,
              help="Peak dense bf16 TFLOPs per GPU (A100 312, H100 SXM 989).")
@click.option("--utilisation", type=click.FloatRange(0, 1, min_open=True), default=0.4, show_default=True,
              help="Achieved fraction of the peak (MFU).")
@click.option("--sets", type=POSITIVE_INT, default=12_200_000, show_default=True, help="MIS sets (captions).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of tables.")
def plan_cmd(preset: str, gpus: int, gpu_memory: float, gpu_tflops: float, utilisation: float, sets: int,
             as_json: bool) -> None:
    """Storage, per-GPU training memory and micro-batch, FLOPs and GPU-hours per stage, counted on the real
    architectures (meta device, seconds; m2m_pipeline/plan.py)."""
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.plan import Cluster, PlanInputs, format_plan, make_plan
    from m2m_pipeline.training import TrainConfig

    cluster = Cluster(gpus=gpus, gpu_memory_gib=gpu_memory, gpu_tflops=gpu_tflops, utilisation=utilisation)
    result = make_plan(preset, get_preset(preset), TrainConfig.preset(preset), cluster, PlanInputs(num_sets=sets))
    click.echo(json.dumps(result, indent=1) if as_json else format_plan(result))


@main.command("drift")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="M2M checkpoint folder (its encoders come from what it records).")
@click.option("--test-shards", required=True, help="Test feature shards: folder, glob or brace pattern.")
@click.option("--oracle", "oracle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Shapes-world attribute oracle folder (the judge and the FID feature network).")
@click.option("--policy", "policies", multiple=True, default=tuple(CONTEXT_POLICIES),
              show_default=True, help="Context policies to compare (repeat; m2m_pipeline/evaluation/drift.py).")
@click.option("--images", type=POSITIVE_INT, default=25, show_default=True, help="Images generated per set.")
@click.option("--sets", type=POSITIVE_INT, default=32, show_default=True, help="Test sets.")
@click.option("--steps", type=POSITIVE_INT, default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", type=POSITIVE_FLOAT, default=3.0, show_default=True,
              help="Guidance scale s (choose it on the validation split: the evaluation report's sweep).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--context-noise", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="M2M-Self trained with context noise: the fixed timestep t_c every context image is noised to.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch intra-op threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="drift.json, drift.md and the plots go here.")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI: metrics by position (step = n) there.")
def drift_cmd(checkpoint: Path, test_shards: str, oracle_dir: Path, policies: tuple[str, ...], images: int, sets: int,
              steps: int, guidance: float, seed: int, context_noise: int, threads: int | None, out_dir: Path,
              mlflow_uri: str | None) -> None:
    """Drift over a long run per context policy: oracle consistency and FID by position, seconds per image."""
    import torch

    from m2m_pipeline.evaluation.drift import DriftSpec, drift_metrics, drift_table, policies_named, run_drift

    if threads:
        torch.set_num_threads(threads)
    try:
        policies_named(policies)
    except ValueError as exn:
        raise click.BadParameter(str(exn), param_hint="--policy") from None
    spec = DriftSpec(num_images=images, steps=steps, guidance_scale=guidance, seed=seed, context_noise=context_noise)
    with _tracked(mlflow_uri, f"drift-{checkpoint.name}", {"checkpoint": str(checkpoint), "sets": sets,
                                                           "policies": ",".join(policies), **spec.to_dict()}) as run:
        result = run_drift(checkpoint, test_shards, oracle_dir, out_dir, policies, spec, sets, progress=True)
        for step, metrics in drift_metrics(result).items():
            run.log_metrics(metrics, step=step)
        for path in result["files"].values():
            run.log_artifact(path)
    click.echo(drift_table(result))
    click.echo(f"wrote {out_dir}/drift.json, drift.md and the plots")


from m2m_pipeline.evaluation.cli import evaluate  # evaluation protocol (docs/evaluation.md)
from m2m_pipeline.evaluation.cli import coco_zero_shot_cmd  # MSCOCO zero-shot continuation (Figs. 16, 17)
from m2m_pipeline.tasks.cli import (  # task fine-tuning (docs/tasks.md)
    evaluate_task_cmd,
    finetune_cmd,
)

from m2m_pipeline.data.cli import captions_cmd, features_cmd, mis_cmd  # MIS stages without Dagster (docs/orchestration.md)

for command in (captions_cmd, mis_cmd, features_cmd, finetune_cmd, evaluate_task_cmd, evaluate, coco_zero_shot_cmd):
    main.add_command(command)

if __name__ == "__main__":
    main()
