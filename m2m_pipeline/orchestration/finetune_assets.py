"""Task fine-tuning assets (issue 5): stand-in task data, NVS and procedure checkpoints fine-tuned from the
profile's M2M-Self checkpoint, and their held-out evaluations. Thin adapters over `m2m_pipeline.tasks`.

Keys `<profile>/objaverse_standin`, `vgsi_standin`, `nvs_checkpoint`, `procedure_checkpoint`,
`nvs_evaluation`, `procedure_evaluation`; smoke and demo profiles only (the paper profile needs the real
Objaverse renders and VGSI images, and GPUs: see docs/tasks.md).
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)

from m2m_pipeline.orchestration.assets import common_metadata, image_markdown, loss_plot
from m2m_pipeline.orchestration.profiles import RunProfile
from m2m_pipeline.orchestration.resources import (
    DVCResource,
    M2MSettings,
    MLflowResource,
    Resolved,
    TrackedRun,
)

TASKS = {"nvs": "camera", "procedure": "position"}
# The M2M variant the task models start from (its <profile>/m2m_<variant>_checkpoint). See docs/tasks.md
# ("Which base") for the measurements behind the choice; the library fine-tunes either.
BASE_VARIANT = "self"
BASE_ASSET = f"m2m_{BASE_VARIANT}_checkpoint"
BASE_DIR = Path(f"m2m_{BASE_VARIANT}") / "final"  # under the profile's models_dir: BASE_ASSET's weights


@dataclass(frozen=True)
class TaskDataSpec:
    """Sizes of one profile's task data and the fine-tuning preset (tasks.finetune.FINETUNE_PRESETS)."""

    preset: str                   # "tiny" or "demo"
    objects: int                  # polyhedra written (Objaverse stand-in)
    procedures: int               # procedures written (VGSI stand-in)
    image_size: int = 32          # stand-in renders, px (the reader resizes to the network's size)
    seed: int = 0


TASK_DATA: dict[str, TaskDataSpec] = {
    "smoke": TaskDataSpec(preset="tiny", objects=8, procedures=8),
    "demo": TaskDataSpec(preset="demo", objects=300, procedures=300),
}


def finetune_layout(profile: RunProfile) -> dict[str, Path]:
    a, m = profile.assets_dir, profile.models_dir
    return {
        "objaverse_standin": a / "tasks" / "objaverse_standin",
        "vgsi_standin": a / "tasks" / "vgsi_standin",
        "nvs_checkpoint": m / "nvs",
        "procedure_checkpoint": m / "procedure",
        "nvs_evaluation": a / "evaluation" / "nvs",
        "procedure_evaluation": a / "evaluation" / "procedure",
    }


FINETUNE_DVC_STAGE = {name: name for name in ("objaverse_standin", "vgsi_standin", "nvs_checkpoint",
                                              "procedure_checkpoint", "nvs_evaluation", "procedure_evaluation")}
DATA_OF = {"nvs": "objaverse_standin", "procedure": "vgsi_standin"}


class FinetuneAssetConfig(Config):
    steps: int | None = None        # fine-tuning steps (default: the preset's)
    eval_items: int | None = None   # held-out items evaluated (default: the preset's held-out split)


def _version(dvc: DVCResource, run: TrackedRun, r: Resolved, name: str, context: AssetExecutionContext
             ) -> dict[str, Any]:
    stage = f"{FINETUNE_DVC_STAGE[name]}@{r.profile.name}"
    if not dvc.enabled:
        return {}
    if not dvc.has_stage(stage):
        context.log.warning(f"dvc.yaml has no stage {stage}: {name} is not versioned by DVC")
        return {}
    hashes = dvc.commit(stage)
    run.set_tags({"dvc.outs": json.dumps(hashes.get("outs", {}), sort_keys=True)[:5000]})
    return hashes


def build_finetune_assets(profile: RunProfile) -> list[Any]:
    if profile.name not in TASK_DATA:
        return []
    p, spec, paths = profile.name, TASK_DATA[profile.name], finetune_layout(profile)
    key = lambda name: AssetKey([p, name])

    def config_for(task: str, cfg: FinetuneAssetConfig):
        from m2m_pipeline.tasks.finetune import FinetuneConfig

        ft = FinetuneConfig.preset(spec.preset, TASKS[task])
        if cfg.steps is not None:
            ft = dataclasses.replace(ft, train=dataclasses.replace(ft.train, steps=cfg.steps))
        if cfg.eval_items is not None:
            ft = dataclasses.replace(ft, eval=dataclasses.replace(ft.eval, max_items=cfg.eval_items))
        return ft

    # ------------------------------------------------------------------ task data
    @asset(key=key("objaverse_standin"), group_name="tasks", kinds={"python", "png"},
           description="Objaverse stand-in in the Zero-1-to-3 layout: convex polyhedra from 12 known cameras.")
    def objaverse_standin(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                          dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.polyhedra import RenderSettings, write_polyhedra

        r = settings.resolve(profile)
        root = r.path(paths["objaverse_standin"])
        with mlflow.asset_run(context, p, {"objects": spec.objects, "seed": spec.seed}) as run:
            uids = write_polyhedra(root, spec.objects, spec.seed, RenderSettings(image_size=spec.image_size))
            hashes = _version(dvc, run, r, "objaverse_standin", context)
        return MaterializeResult(metadata={"objects": len(uids), "views_per_object": 12,
                                           **common_metadata(r, run, hashes, [root])})

    @asset(key=key("vgsi_standin"), group_name="tasks", kinds={"python", "png"},
           description="VGSI stand-in in the folder layout: procedures whose steps progress, with attributes.")
    def vgsi_standin(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                     dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.procedures import write_procedures

        r = settings.resolve(profile)
        root = r.path(paths["vgsi_standin"])
        with mlflow.asset_run(context, p, {"procedures": spec.procedures, "seed": spec.seed}) as run:
            keys = write_procedures(root, spec.procedures, spec.seed, image_size=spec.image_size)
            hashes = _version(dvc, run, r, "vgsi_standin", context)
        return MaterializeResult(metadata={"procedures": len(keys), **common_metadata(r, run, hashes, [root])})

    # ------------------------------------------------------------------ fine-tuning
    def make_checkpoint(task: str) -> Any:
        name = f"{task}_checkpoint"

        @asset(key=key(name), group_name="tasks", deps=[key(DATA_OF[task]), key(BASE_ASSET)],
               kinds={"pytorch"},
               description=f"M2M fine-tuned for {'novel view synthesis' if task == 'nvs' else 'procedures'} "
                           f"from the profile's {BASE_ASSET} (task embedder zero-initialised).")
        def checkpoint(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                       mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
            from m2m_pipeline.io import atomic_write_text
            from m2m_pipeline.tasks.finetune import finetune

            r = settings.resolve(profile)
            ft = config_for(task, config)
            out, data = r.path(paths[name]), r.path(paths[DATA_OF[task]])
            base = r.path(profile.models_dir / BASE_DIR)
            with mlflow.asset_run(context, p, {"task": ft.task, "preset": spec.preset, "steps": ft.train.steps,
                                               "batch_size": ft.train.batch_size, "lr": ft.train.lr,
                                               "base": str(base.relative_to(r.root))},
                                  extra_tags={"m2m.task": ft.task}) as run:
                result, splits = finetune(ft, data, out, base=base, progress=False, autoencoder=r.mis.vae_path,
                                          on_metrics=lambda m, step: run.log_metrics(
                                              {f"train/{k}": v for k, v in m.items()}, step=step))
                atomic_write_text(out / "splits.json", [json.dumps(dataclasses.asdict(splits), indent=1)])
                plot = loss_plot(result.losses, out / "loss.png", f"{task} fine-tuning ({p})")
                run.log_artifact(plot)
                run.log_metrics({"train/final_loss": result.final_loss, "train/seconds": result.seconds})
                hashes = _version(dvc, run, r, name, context)
            return MaterializeResult(metadata={
                "task": ft.task, "steps": result.steps, "final_loss": round(result.final_loss, 5),
                "seconds": round(result.seconds, 1), "train_items": len(splits.train),
                "test_items": len(splits.test), "loss_curve": image_markdown(plot, "fine-tuning loss"),
                **common_metadata(r, run, hashes, [out])})

        return checkpoint

    def make_evaluation(task: str) -> Any:
        name, ckpt = f"{task}_evaluation", f"{task}_checkpoint"

        @asset(key=key(name), group_name="tasks", deps=[key(ckpt), key(DATA_OF[task]), key(BASE_ASSET)],
               kinds={"pytorch"},
               description="Held-out evaluation: fine-tuned vs before fine-tuning vs the copy baseline (PSNR, "
                           "SSIM" + (", progress check" if task == "procedure" else "") + "), dual guidance.")
        def evaluation(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                       mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
            from m2m_pipeline.tasks.evaluate import evaluate_finetune, report_metrics

            r = settings.resolve(profile)
            ft = config_for(task, config)
            out = r.path(paths[name])
            base = r.path(profile.models_dir / BASE_DIR)
            with mlflow.asset_run(context, p, {"task": ft.task, "steps": ft.eval.steps,
                                               "context_images": ft.eval.context_images,
                                               "target_images": ft.eval.target_images},
                                  extra_tags={"m2m.task": ft.task}) as run:
                start = time.perf_counter()
                report = evaluate_finetune(ft, r.path(paths[DATA_OF[task]]), r.path(paths[ckpt]) / "final", out,
                                           base=base, progress=False, autoencoder=r.mis.vae_path)
                run.log_params({f"sampler.{k}": v for k, v in report["sampler"].items()})
                run.log_metrics(report_metrics(report))
                for path in report["files"].values():
                    run.log_artifact(path)
                hashes = _version(dvc, run, r, name, context)
            s = report["summary"]
            return MaterializeResult(metadata={
                "table": MetadataValue.md(report["table"]), "sampler": MetadataValue.json(report["sampler"]),
                **{f"psnr/{m}": round(row["psnr_mean"], 3) for m, row in s.items()},
                "grid": image_markdown(report["files"]["grid"], "context | fine-tuned | before | baseline | truth"),
                "psnr_chart": image_markdown(report["files"]["psnr_chart"], "PSNR per method"),
                "seconds": round(time.perf_counter() - start, 1), **common_metadata(r, run, hashes, [out])})

        return evaluation

    return [objaverse_standin, vgsi_standin, make_checkpoint("nvs"), make_checkpoint("procedure"),
            make_evaluation("nvs"), make_evaluation("procedure")]


def finetune_jobs(profile: RunProfile) -> list[Any]:
    from dagster import define_asset_job

    if profile.name not in TASK_DATA:
        return []
    p = profile.name
    return [define_asset_job(f"m2m_{p}_finetune_job", selection=AssetSelection.assets(
        *[[p, n] for n in FINETUNE_DVC_STAGE]), tags={"m2m/profile": p},
        description=f"Task data, NVS and procedure fine-tuning from {BASE_ASSET}, held-out evaluations.")]
