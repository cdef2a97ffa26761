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

from m2m_pipeline.orchestration.assets import image_markdown, loss_plot, tracked_step
from m2m_pipeline.orchestration.profiles import RunProfile
from m2m_pipeline.orchestration.resources import DVCResource, M2MSettings, MLflowResource

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


def build_finetune_assets(profile: RunProfile) -> list[Any]:
    if profile.name not in TASK_DATA:
        return []
    return [objaverse_standin_asset(profile), vgsi_standin_asset(profile),
            *(finetune_checkpoint_asset(profile, task) for task in TASKS),
            *(finetune_evaluation_asset(profile, task) for task in TASKS)]


def _key(profile: RunProfile, name: str) -> AssetKey:
    return AssetKey([profile.name, name])


def _finetune_config(profile: RunProfile, task: str, cfg: FinetuneAssetConfig) -> Any:
    """The profile's fine-tuning preset for `task`, with the run config's overrides."""
    from m2m_pipeline.tasks.finetune import FinetuneConfig

    ft = FinetuneConfig.preset(TASK_DATA[profile.name].preset, TASKS[task])
    if cfg.steps is not None:
        ft = dataclasses.replace(ft, train=dataclasses.replace(ft.train, steps=cfg.steps))
    if cfg.eval_items is not None:
        ft = dataclasses.replace(ft, eval=dataclasses.replace(ft.eval, max_items=cfg.eval_items))
    return ft


# ------------------------------------------------------------------ task data
def objaverse_standin_asset(profile: RunProfile) -> Any:
    spec, paths = TASK_DATA[profile.name], finetune_layout(profile)

    @asset(key=_key(profile, "objaverse_standin"), group_name="tasks", kinds={"python", "png"},
           description="Objaverse stand-in in the Zero-1-to-3 layout: convex polyhedra from 12 known cameras.")
    def objaverse_standin(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                          dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.polyhedra import RenderSettings, write_polyhedra

        with tracked_step(profile, context, settings, mlflow, dvc, "objaverse_standin",
                          lambda r: {"objects": spec.objects, "seed": spec.seed}) as step:
            root = step.r.path(paths["objaverse_standin"])
            uids = write_polyhedra(root, spec.objects, spec.seed, RenderSettings(image_size=spec.image_size))
        return MaterializeResult(metadata={"objects": len(uids), "views_per_object": 12, **step.metadata([root])})

    return objaverse_standin


def vgsi_standin_asset(profile: RunProfile) -> Any:
    spec, paths = TASK_DATA[profile.name], finetune_layout(profile)

    @asset(key=_key(profile, "vgsi_standin"), group_name="tasks", kinds={"python", "png"},
           description="VGSI stand-in in the folder layout: procedures whose steps progress, with attributes.")
    def vgsi_standin(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                     dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.procedures import write_procedures

        with tracked_step(profile, context, settings, mlflow, dvc, "vgsi_standin",
                          lambda r: {"procedures": spec.procedures, "seed": spec.seed}) as step:
            root = step.r.path(paths["vgsi_standin"])
            keys = write_procedures(root, spec.procedures, spec.seed, image_size=spec.image_size)
        return MaterializeResult(metadata={"procedures": len(keys), **step.metadata([root])})

    return vgsi_standin


# ------------------------------------------------------------------ fine-tuning
def finetune_checkpoint_asset(profile: RunProfile, task: str) -> Any:
    name, paths = f"{task}_checkpoint", finetune_layout(profile)

    @asset(key=_key(profile, name), group_name="tasks", deps=[_key(profile, DATA_OF[task]), _key(profile, BASE_ASSET)],
           kinds={"pytorch"},
           description=f"M2M fine-tuned for {'novel view synthesis' if task == 'nvs' else 'procedures'} "
                       f"from the profile's {BASE_ASSET} (task embedder zero-initialised).")
    def checkpoint(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                   mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.io import atomic_write_text
        from m2m_pipeline.tasks.finetune import finetune

        ft = _finetune_config(profile, task, config)
        params = lambda r: {"task": ft.task, "preset": TASK_DATA[profile.name].preset,  # noqa: E731
                            "steps": ft.train.steps, "batch_size": ft.train.batch_size, "lr": ft.train.lr,
                            "base": str(profile.models_dir / BASE_DIR)}
        with tracked_step(profile, context, settings, mlflow, dvc, name, params, tags={"m2m.task": ft.task}) as step:
            r, run = step.r, step.run
            out, data = r.path(paths[name]), r.path(paths[DATA_OF[task]])
            result, splits = finetune(ft, data, out, base=r.path(profile.models_dir / BASE_DIR), progress=False,
                                      autoencoder=r.mis.vae_path, on_metrics=run.metrics_logger("train"))
            atomic_write_text(out / "splits.json", [json.dumps(dataclasses.asdict(splits), indent=1)])
            plot = loss_plot(result.losses, out / "loss.png", f"{task} fine-tuning ({profile.name})")
            run.log_artifact(plot)
            run.log_metrics({"train/final_loss": result.final_loss, "train/seconds": result.seconds})
        return MaterializeResult(metadata={
            "task": ft.task, "steps": result.steps, "final_loss": round(result.final_loss, 5),
            "seconds": round(result.seconds, 1), "train_items": len(splits.train),
            "test_items": len(splits.test), "loss_curve": image_markdown(plot, "fine-tuning loss"),
            **step.metadata([out])})

    return checkpoint


def finetune_evaluation_asset(profile: RunProfile, task: str) -> Any:
    name, ckpt, paths = f"{task}_evaluation", f"{task}_checkpoint", finetune_layout(profile)

    @asset(key=_key(profile, name), group_name="tasks",
           deps=[_key(profile, ckpt), _key(profile, DATA_OF[task]), _key(profile, BASE_ASSET)], kinds={"pytorch"},
           description="Held-out evaluation: fine-tuned vs before fine-tuning vs the copy baseline (PSNR, "
                       "SSIM" + (", progress check" if task == "procedure" else "") + "), dual guidance.")
    def evaluation(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                   mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.evaluate import evaluate_finetune, report_metrics

        ft = _finetune_config(profile, task, config)
        params = lambda r: {"task": ft.task, "steps": ft.eval.steps, "context_images": ft.eval.context_images,  # noqa: E731
                            "target_images": ft.eval.target_images}
        with tracked_step(profile, context, settings, mlflow, dvc, name, params, tags={"m2m.task": ft.task}) as step:
            r, out = step.r, step.r.path(paths[name])
            start = time.perf_counter()
            report = evaluate_finetune(ft, r.path(paths[DATA_OF[task]]), r.path(paths[ckpt]) / "final", out,
                                       base=r.path(profile.models_dir / BASE_DIR), progress=False,
                                       autoencoder=r.mis.vae_path)
            step.run.log_params({f"sampler.{k}": v for k, v in report["sampler"].items()})
            step.run.log_metrics(report_metrics(report))
            for path in report["files"].values():
                step.run.log_artifact(path)
        s = report["summary"]
        return MaterializeResult(metadata={
            "table": MetadataValue.md(report["table"]), "sampler": MetadataValue.json(report["sampler"]),
            **{f"psnr/{m}": round(row["psnr_mean"], 3) for m, row in s.items()},
            "grid": image_markdown(report["files"]["grid"], "context | fine-tuned | before | baseline | truth"),
            "psnr_chart": image_markdown(report["files"]["psnr_chart"], "PSNR per method"),
            "seconds": round(time.perf_counter() - start, 1), **step.metadata([out])})

    return evaluation


def finetune_jobs(profile: RunProfile) -> list[Any]:
    from dagster import define_asset_job

    if profile.name not in TASK_DATA:
        return []
    p = profile.name
    return [define_asset_job(f"m2m_{p}_finetune_job", selection=AssetSelection.assets(
        *[[p, n] for n in FINETUNE_DVC_STAGE]), tags={"m2m/profile": p},
        description=f"Task data, NVS and procedure fine-tuning from {BASE_ASSET}, held-out evaluations.")]
