"""`m2m evaluate`: the Sec. 8.4 protocol on a checkpoint and a test split, printed as a table."""

from __future__ import annotations

from pathlib import Path

import click

from m2m_pipeline.cli_types import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT
from m2m_pipeline.evaluation.report import EVAL_PRESETS
from m2m_pipeline.sampling import (
    CONTEXT_POLICIES,
    DEFAULT_POLICY,
    PAPER_POLICY,
    SCHEDULERS,
)


@click.command(short_help="Per-position FID, IS, CLIP and oracle metrics of a checkpoint on a test split.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="M2M checkpoint folder (config.json + model.safetensors).")
@click.option("--test-shards", required=True, help="Test feature shards: folder, glob or brace pattern.")
@click.option("--oracle", "oracle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Shapes-world attribute oracle folder; trained there first (a few minutes) if empty.")
@click.option("--fid-features", type=click.Choice(["auto", "oracle", "inception", "none"]), default="auto",
              show_default=True, help="FID/IS feature network; auto: the oracle when --oracle is given, else Inception.")
@click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
              help="Local clean-fid Inception file inception-2015-12-05.pt (or its folder); never downloaded.")
@click.option("--clip-model", default=None, help="open_clip model name, or local-dir:/path (no CLIP scores if unset).")
@click.option("--clip-pretrained", default=None, help="Local open_clip checkpoint file for --clip-model.")
@click.option("--sets", "num_sets", type=POSITIVE_INT, default=None, help="Test sets to evaluate (default: all).")
@click.option("--context-images", type=POSITIVE_INT, default=None, help="Preceding images per set (protocol: 4).")
@click.option("--generated-images", type=POSITIVE_INT, default=None, help="Images generated per set (protocol: 10).")
@click.option("--policy", type=click.Choice(sorted(CONTEXT_POLICIES)), default=DEFAULT_POLICY, show_default=True,
              help=f"Context policy: {DEFAULT_POLICY} (the default, docs/evaluation.md 'Drift') or {PAPER_POLICY} "
                   f"(the paper's Sec. 8.4 protocol, W = 4, no anchors).")
@click.option("--window", type=click.IntRange(min=-1), default=None,
              help="Context window W, overriding --policy's; -1: all preceding images.")
@click.option("--anchors", type=NON_NEGATIVE_INT, default=None, help="First images always kept in the window, "
                                                                    "overriding --policy's.")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Denoising steps (protocol: 50).")
@click.option("--sampler", type=click.Choice(sorted(SCHEDULERS)), default=None,
              help="Scheduler (protocol: ddim); dpm++: DPM-Solver++.")
@click.option("--guidance", type=NON_NEGATIVE_FLOAT, default=None, help="Guidance scale s of Eq. 6 (protocol: 7.5).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=None, help="Set i samples with seed + i (protocol: 0).")
@click.option("--draw-seed", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="Seed of the random draw of --sets test sets (with --report: the preset's draw_seed).")
@click.option("--batch-size", type=POSITIVE_INT, default=None, help="Sets sampled together (memory only).")
@click.option("--unconditional", is_flag=True, help="Drop the image condition (W = 0): a chance-level baseline.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="Local SD folder (latent checkpoints).")
@click.option("--dino", type=click.Path(path_type=Path), default=None, help="Local DINOv2 folder (M2M-DINO).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report (per position, summary, provenance) as JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--report", "report_preset", type=click.Choice(sorted(EVAL_PRESETS)), default=None,
              help="The evaluation assets' full report with this profile's sizes; --test-shards is then a folder; "
                   "figures and report.json go to --report-dir. Shapes-world presets (smoke, demo): protocol, "
                   "unconditional branch, drift, preceding-image sweep, zero-shot photos, learnability verdict; "
                   "needs --oracle. Paper presets (paper, dryrun): Table 1 (Inception FID / IS, CLIP-T / CLIP-I), "
                   "drift and preceding-image sweep by CLIP; needs --inception-weights, --clip-model "
                   "(and --clip-pretrained).")
@click.option("--validation-shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --report: validation feature shards; guidance and DDIM steps are chosen there first.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/report"),
              show_default=True, help="With --report: output folder.")
def evaluate(checkpoint: Path, test_shards: str, oracle_dir: Path | None, fid_features: str,
             inception_weights: Path | None, clip_model: str | None, clip_pretrained: str | None,
             num_sets: int | None, context_images: int | None, generated_images: int | None, policy: str,
             window: int | None,
             anchors: int | None, steps: int | None, sampler: str | None, guidance: float | None, seed: int | None,
             draw_seed: int, batch_size: int | None, unconditional: bool, vae: Path | None, dino: Path | None, out: Path | None,
             quiet: bool, report_preset: str | None, validation_shards: Path | None, report_dir: Path) -> None:
    """Run the evaluation protocol (Sec. 8.4) on CHECKPOINT over the test shards and print the table."""
    if report_preset is not None:
        _full_report(checkpoint, Path(test_shards), oracle_dir, report_preset, validation_shards, report_dir, vae,
                     dino, seed or 0, inception_weights, clip_model, clip_pretrained)
        return
    from m2m_pipeline.evaluation.protocol import (
        ProtocolConfig,
        Scorers,
        load_test_sets,
        run_protocol,
    )
    from m2m_pipeline.weights import WeightsNotFoundError

    given = {"num_sets": num_sets, "context_images": context_images, "generated_images": generated_images,
             "anchors": anchors, "steps": steps, "sampler": sampler, "guidance_scale": guidance, "seed": seed, "batch_size": batch_size}
    overrides: dict = {k: v for k, v in given.items() if v is not None}
    if window is not None:
        overrides["window"] = None if window < 0 else window
    try:
        config = ProtocolConfig.with_policy(policy, unconditional=unconditional, **overrides)
    except ValueError as err:
        raise click.UsageError(str(err)) from err

    from m2m_pipeline.bundle import load_bundle

    bundle = load_bundle(checkpoint, vae=vae, dino=dino)  # errors name the file or the option (one line)
    net, autoencoder, encoder = bundle.net, bundle.autoencoder, bundle.context_encoder
    scorers = Scorers()
    if oracle_dir is not None:
        from m2m_pipeline.evaluation.oracle import load_or_train_oracle

        scorers.oracle = load_or_train_oracle(oracle_dir, net.config.image_size, progress=not quiet)
        scorers.oracle_dir = str(oracle_dir)
    choice = ("oracle" if oracle_dir is not None else "inception") if fid_features == "auto" else fid_features
    try:
        if choice == "oracle":
            if scorers.oracle is None:
                raise click.UsageError("--fid-features oracle needs --oracle DIR")
            from m2m_pipeline.evaluation.fid import oracle_feature_network

            scorers.fid_network = oracle_feature_network(scorers.oracle)
        elif choice == "inception":
            from m2m_pipeline.evaluation.fid import inception_feature_network

            scorers.fid_network = inception_feature_network(inception_weights)
        if clip_model is not None:
            from m2m_pipeline.evaluation.clip_score import ClipScorer

            scorers.clip = ClipScorer(clip_model, clip_pretrained)
    except WeightsNotFoundError as err:
        raise click.ClickException(f"{err}\n(offline evaluation: pass --oracle DIR and --fid-features oracle)") from err

    sets = load_test_sets(test_shards, config.num_sets, config.context_images, seed=draw_seed)
    try:
        bundle.check_cache(sets.shards)  # test latents / tokens of other encoders would be judged wrongly
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    report = run_protocol(net, autoencoder, sets, config, scorers, encoder, checkpoint=checkpoint, progress=not quiet)
    click.echo(report.table())
    if out is not None:
        report.to_json(out)
        click.echo(f"report: {out}")



def _full_report(checkpoint: Path, test_dir: Path, oracle_dir: Path | None, preset: str, validation_dir: Path | None,
                 out: Path, vae: Path | None, dino: Path | None, seed: int, inception_weights: Path | None = None,
                 clip_model: str | None = None, clip_pretrained: str | None = None) -> None:
    """What the evaluation asset materializes, printed: the same function, sizes and seeds."""
    from m2m_pipeline.evaluation.report import evaluate_checkpoint
    from m2m_pipeline.weights import WeightsNotFoundError

    ev = EVAL_PRESETS[preset]
    if not test_dir.is_dir():
        raise click.BadParameter(f"{test_dir}: with --report, a folder of test feature shards", param_hint="--test-shards")
    if ev.scorers == "paper":
        if inception_weights is None or clip_model is None:
            raise click.UsageError(f"--report {preset} scores with the paper's scorers: it needs --inception-weights "
                                   f"(clean-fid's inception-2015-12-05.pt) and --clip-model (+ --clip-pretrained)")
        try:
            res = evaluate_checkpoint(checkpoint, test_dir, None, out, ev, vae=vae, dino=dino, seed=seed,
                                      inception_weights=inception_weights, clip_model=clip_model,
                                      clip_pretrained=clip_pretrained)
        except WeightsNotFoundError as err:
            raise click.ClickException(str(err)) from err
        click.echo(res["table"])
        click.echo("Table 1 row: " + ", ".join(f"{c} {v['mean']:.2f} +- {v['std']:.2f}"
                                                for c, v in res["table1"].items()))
        draw = res["test_sets"]
        click.echo(f"test sets: {draw['drawn']} of {draw['candidates']} drawn with seed {draw['seed']} "
                   f"(keys sha256 {draw['keys_sha256'][:16]}..)")
        vals = res["drift"]["clip_image_image"]
        click.echo("drift (CLIP image-image at n = 1, 10, 25): "
                   + " / ".join(f"{vals[i - 1]:.2f}" for i in (1, 10, 25) if i <= len(vals)))
        click.echo(f"report: {res['report_path']}; figures: {', '.join(str(f) for f in res['files'].values())}")
        return
    if oracle_dir is None or not (oracle_dir / "oracle_config.json").is_file():
        raise click.UsageError("--report needs --oracle DIR holding a trained attribute oracle (oracle_config.json)")
    res = evaluate_checkpoint(checkpoint, test_dir, oracle_dir, out, ev, validation_dir=validation_dir,
                              vae=vae, dino=dino, seed=seed)
    if res["sweep"] is not None:
        click.echo(f"sampling chosen on {res['sweep']['validation_sets']} validation sets:\n{res['sweep']['table']}")
    click.echo(res["table"])
    click.echo("position 1 (guided / target / unconditional / chance):")
    for name, v in res["verdict"].items():
        click.echo(f"  {name}: {v['guided']:.2f} / >= {v['target']:.2f} {'met' if v['met'] else 'NOT met'} / "
                   f"{v['unconditional']:.2f} / {v['chance']:.2f}")
    drift = res["drift"]
    click.echo("drift (consistency at n = 1, 10, 25): " + "; ".join(
        f"{name} " + " / ".join(f"{vals[i - 1]:.2f}" for i in (1, 10, 25) if i <= len(vals))
        for name, vals in drift.items() if name in ("colour", "background", "shape")))
    click.echo(f"report: {res['report_path']}; figures: {', '.join(str(f) for f in res['files'].values())}")


from m2m_pipeline.data.coco import COCO_SPLITS  # light: no torch


@click.command("coco-zero-shot", short_help="Continue MSCOCO sets of one category zero-shot (Figs. 5, 16, 17).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="M2M checkpoint folder (config.json + model.safetensors).")
@click.option("--coco-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="COCO 2017 folder: annotations/instances_<split>2017.json and <split>2017/*.jpg.")
@click.option("--split", type=click.Choice(list(COCO_SPLITS)), default="val", show_default=True)
@click.option("--clip-model", default=None, help="open_clip model name, or local-dir:/path (no CLIP scores if unset).")
@click.option("--clip-pretrained", default=None, help="Local open_clip checkpoint file for --clip-model.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: grid.png, consistency.md, report.json.")
@click.option("--preset", "eval_preset", type=click.Choice(sorted(EVAL_PRESETS)), default="paper", show_default=True,
              help="EvalSpec whose sizes and sampling are used (the coco_zero_shot asset uses its profile's).")
@click.option("--sets", "max_sets", type=POSITIVE_INT, default=None, help="At most this many sets (default: the "
                                                                         "preset's coco_sets).")
@click.option("--sets-per-category", type=POSITIVE_INT, default=1, show_default=True)
@click.option("--category", "categories", multiple=True, help="Only this category name (repeatable).")
@click.option("--views", type=POSITIVE_INT, default=None, help="Real images per set (default: the preset's 4).")
@click.option("--generated-images", type=POSITIVE_INT, default=None, help="Images generated per set (default: "
                                                                         "the preset's zero_shot_images).")
@click.option("--policy", type=click.Choice(sorted(CONTEXT_POLICIES)), default=None,
              help="Context policy (default: the preset's).")
@click.option("--steps", type=POSITIVE_INT, default=None, help="DDIM steps (default: the preset's).")
@click.option("--guidance", type=NON_NEGATIVE_FLOAT, default=None, help="Guidance scale (default: the preset's).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="Draws the sets and samples (set b uses seed + b).")
@click.option("--batch-size", type=POSITIVE_INT, default=8, show_default=True, help="Sets sampled together.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="Local SD folder (latent checkpoints).")
@click.option("--dino", type=click.Path(path_type=Path), default=None, help="Local DINOv2 folder (M2M-DINO).")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def coco_zero_shot_cmd(checkpoint: Path, coco_dir: Path, split: str, clip_model: str | None,
                       clip_pretrained: str | None, out: Path, eval_preset: str, max_sets: int | None,
                       sets_per_category: int, categories: tuple[str, ...], views: int | None,
                       generated_images: int | None, policy: str | None, steps: int | None, guidance: float | None,
                       seed: int, batch_size: int, vae: Path | None, dino: Path | None, device: str,
                       quiet: bool) -> None:
    """Continue real MSCOCO sets (images sharing one object category) with CHECKPOINT: the grid of Figs. 16 / 17
    and CLIP image-image consistency by position (evaluation/coco_zero_shot.py; docs/evaluation.md)."""
    import dataclasses

    from m2m_pipeline.data.coco import load_coco_sets
    from m2m_pipeline.evaluation.coco_zero_shot import CocoZeroShotSpec, coco_zero_shot

    given = {"context_images": views, "zero_shot_images": generated_images, "context_policy": policy,
             "steps": steps, "guidance_scale": guidance}
    try:
        ev = dataclasses.replace(EVAL_PRESETS[eval_preset], **{k: v for k, v in given.items() if v is not None})
        spec = dataclasses.replace(CocoZeroShotSpec.from_eval(
            ev, seed, max_sets=max_sets, sets_per_category=sets_per_category,
            categories=tuple(categories) or None), batch_size=batch_size)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    sets = load_coco_sets(coco_dir, split, spec.sets)  # bad annotations fail here, naming file and field
    scorer = None
    if clip_model is not None:
        from m2m_pipeline.evaluation.clip_score import ClipScorer

        scorer = ClipScorer(clip_model, clip_pretrained, device=device)
    res = coco_zero_shot(checkpoint, sets, out, scorer, spec, vae=vae, dino=dino, device=device, progress=not quiet)
    if sets.skipped:
        click.echo(f"skipped {len(sets.skipped)} categories with too few images: "
                   + ", ".join(f"{k} ({v})" for k, v in sets.skipped.items()))
    click.echo(f"{len(sets.sets)} sets from {len({s.category for s in sets.sets})} categories of {split}2017")
    click.echo(res["table"].rstrip())
    click.echo(f"report: {res['report_path']}; grid: {res['files']['grid']}")
