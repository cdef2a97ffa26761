"""Task fine-tuning assets (Sec. 6.2, 7.1.2, 8.5): task data, NVS and procedure checkpoints fine-tuned from the
profile's base M2M checkpoint, and their held-out evaluations. Thin adapters over `m2m_pipeline.tasks`.

One definition path for every profile; `TASK_DATA[profile]` says where the task data come from:
- "stand-in" (smoke, demo): `<profile>/objaverse_standin` and `vgsi_standin` write the procedural stand-ins;
- "folder" (paper): `<profile>/objaverse_renders` and `vgsi_procedures` check and index the real folders named
  by the run settings `objaverse_dir` / `vgsi_dir` (checked when the run config resolves) and write a preview.
Then `nvs_checkpoint`, `procedure_checkpoint`, `nvs_evaluation`, `procedure_evaluation`, fine-tuned from the
profile's `m2m_<base_variant>_checkpoint` (M2M-Self on the CPU profiles, M2M-DINO for the paper: Figs. 7-8).
docs/tasks.md has the choices.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from m2m_pipeline.orchestration.assets import (
    GPU_POOL,
    ProfileGraph,
    image_markdown,
    loss_plot,
    tracked_step,
)
from m2m_pipeline.orchestration.profiles import RunProfile
from m2m_pipeline.orchestration.resources import (
    ComputeResource,
    DVCResource,
    M2MSettings,
    MLflowResource,
)
from m2m_pipeline.tasks.folders import FIXTURE_ITEMS, FIXTURE_STEPS

TASKS = {"nvs": "camera", "procedure": "position"}
DataSource = Literal["stand-in", "folder"]
# The data asset of each task, by source.
DATA_ASSETS: dict[str, dict[str, str]] = {
    "stand-in": {"nvs": "objaverse_standin", "procedure": "vgsi_standin"},
    "folder": {"nvs": "objaverse_renders", "procedure": "vgsi_procedures"},
}
# The run setting (M2MSettings field) naming each task's folder, for the "folder" source, and what it holds.
FOLDER_SETTINGS = {"nvs": "objaverse_dir", "procedure": "vgsi_dir"}
FOLDER_WHAT = {"nvs": "Objaverse renders (Zero-1-to-3 layout: <uid>/NNN.png + NNN.npy)",
               "procedure": "VGSI procedures (index.json or <article>/<method>/<step images>)"}


@dataclass(frozen=True)
class TaskDataSpec:
    """One profile's task data, fine-tuning preset (tasks.finetune.FINETUNE_PRESETS) and base variant."""

    preset: str                         # "tiny", "demo" or "paper"
    source: DataSource = "stand-in"     # stand-ins written by the data assets, or real folders (run settings)
    # The M2M variant fine-tuned: its <profile>/m2m_<variant>_checkpoint is the base (docs/tasks.md, "Which base").
    base_variant: str = "self"
    objects: int = 0                    # polyhedra written (Objaverse stand-in)
    procedures: int = 0                 # procedures written (VGSI stand-in)
    image_size: int = 32                # stand-in renders, px (the reader resizes to the network's size)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in DATA_ASSETS:
            raise ValueError(f"TaskDataSpec.source must be one of {sorted(DATA_ASSETS)}, got {self.source!r}")
        if self.base_variant not in ("self", "dino"):
            raise ValueError(f"TaskDataSpec.base_variant must be 'self' or 'dino', got {self.base_variant!r}")
        if self.source == "stand-in" and min(self.objects, self.procedures) < 1:
            raise ValueError("TaskDataSpec: a stand-in needs objects and procedures >= 1")

    def data_asset(self, task: str) -> str:
        return DATA_ASSETS[self.source][task]

    @property
    def base_asset(self) -> str:
        return f"m2m_{self.base_variant}_checkpoint"

    @property
    def base_dir(self) -> Path:
        """The base checkpoint's weights, under the profile's models_dir (what base_asset writes)."""
        return Path(f"m2m_{self.base_variant}") / "final"


TASK_DATA: dict[str, TaskDataSpec] = {
    "smoke": TaskDataSpec(preset="tiny", objects=8, procedures=8),
    "demo": TaskDataSpec(preset="demo", objects=300, procedures=300),
    # Figs. 7-8: the paper's fine-tunes start from M2M-DINO, on Objaverse renders and VGSI.
    "paper": TaskDataSpec(preset="paper", source="folder", base_variant="dino"),
}


def task_asset_names(profile: RunProfile) -> list[str]:
    """The profile's task asset names (none for a profile without TASK_DATA)."""
    spec = TASK_DATA.get(profile.name)
    if spec is None:
        return []
    return [*(spec.data_asset(t) for t in TASKS), *(f"{t}_checkpoint" for t in TASKS),
            *(f"{t}_evaluation" for t in TASKS)]


def finetune_layout(profile: RunProfile) -> dict[str, Path]:
    """Where each task asset writes, relative to the repo root (a folder data asset: its index and preview)."""
    a, m = profile.assets_dir, profile.models_dir
    spec = TASK_DATA.get(profile.name, TASK_DATA["smoke"])
    return {
        **{spec.data_asset(t): a / "tasks" / spec.data_asset(t) for t in TASKS},
        "nvs_checkpoint": m / "nvs",
        "procedure_checkpoint": m / "procedure",
        "nvs_evaluation": a / "evaluation" / "nvs",
        "procedure_evaluation": a / "evaluation" / "procedure",
    }


FINETUNE_DVC_STAGE = {name: name for names in DATA_ASSETS.values() for name in names.values()} | {
    name: name for name in ("nvs_checkpoint", "procedure_checkpoint", "nvs_evaluation", "procedure_evaluation")}


def task_data_dirs(profile: RunProfile, given: dict[str, str | None], root: Path) -> dict[str, Path]:
    """The task folders a "folder" profile reads, from the run settings `given` ({setting: value}, relative to
    `root` unless absolute); a Failure naming the setting when a folder is missing, or when one is set for a
    profile without folders. Called by M2MSettings.resolve, so before any step of the run does anything. An
    unset setting passes here (runs of the chain without the task assets need none) and fails the task steps
    (`task_data_root`)."""
    field = "resources.settings.config"
    spec = TASK_DATA.get(profile.name)
    dirs: dict[str, Path] = {}
    for task, setting in FOLDER_SETTINGS.items():
        value = given.get(setting)
        if value is None:
            continue
        if spec is None or spec.source != "folder":
            raise Failure(f"{field}.{setting}: profile {profile.name!r} has no task data folders (its task "
                          f"data are stand-ins or none); remove the setting")
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.is_dir():
            raise Failure(f"{field}.{setting}: no folder at {path} ({FOLDER_WHAT[task]}; docs/tasks.md)")
        dirs[setting] = path
    return dirs


def task_data_root(profile: RunProfile, r: Any, task: str) -> Path:
    """The folder a task's fine-tune and evaluation read: the stand-in's asset folder or the setting's folder."""
    spec = TASK_DATA[profile.name]
    if spec.source == "stand-in":
        return r.path(finetune_layout(profile)[spec.data_asset(task)])
    setting = FOLDER_SETTINGS[task]
    if setting not in r.task_dirs:
        raise Failure(f"resources.settings.config.{setting}: not set; profile {profile.name!r} fine-tunes on a "
                      f"folder of {FOLDER_WHAT[task]} (m2m_pipeline/configs/{profile.name}.yaml)")
    return r.task_dirs[setting]


class FinetuneAssetConfig(Config):
    steps: int | None = None        # fine-tuning steps (default: the preset's)
    eval_items: int | None = None   # held-out items evaluated (default: the preset's held-out split)
    # Field overrides of the library's configs (checked against their fields), e.g. for a dry run:
    # finetune: {held_out: 1, validation: 1}, train: {batch_size: 1, global_batch_size: 1}, eval: {steps: 1}.
    # The evaluation reads the fine-tune's own FinetuneConfig (splits.json) and applies only `eval` / eval_items.
    finetune: dict[str, Any] = {}   # FinetuneConfig fields (held_out, validation, spatial_bias, ...)
    train: dict[str, Any] = {}      # TrainConfig fields of the fine-tune
    eval: dict[str, Any] = {}       # TaskEvalConfig fields


def build_finetune_assets(profile: RunProfile) -> list[Any]:
    if profile.name not in TASK_DATA:
        return []
    data = (standin_data_assets if TASK_DATA[profile.name].source == "stand-in" else folder_data_assets)(profile)
    return [*data, *(finetune_checkpoint_asset(profile, task) for task in TASKS),
            *(finetune_evaluation_asset(profile, task) for task in TASKS)]


def _key(profile: RunProfile, name: str) -> AssetKey:
    return AssetKey([profile.name, name])


def _replace_checked(obj: Any, changes: dict[str, Any], where: str) -> Any:
    if not changes:
        return obj
    fields = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise Failure(f"{where}.{unknown[0]}: not a {type(obj).__name__} field; choose from {sorted(fields)}")
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as exn:
        raise Failure(f"{where}: {exn}") from exn


def _with_eval_overrides(ft: Any, cfg: FinetuneAssetConfig) -> Any:
    ec = _replace_checked(ft.eval, dict(cfg.eval), "config.eval")
    if cfg.eval_items is not None:
        ec = dataclasses.replace(ec, max_items=cfg.eval_items)
    return dataclasses.replace(ft, eval=ec)


def _finetune_config(profile: RunProfile, task: str, cfg: FinetuneAssetConfig) -> Any:
    """The profile's fine-tuning preset for `task`, with the asset config's overrides."""
    from m2m_pipeline.tasks.finetune import FinetuneConfig

    ft = FinetuneConfig.preset(TASK_DATA[profile.name].preset, TASKS[task])
    train = {**cfg.train, **({"steps": cfg.steps} if cfg.steps is not None else {})}
    ft = _replace_checked(ft, {k: v for k, v in cfg.finetune.items() if k not in ("train", "eval")}, "config.finetune")
    ft = dataclasses.replace(ft, train=_replace_checked(ft.train, train, "config.train"))
    return _with_eval_overrides(ft, cfg)


def _gpu_step(profile: RunProfile) -> dict[str, Any]:
    """A GPU profile's model steps hold one GPU each (its pod's limit, the `gpu` pool); the CPU profiles' task
    steps keep no tag, so demo's two fine-tunes run side by side (configs/demo.yaml)."""
    if not profile.gpu:
        return {}
    return {"op_tags": ProfileGraph.of(profile).gpu_tags, "pool": GPU_POOL}


# ------------------------------------------------------------------ task data: stand-ins
def standin_data_assets(profile: RunProfile) -> list[Any]:
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

    return [objaverse_standin, vgsi_standin]


# ------------------------------------------------------------------ task data: real folders
def folder_data_assets(profile: RunProfile) -> list[Any]:
    """Check and index the folders of the run settings; the fine-tunes read the folders themselves."""
    from m2m_pipeline.tasks.finetune import FinetuneConfig

    spec, paths = TASK_DATA[profile.name], finetune_layout(profile)
    nvs_name, proc_name = spec.data_asset("nvs"), spec.data_asset("procedure")

    @asset(key=_key(profile, nvs_name), group_name="tasks", kinds={"python", "png"},
           description="The Objaverse renders folder (run setting objaverse_dir, Zero-1-to-3 layout): every object "
                       "checked (12 views, NNN.png + NNN.npy), indexed, and a preview of a few objects.")
    def objaverse_renders(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                          dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.errors import TaskDataError
        from m2m_pipeline.tasks.folders import objaverse_catalog

        with tracked_step(profile, context, settings, mlflow, dvc, nvs_name,
                          lambda r: {"objaverse_dir": str(task_data_root(profile, r, "nvs"))}) as step:
            out = step.r.path(paths[nvs_name])
            try:
                index = objaverse_catalog(task_data_root(profile, step.r, "nvs"), out)
            except TaskDataError as exn:
                raise Failure(f"resources.settings.config.objaverse_dir: {exn}") from exn
            step.run.log_artifact(index["files"]["preview"])
        return MaterializeResult(metadata={
            "objects": index["objects"], "views_per_object": index["views_per_object"],
            "folder": str(task_data_root(profile, step.r, "nvs")), "keys_sha256": index["keys_sha256"],
            "preview": image_markdown(index["files"]["preview"], "objects x views"), **step.metadata([out])})

    @asset(key=_key(profile, proc_name), group_name="tasks", kinds={"python", "png"},
           description="The VGSI folder (run setting vgsi_dir: index.json or article/method folders): procedures "
                       "listed and counted (those long enough for the fine-tune), indexed, and a preview.")
    def vgsi_procedures(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                        dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.errors import TaskDataError
        from m2m_pipeline.tasks.folders import vgsi_catalog

        min_steps = FinetuneConfig.preset(spec.preset, "position").min_steps
        with tracked_step(profile, context, settings, mlflow, dvc, proc_name,
                          lambda r: {"vgsi_dir": str(task_data_root(profile, r, "procedure")),
                                     "min_steps": min_steps}) as step:
            out = step.r.path(paths[proc_name])
            try:
                index = vgsi_catalog(task_data_root(profile, step.r, "procedure"), out, min_steps=min_steps)
            except TaskDataError as exn:
                raise Failure(f"resources.settings.config.vgsi_dir: {exn}") from exn
            step.run.log_artifact(index["files"]["preview"])
        return MaterializeResult(metadata={
            "procedures": index["procedures"], "usable": index["usable"], "min_steps": min_steps,
            "skipped_short": index["skipped_short"], "articles": index["articles"],
            "folder": str(task_data_root(profile, step.r, "procedure")), "keys_sha256": index["keys_sha256"],
            "steps_histogram": MetadataValue.json(index["steps_histogram"]),
            "preview": image_markdown(index["files"]["preview"], "procedures x steps"), **step.metadata([out])})

    return [objaverse_renders, vgsi_procedures]


# ------------------------------------------------------------------ fine-tuning
def finetune_checkpoint_asset(profile: RunProfile, task: str) -> Any:
    spec, name, paths = TASK_DATA[profile.name], f"{task}_checkpoint", finetune_layout(profile)

    @asset(key=_key(profile, name), group_name="tasks",
           deps=[_key(profile, spec.data_asset(task)), _key(profile, spec.base_asset)], kinds={"pytorch"},
           description=f"M2M fine-tuned for {'novel view synthesis' if task == 'nvs' else 'procedures'} "
                       f"from the profile's {spec.base_asset} (task embedder zero-initialised).", **_gpu_step(profile))
    def checkpoint(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                   compute: ComputeResource, mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.io import atomic_write_text
        from m2m_pipeline.tasks.finetune import finetune

        ft = _finetune_config(profile, task, config)
        device = compute.resolved_device()
        params = lambda r: {"task": ft.task, "preset": spec.preset, "device": device,
                            "steps": ft.train.steps, "batch_size": ft.train.batch_size, "lr": ft.train.lr,
                            "global_batch_size": ft.train.global_batch_size, "base": str(profile.models_dir / spec.base_dir),
                            "data": str(task_data_root(profile, r, task))}
        with tracked_step(profile, context, settings, mlflow, dvc, name, params, tags={"m2m.task": ft.task}) as step:
            r, run = step.r, step.run
            out, data, base = r.path(paths[name]), task_data_root(profile, r, task), r.path(profile.models_dir / spec.base_dir)
            result, splits = finetune(ft, data, out, base=base, progress=False, device=device,
                                      autoencoder=r.mis.vae_path, on_metrics=run.metrics_logger("train"))
            # what `m2m evaluate-task --run` and the evaluation asset read back (tasks/cli.py writes the same)
            atomic_write_text(out / "splits.json", [json.dumps(
                {"data": str(data), "base": str(base), "dino": None, "autoencoder": r.mis.vae_path,
                 "config": ft.to_dict(), **dataclasses.asdict(splits)}, indent=1)])
            plot = loss_plot(result.losses, out / "loss.png", f"{task} fine-tuning ({profile.name})")
            run.log_artifact(plot)
            run.log_metrics({"train/final_loss": result.final_loss, "train/seconds": result.seconds})
        return MaterializeResult(metadata={
            "task": ft.task, "steps": result.steps, "final_loss": round(result.final_loss, 5),
            "seconds": round(result.seconds, 1), "train_items": len(splits.train), "device": device,
            "base_variant": spec.base_variant, "test_items": len(splits.test),
            "loss_curve": image_markdown(plot, "fine-tuning loss"), **step.metadata([out])})

    return checkpoint


def finetune_evaluation_asset(profile: RunProfile, task: str) -> Any:
    spec, name, ckpt, paths = TASK_DATA[profile.name], f"{task}_evaluation", f"{task}_checkpoint", finetune_layout(profile)

    @asset(key=_key(profile, name), group_name="tasks",
           deps=[_key(profile, ckpt), _key(profile, spec.data_asset(task)), _key(profile, spec.base_asset)],
           kinds={"pytorch"}, **_gpu_step(profile),
           description="Held-out evaluation: fine-tuned vs before fine-tuning vs the copy baseline (PSNR, "
                       "SSIM" + (", progress check" if task == "procedure" else "") + "), dual guidance; "
                       "a grid of every method and a figure as Fig. " + ("7." if task == "nvs" else "8."))
    def evaluation(context: AssetExecutionContext, config: FinetuneAssetConfig, settings: M2MSettings,
                   compute: ComputeResource, mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.tasks.evaluate import evaluate_finetune, report_metrics
        from m2m_pipeline.tasks.finetune import FinetuneConfig

        device = compute.resolved_device()
        trained = settings.resolve(profile).path(paths[ckpt]) / "splits.json"
        recorded = json.loads(trained.read_text()).get("config") if trained.is_file() else None
        # the fine-tune's own config (its splits, sizes and eval settings); older outputs recorded none
        ft = (_with_eval_overrides(FinetuneConfig.from_dict(recorded), config) if recorded
              else _finetune_config(profile, task, config))
        params = lambda r: {"task": ft.task, "steps": ft.eval.steps, "context_images": ft.eval.context_images,
                            "target_images": ft.eval.target_images, "device": device}
        with tracked_step(profile, context, settings, mlflow, dvc, name, params, tags={"m2m.task": ft.task}) as step:
            r, out = step.r, step.r.path(paths[name])
            start = time.perf_counter()
            report = evaluate_finetune(ft, task_data_root(profile, r, task), r.path(paths[ckpt]) / "final", out,
                                       base=r.path(profile.models_dir / spec.base_dir), progress=False,
                                       autoencoder=r.mis.vae_path, device=device)
            step.run.log_params({f"sampler.{k}": v for k, v in report["sampler"].items()})
            step.run.log_metrics(report_metrics(report))
            for path in report["files"].values():
                step.run.log_artifact(path)
        s = report["summary"]
        return MaterializeResult(metadata={
            "table": MetadataValue.md(report["table"]), "sampler": MetadataValue.json(report["sampler"]),
            **{f"psnr/{m}": round(row["psnr_mean"], 3) for m, row in s.items()},
            "grid": image_markdown(report["files"]["grid"], "context | fine-tuned | before | baseline | truth"),
            "figure": image_markdown(report["files"]["figure"], "context | fine-tuned (as Figs. 7-8)"),
            "psnr_chart": image_markdown(report["files"]["psnr_chart"], "PSNR per method"),
            "seconds": round(time.perf_counter() - start, 1), "device": device, **step.metadata([out])})

    return evaluation


# The smallest task run: one fine-tuning step of one example, one held-out item through one DDIM step (the paper
# dry run, orchestration/dryrun.py), on the fixtures' default sizes (tasks/folders.py FIXTURE_ITEMS /
# FIXTURE_STEPS: test + validation + one training batch and one to spare; the paper preset's min_steps).
DRYRUN_TASK_ITEMS, DRYRUN_TASK_STEPS = FIXTURE_ITEMS, FIXTURE_STEPS


def dryrun_task_ops(profile: RunProfile) -> dict[str, Any]:
    """`ops:` run config sizing the profile's task steps for a dry run (FinetuneAssetConfig of each op)."""
    train = {"steps": 1, "finetune": {"held_out": 1, "validation": 1},
             "train": {"batch_size": 1, "global_batch_size": 1, "num_workers": 0, "checkpoint_every": 0}}
    evaluate = {"eval_items": 1, "eval": {"steps": 1, "sweep_s_C": [7.5], "sweep_items": 1, "batch_size": 1}}
    return {f"{profile.name}__{task}_{kind}": {"config": config} for task in TASKS
            for kind, config in (("checkpoint", train), ("evaluation", evaluate))}


def finetune_jobs(profile: RunProfile) -> list[Any]:
    from dagster import define_asset_job

    from m2m_pipeline.orchestration.jobs import profile_executor

    if profile.name not in TASK_DATA:
        return []
    p, spec = profile.name, TASK_DATA[profile.name]
    return [define_asset_job(f"m2m_{p}_finetune_job", selection=AssetSelection.assets(
        *[[p, n] for n in task_asset_names(profile)]), tags={"m2m/profile": p}, executor_def=profile_executor(profile),
        description=f"Task data, NVS and procedure fine-tuning from {spec.base_asset}, held-out evaluations.")]
