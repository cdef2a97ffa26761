"""`python -m m2m_pipeline.cli finetune` and `... evaluate-task`: task fine-tuning and its evaluation, with an
MLflow run each (registered in m2m_pipeline/cli.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from m2m_pipeline.cli_types import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT

TASK_EXPERIMENT = "m2m-tasks"  # the MLflow experiment of the task CLI's runs
TASKS = {"camera": "camera", "nvs": "camera", "position": "position", "procedures": "position"}


def _threads(threads: int | None) -> None:
    import torch

    if threads:  # on shared cores one thread per process avoids OpenMP oversubscription (docs/tasks.md)
        torch.set_num_threads(threads)


def _eval_overrides(cfg, steps, s_i, s_c, items, sweep, sweep_s_i=(), sweep_s_c=()):
    changes = {k: v for k, v in {"steps": steps, "s_I": s_i, "s_C": s_c, "max_items": items}.items() if v is not None}
    changes.update({k: tuple(v) for k, v in {"sweep_s_I": sweep_s_i, "sweep_s_C": sweep_s_c}.items() if v})
    if not sweep:
        changes.update(sweep_s_I=(), sweep_s_C=())
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))


_eval_options = [
    click.option("--eval-steps", "eval_steps", type=POSITIVE_INT, default=None, help="DDIM steps (default: the preset's)."),
    click.option("--s-i", "s_i", type=NON_NEGATIVE_FLOAT, default=None, help="Image guidance s_I (Eq. 7); with --no-sweep."),
    click.option("--s-c", "s_c", type=NON_NEGATIVE_FLOAT, default=None, help="Task guidance s_C (Eq. 7); with --no-sweep."),
    click.option("--items", type=POSITIVE_INT, default=None, help="Held-out items evaluated (default: all)."),
    click.option("--sweep/--no-sweep", default=True, show_default=True,
                 help="Choose (s_I, s_C) on the validation split from the preset's grid."),
    click.option("--sweep-s-i", "sweep_s_i", type=NON_NEGATIVE_FLOAT, multiple=True,
                 help="Grid of s_I for the sweep (repeat the option; default: the preset's)."),
    click.option("--sweep-s-c", "sweep_s_c", type=NON_NEGATIVE_FLOAT, multiple=True,
                 help="Grid of s_C for the sweep (repeat the option; default: the preset's)."),
]


def eval_options(fn):
    for option in reversed(_eval_options):
        fn = option(fn)
    return fn


@click.command("finetune")
@click.option("--task", type=click.Choice(sorted(TASKS)), required=True,
              help="camera (= nvs): novel view synthesis; position (= procedures): visual procedures.")
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Objaverse renders (Zero-1-to-3 layout) or VGSI steps; the stand-ins write both layouts.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output: OUT/final/ (checkpoint), OUT/splits.json, OUT/eval/ (metrics, figures).")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Base M2M checkpoint trained without a task (default: train from scratch).")
@click.option("--dino", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local DINOv2 folder for an M2M-DINO base (default: the CPU presets' seeded random encoder).")
@click.option("--autoencoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of a latent base's AutoencoderKL (holding vae/, e.g. models/demo/autoencoder).")
@click.option("--preset", type=click.Choice(["tiny", "demo", "paper"]), default="demo", show_default=True,
              help="FINETUNE_PRESETS (tasks/finetune.py); paper: Sec. 6.2 / App. A on GPUs (docs/tasks.md).")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Fine-tuning steps (default: the preset's).")
@click.option("--batch-size", type=POSITIVE_INT, default=None)
@click.option("--lr", type=POSITIVE_FLOAT, default=None)
@click.option("--max-seconds", type=NON_NEGATIVE_FLOAT, default=None,
              help="Wall-clock budget; stops cleanly and saves (default: the preset's; 0: none).")
@click.option("--checkpoint-every", type=NON_NEGATIVE_INT, default=None, help="Checkpoint every K steps (0: only final/).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out (exact resume).")
@click.option("--spatial-bias/--no-spatial-bias", "spatial_bias", default=None,
              help="Relative spatial-position bias in Image-Set Attention (default: the preset's, on; "
                   "--no-spatial-bias to resume runs made before the option).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch threads (1 on shared cores).")
@click.option("--device", default=None, help="Where the model trains and the encoders encode (default: cuda if present).")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True, help="Evaluate on the test split after.")
@eval_options
def finetune_cmd(task, data, out_dir, base, dino, autoencoder, preset, steps, batch_size, lr, max_seconds, checkpoint_every, resume,
                 spatial_bias, seed, threads, device, evaluate, eval_steps, s_i, s_c, items, sweep, sweep_s_i,
                 sweep_s_c) -> None:
    """Fine-tune M2M for a task on its train split, then evaluate on held-out objects / procedures."""
    from m2m_pipeline.io import atomic_write_text
    from m2m_pipeline.tasks.finetune import FinetuneConfig, finetune
    from m2m_pipeline.tracking import MlflowRun, flatten

    _threads(threads)
    cfg = FinetuneConfig.preset(preset, TASKS[task])
    if spatial_bias is not None:
        cfg = dataclasses.replace(cfg, spatial_bias=spatial_bias)
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr,
                                   "checkpoint_every": checkpoint_every}.items() if v is not None}
    if max_seconds is not None:
        overrides["max_seconds"] = max_seconds
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, **overrides))
    cfg = _eval_overrides(cfg, eval_steps, s_i, s_c, items, sweep, sweep_s_i, sweep_s_c)
    with MlflowRun.start(f"finetune-{cfg.task}-{preset}", experiment=TASK_EXPERIMENT, tags={"m2m.task": cfg.task}) as run:
        run.log_params({**flatten("", cfg.to_dict()), "data": data, "base": base or "scratch"})
        result, splits = finetune(cfg, data, out_dir, base=base, resume_from="latest" if resume else None, dino=dino,
                                  autoencoder=autoencoder, on_metrics=run.metrics_logger("train"), device=device)
        atomic_write_text(out_dir / "splits.json", [json.dumps(
            {"data": str(data), "base": str(base) if base else None, "dino": str(dino) if dino else None,
             "autoencoder": str(autoencoder) if autoencoder else None, "config": cfg.to_dict(),
             **dataclasses.asdict(splits)}, indent=1)])
        run.log_metrics({"train/final_loss": result.final_loss, "train/seconds": result.seconds})
        click.echo(f"fine-tuned {result.steps} steps in {result.seconds:.0f} s; final loss {result.final_loss:.4f}; "
                   f"checkpoint {result.checkpoint_dir}")
        if evaluate:
            _evaluate(cfg, data, out_dir / "final", out_dir / "eval", base, run, dino, autoencoder=autoencoder,
                      device=device)


@click.command("evaluate-task")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A finetune output folder (final/ + splits.json).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Evaluate this checkpoint of the run (e.g. RUN/checkpoint-0001000) instead of RUN/final; "
                   "results go to CHECKPOINT/eval-<split>/.")
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True,
              help="Items evaluated: the test split, or the validation split (to follow a run's progress "
                   "without looking at test items).")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch threads (1 on shared cores).")
@click.option("--device", default=None, help="Where the models sample and the encoders encode (default: cuda if present).")
@eval_options
def evaluate_task_cmd(run_dir, checkpoint, split, threads, device, eval_steps, s_i, s_c, items, sweep, sweep_s_i,
                      sweep_s_c) -> None:
    """Evaluate a fine-tuned task model on its held-out split against the baselines and the model before."""
    from m2m_pipeline.tasks.finetune import FinetuneConfig
    from m2m_pipeline.tracking import MlflowRun

    _threads(threads)
    meta = json.loads((run_dir / "splits.json").read_text())
    cfg = FinetuneConfig.from_dict(meta["config"])
    cfg = _eval_overrides(cfg, eval_steps, s_i, s_c, items, sweep, sweep_s_i, sweep_s_c)
    weights = checkpoint or run_dir / "final"
    out = run_dir / "eval" if checkpoint is None and split == "test" else weights / f"eval-{split}"
    with MlflowRun.start(f"evaluate-{cfg.task}", experiment=TASK_EXPERIMENT, tags={"m2m.task": cfg.task, "m2m.checkpoint": str(weights),
                                               "m2m.split": split}) as run:
        _evaluate(cfg, Path(meta["data"]), weights, out, meta["base"], run, meta.get("dino"), split,
                  meta.get("autoencoder"), device)


def _evaluate(cfg, data, weights: Path, out: Path, base, run, dino=None, split: str = "test",
              autoencoder=None, device=None) -> None:
    from m2m_pipeline.tasks.evaluate import evaluate_finetune, report_metrics
    from m2m_pipeline.tracking import flatten

    report = evaluate_finetune(cfg, data, weights, out, base=base, dino=dino, split=split, autoencoder=autoencoder,
                               device=device)
    run.log_params(flatten("eval", {k: v for k, v in report["sampler"].items()}))
    run.log_metrics(report_metrics(report))
    for path in report["files"].values():
        run.log_artifact(path)
    click.echo(report["table"])
