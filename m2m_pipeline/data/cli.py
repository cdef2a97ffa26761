"""`m2m captions`, `m2m mis`, `m2m features`: the MIS stages without Dagster (a cluster job runs any of them).

Each command calls the same library function the Dagster asset calls (`filter_captions`, `generate_mis`,
`build_feature_shards`) on a preset (`m2m_pipeline/data/config.py`) with the overrides given; re-running one
resumes where it stopped (completed shards are skipped by their manifests).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from m2m_pipeline.cli_types import NON_NEGATIVE_INT, POSITIVE_INT
from m2m_pipeline.data.captions import SPLITS
from m2m_pipeline.data.config import MIS_PRESETS

PRESET = click.option("--preset", type=click.Choice(sorted(MIS_PRESETS)), default="demo", show_default=True,
                      help="MIS preset (m2m_pipeline/data/config.py): sizes, generator, encoders.")
def worker_options(command):
    """--rank / --world-size: worker `rank` of `world-size` takes shards i with i mod world-size == rank."""
    command = click.option("--world-size", type=POSITIVE_INT, default=1, show_default=True,
                           help="Workers sharing the split round-robin (shard i goes to worker i mod world-size).")(command)
    return click.option("--rank", type=NON_NEGATIVE_INT, default=0, show_default=True, help="This worker's index.")(command)


def _check_worker(rank: int, world_size: int) -> None:
    if rank >= world_size:
        raise click.BadParameter(f"{rank} must be < --world-size {world_size}", param_hint="--rank")


SEED = click.option("--seed", type=NON_NEGATIVE_INT, default=None,
                    help="Base seed of every image's noise and of the random DINO stand-in (preset default).")


def _config(preset: str, **overrides):
    from m2m_pipeline.data.config import get_preset

    try:
        return get_preset(preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as err:
        raise click.UsageError(str(err)) from err


@click.command("captions")
@PRESET
@click.option("--source", "sources", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="CC12M-format TSV (url<TAB>caption), repeatable. None: the preset's procedural caption source.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Filtered caption table (JSON lines, split per caption); stats beside it (.stats.json).")
@SEED
def captions_cmd(preset: str, sources: tuple[Path, ...], out: Path, seed: int | None) -> None:
    """Filter captions to CLIP's 77-token context and split them (Sec. 4)."""
    from m2m_pipeline.data.captions import filter_captions
    from m2m_pipeline.data.shapes import write_shapes_caption_tsv

    cfg = _config(preset, seed=seed)
    if not sources:
        if not cfg.num_captions:
            raise click.UsageError(f"preset {preset!r} has no procedural caption source; pass --source TSV")
        out.parent.mkdir(parents=True, exist_ok=True)
        sources = (Path(write_shapes_caption_tsv(out.with_suffix(".source.tsv"), cfg.num_captions, cfg.seed)),)
    stats = filter_captions(list(sources), out, cfg)
    click.echo(f"kept {stats.kept} of {stats.lines_read} captions (train {stats.train}, validation "
               f"{stats.validation}, test {stats.test}; too long {stats.too_long}, malformed {stats.malformed}) "
               f"-> {out}")


@click.command("mis")
@PRESET
@click.option("--captions", "captions", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Caption table written by `m2m captions`.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Shard folder of the split (mis-NNNNNN.tar + manifests).")
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option("--shards", "shard_range", default=None, metavar="START:END",
              help="Only shard indices START <= i < END of the split (a cluster job's range).")
@worker_options
@click.option("--model-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local Stable Diffusion folder (stable-diffusion presets).")
@click.option("--device", default=None, help="torch device of the generator (default: cuda if available).")
@SEED
def mis_cmd(preset: str, captions: Path, out_dir: Path, split: str, shard_range: str | None, rank: int,
            world_size: int, model_path: str | None, device: str | None, seed: int | None) -> None:
    """Generate MIS image-set shards: images_per_set images per caption from different noises (Sec. 4)."""
    from m2m_pipeline.data.generate import generate_mis, make_generator

    _check_worker(rank, world_size)
    first, end = 0, None
    if shard_range is not None:
        start_text, sep, end_text = shard_range.partition(":")
        if not sep or not start_text.isdigit() or not end_text.isdigit() or int(start_text) >= int(end_text):
            raise click.BadParameter(f"{shard_range!r}: expected START:END with 0 <= START < END",
                                     param_hint="--shards")
        first, end = int(start_text), int(end_text)
    cfg = _config(preset, seed=seed, model_path=model_path)
    manifests = generate_mis(captions, out_dir, make_generator(cfg, device), cfg, split=split, rank=rank,
                             world_size=world_size, max_shards=end, first_shard=first)
    sets = sum(m["num_samples"] for m in manifests)
    click.echo(f"{len(manifests)} shards ({sets} sets, {split}) in {out_dir}")


@click.command("features")
@PRESET
@click.option("--mis", "mis_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="MIS shard folder of one split.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature shard folder (same shard names; latents + DINO tokens, fp16).")
@click.option("--autoencoder", "autoencoder_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding vae/ (latent presets; default: the preset's).")
@click.option("--dino", "dino_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local DINOv2 folder (default: the preset's, or its seeded random stand-in).")
@worker_options
@click.option("--device", default=None, help="torch device of the encoders (default: cuda if available).")
@SEED
def features_cmd(preset: str, mis_dir: Path, out_dir: Path, autoencoder_path: str | None, dino_path: str | None,
                 rank: int, world_size: int, device: str | None, seed: int | None) -> None:
    """Cache autoencoder latents and DINOv2 tokens of MIS shards (Sec. 5); the manifests record the encoders."""
    from m2m_pipeline.data.features import build_feature_shards

    _check_worker(rank, world_size)
    overrides = {"seed": seed, "dino_path": dino_path}
    if autoencoder_path is not None:
        overrides.update(autoencoder="vae", autoencoder_path=autoencoder_path)
    cfg = _config(preset, **overrides)
    manifests = build_feature_shards(mis_dir, out_dir, cfg, device=device, rank=rank, world_size=world_size)
    built = [m for m in manifests if not m.get("skipped")]
    click.echo(json.dumps({"shards": len(manifests), "built": len(built), "out": str(out_dir),
                           "encoders": manifests[0]["encoders"] if manifests else None}))
