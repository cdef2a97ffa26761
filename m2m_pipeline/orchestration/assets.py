"""The M2M asset graph, built once per run profile (keys `<profile>/<asset>`).

Assets are thin adapters: each calls the library (m2m_pipeline.data / training / sampling), tracks the
call in a nested MLflow run, versions its outputs with DVC and returns the metadata people look for.
Files on disk are the hand-off between assets (their paths follow from the profile), so any asset can be
re-materialized alone, from the UI, the CLI or `dvc repro`, without an IO manager's pickles.
"""



import base64
import dataclasses
import io
import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Backoff,
    BackfillPolicy,
    BetaWarning,
    Config,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    StaticPartitionsDefinition,
    asset,
    asset_check,
    multi_asset,
)

from m2m_pipeline.data.captions import SPLITS
from m2m_pipeline.orchestration.profiles import RunProfile
from m2m_pipeline.orchestration.resources import (
    ComputeResource,
    DVCResource,
    M2MSettings,
    MLflowResource,
    Resolved,
)
from m2m_pipeline.tracking import MlflowRun

CELERY_GPU_QUEUE = "gpu"  # the Celery queue of GPU steps (cluster profile); other steps go to "dagster"
# Partitioned data steps are resumable (finished shards are skipped, partial ones removed), so a failed or
# lost attempt is retried: on the Celery executor a killed worker's step goes back to its queue.
DATA_RETRY = RetryPolicy(max_retries=2, delay=2, backoff=Backoff.EXPONENTIAL)
GPU_POOL = "gpu"  # instance concurrency pool of the steps that hold a GPU (dagster instance concurrency set gpu N)
VARIANTS = ("self", "dino")


# ====================================================================== paths (relative to the repo root)
def layout(profile: RunProfile) -> dict[str, Path]:
    a, m = profile.assets_dir, profile.models_dir
    return {
        "raw_captions": a / "captions" / "raw.tsv",
        "filtered_captions": a / "captions" / "filtered",          # captions.jsonl + captions.jsonl.stats.json
        "mis_shards": a / "mis",                                     # <split>/mis-NNNNNN.tar + .json
        "autoencoder": profile.autoencoder_dir,                      # vae/ + autoencoder.json (CPU profiles)
        "base_model": profile.base_model_dir,                        # SD pipeline folder + base_model.json
        "features": a / "features",                                  # latent_cache and dino_features share it
        "m2m_self_checkpoint": m / "m2m_self",
        "m2m_dino_checkpoint": m / "m2m_dino",
        "m2m_self_evaluation_report": a / "evaluation" / "m2m_self",
        "m2m_dino_evaluation_report": a / "evaluation" / "m2m_dino",
        "sampling_benchmark": a / "evaluation" / "sampling_benchmark",
        "attribute_oracle": m / "oracle",
        "learnability": a / "evaluation" / "learnability",
        "coco_zero_shot": a / "evaluation" / "coco_zero_shot",            # m2m_{self,dino}/ (paper profile)
    }


# The dvc.yaml stage (`<stage>@<profile>`) that versions each asset; latent_cache and dino_features are
# written together into one feature shard per MIS shard (the loader reads both from one tar), so they
# share the `feature_caches` stage.
DVC_STAGE = {
    "raw_captions": "raw_captions", "filtered_captions": "filtered_captions", "mis_shards": "mis_shards",
    "autoencoder": "autoencoder", "base_model": "base_model",
    "latent_cache": "feature_caches", "dino_features": "feature_caches",
    "m2m_self_checkpoint": "m2m_self_checkpoint", "m2m_dino_checkpoint": "m2m_dino_checkpoint",
    "m2m_self_evaluation_report": "m2m_self_evaluation_report",
    "m2m_dino_evaluation_report": "m2m_dino_evaluation_report", "sampling_benchmark": "sampling_benchmark",
    "attribute_oracle": "attribute_oracle", "learnability": "learnability",
}


def captions_table(r: Resolved) -> Path:
    return r.path(layout(r.profile)["filtered_captions"]) / "captions.jsonl"


def owned_shards(directory: Path, partitions: list[int], world: int) -> list[Path]:
    """Committed shards (tar + manifest) of `directory` owned by the given partitions (index % world)."""
    out = []
    for tar in sorted(directory.glob("mis-*.tar")):
        index = int(tar.stem.split("-")[1])
        if index % world in partitions and tar.with_suffix(".json").exists():
            out.append(tar)
    return out


def image_markdown(png: Path, alt: str) -> MetadataValue:
    """A PNG inlined as a markdown image (data URI), so the Dagster UI renders it in the metadata (raw HTML
    <img> is stripped by the UI's sanitiser; markdown images are not)."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{data})\n\n`{png}`")


def loss_plot(losses: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def common_metadata(r: Resolved, run: MlflowRun, hashes: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    meta: dict[str, Any] = {"paths": MetadataValue.json([str(p.relative_to(r.root)) for p in paths])}
    if run.url:
        meta["mlflow_run"] = MetadataValue.url(run.url)
        meta["mlflow_run_id"] = run.run_id
    if hashes:
        outs = hashes.get("outs", {})
        meta["dvc_stage"] = hashes.get("stage", "")
        meta["dvc_hash"] = ", ".join(f"{k}: {v}" for k, v in outs.items()) or "-"
        meta["dvc_deps"] = MetadataValue.json(hashes.get("deps", {}))
    return meta


def version(dvc: DVCResource, run: MlflowRun, r: Resolved, asset_name: str, context: AssetExecutionContext
            ) -> dict[str, Any]:
    """DVC commit + push of the asset's stage; the hashes go to MLflow tags and the metadata."""
    stage = f"{DVC_STAGE.get(asset_name, asset_name)}@{r.profile.name}"  # other assets' stages bear their names
    if not dvc.enabled:
        return {}
    if dvc.mode == "pointers":
        return _version_partition(dvc, run, r, asset_name, context)
    if not dvc.has_stage(stage):
        context.log.warning(f"dvc.yaml has no stage {stage}: {asset_name} is not versioned by DVC")
        return {}
    hashes = dvc.commit(stage)
    run.set_tags({"dvc.outs": json.dumps(hashes.get("outs", {}), sort_keys=True)[:5000],
                  "dvc.deps": json.dumps(hashes.get("deps", {}), sort_keys=True)[:5000]})
    return hashes


# What the pointers mode versions from the executor that wrote it: each partition step its shards (pointer set
# `<name>/<partition>`), each training step its final checkpoint (`<name>/all`). The layout key is the pointer name.
POINTER_ASSETS = {"mis_shards": "mis_shards", "latent_cache": "features", "dino_features": "features",
                  "feature_caches": "features", "m2m_self_checkpoint": "m2m_self_checkpoint",
                  "m2m_dino_checkpoint": "m2m_dino_checkpoint"}


def _version_partition(dvc: DVCResource, run: MlflowRun, r: Resolved, asset_name: str, context: Any
                       ) -> dict[str, Any]:
    """pointers mode: this step's files pushed from a working copy of its own, pointers published."""
    if asset_name not in POINTER_ASSETS:
        return {}  # captions, oracle, reports: small, written once, not versioned per executor
    name = POINTER_ASSETS[asset_name]
    if name.endswith("_checkpoint"):
        final = r.path(layout(r.profile)[name]) / "final"
        published = str(dvc.pointer_store().push_partition(r.root, name, "all", sorted(
            f for f in final.rglob("*") if f.is_file())))
        run.set_tags({"dvc.pointers": published})
        return {"stage": f"pointers:{name}", "outs": {published: None}}
    from m2m_pipeline.data.shards import shard_index

    keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else []
    by_partition: dict[int, list[Path]] = {int(k): [] for k in keys}
    for f in sorted(r.path(layout(r.profile)[name]).glob("*/mis-*")):  # shard i belongs to partition i % n
        p = shard_index(f.name) % r.profile.num_partitions
        if f.is_file() and p in by_partition:
            by_partition[p].append(f)
    published = [str(dvc.pointer_store().push_partition(r.root, name, str(p), files))
                 for p, files in sorted(by_partition.items())]
    run.set_tags({"dvc.pointers": json.dumps(published)[:5000]})
    return {"stage": f"pointers:{name}", "outs": {f: None for f in published}}


class MISShardsConfig(Config):
    force: bool = False  # regenerate this run's shards even when a finished shard matches the request


class EvaluationConfig(Config):
    seed: int = 0        # sampling seed of the evaluation grid


# ====================================================================== the graph of one profile
@dataclass(frozen=True)
class ProfileGraph:
    """What every asset factory of one profile shares: its key prefix, paths, partitions and GPU tags."""

    profile: RunProfile
    paths: dict[str, Path]
    partitions: StaticPartitionsDefinition
    gpu_tags: dict[str, str]

    @classmethod
    def of(cls, profile: RunProfile) -> "ProfileGraph":
        gpu_tags = {"m2m/gpu": "1"}
        if profile.executor == "celery":  # dagster-celery routes the step to the workers of queue `gpu`
            gpu_tags["dagster-celery/queue"] = CELERY_GPU_QUEUE
        if profile.gpu:  # read by dagster-k8s' k8s_job_executor: one GPU per step pod
            gpu_tags["dagster-k8s/config"] = json.dumps(
                {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}})
        return cls(profile, layout(profile), StaticPartitionsDefinition(profile.partition_keys), gpu_tags)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def pool(self) -> str | None:
        """The GPU pool of the data steps (training and evaluation always take it)."""
        return GPU_POOL if self.profile.gpu else None

    def key(self, name: str) -> AssetKey:
        return AssetKey([self.profile.name, name])


@dataclass
class Step:
    """One asset step's resolved settings, nested MLflow run and DVC hashes (filled when the step versions)."""

    r: Resolved
    run: MlflowRun
    hashes: dict[str, Any] = field(default_factory=dict)

    def metadata(self, paths: list[Path]) -> dict[str, Any]:
        return common_metadata(self.r, self.run, self.hashes, paths)


@contextmanager
def tracked_step(profile: RunProfile, context: Any, settings: M2MSettings, mlflow: MLflowResource, dvc: DVCResource,
                 asset_name: str, params: Callable[[Resolved], dict[str, Any]] = lambda r: {},
                 tags: dict[str, str] | None = None) -> Iterator[Step]:
    """resolve -> track -> (the caller's library call) -> version: the frame of every asset. The settings are
    resolved for the profile, the body runs inside a nested MLflow run (params from the resolved settings),
    and on success the asset's DVC stage is committed and its hashes tagged on that run."""
    r = settings.resolve(profile)
    with mlflow.asset_run(context, profile.name, params(r), extra_tags=tags) as run:
        step = Step(r, run)
        yield step
        step.hashes = version(dvc, run, r, asset_name, context)


def build_profile_assets(profile: RunProfile) -> list[Any]:
    """Assets (with their checks) of one profile, keyed `<profile>/<name>`."""
    g = ProfileGraph.of(profile)
    with warnings.catch_warnings():
        # single_run backfill policies let one run hold a whole partition range; we rely on them knowingly
        warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")
        # the attribute oracle and the learnability verdict belong to the shapes world (RunProfile.shapes_world)
        shapes = [attribute_oracle_asset(g), learnability_asset(g)] if profile.shapes_world else []
        return [raw_captions_asset(g), filtered_captions_asset(g), mis_shards_asset(g), feature_caches_asset(g),
                *(checkpoint_asset(g, v) for v in VARIANTS), *shapes,
                *(report_asset(g, v) for v in VARIANTS), sampling_benchmark_asset(g),
                *(autoencoder_assets(g) if profile.autoencoder_preset is not None else []),
                *([base_model_asset(g)] if profile.base_model_preset is not None else []),
                *([dataset_version_asset(g)] if profile.executor in ("celery", "k8s") else []),
                *([coco_zero_shot_asset(g)] if profile.coco_zero_shot else [])]


# ------------------------------------------------------------------ versioning from many executors
def dataset_version_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("dataset_version"), group_name="versioning", deps=[g.key("mis_shards"), g.key("latent_cache")],
           kinds={"dvc", "git"},
           description="The collecting step of DVC from many executors (orchestration/dvc_pointers.py): every MIS "
                       "and feature partition's pointer set (and the checkpoints' once trained) committed to the "
                       "pointer repository; the commit is the version (`git checkout <commit> && dvc pull`).")
    def dataset_version(context: AssetExecutionContext, settings: M2MSettings, dvc: DVCResource) -> MaterializeResult:
        import shutil
        import uuid

        from dagster import Failure

        from m2m_pipeline.orchestration.dvc_pointers import PointerError, clone

        if dvc.mode != "pointers":
            raise Failure("dataset_version needs resources.dvc.config.mode: pointers (DVC from many executors)")
        settings.resolve(g.profile)
        store = dvc.pointer_store()
        parts = g.profile.partition_keys
        repo = clone(dvc.pointer_repo, Path(store.scratch) / f"collector-{uuid.uuid4().hex[:8]}")
        try:
            result = store.collect(repo, {"mis_shards": parts, "features": parts},
                                   f"dataset version of {g.name}: run {context.run_id}")
        except PointerError as exn:
            raise Failure(str(exn)) from exn
        finally:
            shutil.rmtree(repo, ignore_errors=True)
        return MaterializeResult(metadata={"commit": result["commit"], "pointers": result["pointers"],
                                           "pointer_repo": dvc.pointer_repo, "partitions": len(parts)})

    return dataset_version


# ------------------------------------------------------------------ captions
def _caption_sources(r: Resolved, written: Path) -> list[Path]:
    """The caption TSVs of a profile: the one the procedural world wrote, or the configured external ones."""
    from m2m_pipeline.orchestration.profiles import caption_files

    return [written] if r.caption_source == "shapes" else [Path(f) for f in caption_files(str(r.path(r.caption_source)))]


def raw_captions_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("raw_captions"), group_name="captions", kinds={"python", "tsv"},
           description="Caption source in CC12M TSV format (the procedural world writes it; paper: CC12M).")
    def raw_captions(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                     dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.data import write_shapes_caption_tsv

        with tracked_step(g.profile, context, settings, mlflow, dvc, "raw_captions",
                          lambda r: {"caption_source": r.caption_source}) as step:
            r, out = step.r, step.r.path(g.paths["raw_captions"])
            if r.caption_source == "shapes":
                write_shapes_caption_tsv(out, r.mis.num_captions, seed=g.profile.caption_seed)
            files = _caption_sources(r, out)
            if r.caption_source != "shapes":  # external TSVs are referenced, not copied
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("".join(f"{f}\n" for f in files))
            lines = sum(1 for f in files if f.suffix == ".tsv" for _ in f.open("rb"))
            step.run.log_metrics({"captions/lines": lines})
        return MaterializeResult(metadata={"lines": lines, "files": len(files), **step.metadata([out])})

    return raw_captions


def filtered_captions_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("filtered_captions"), group_name="captions", deps=[g.key("raw_captions")], kinds={"python"},
           check_specs=[AssetCheckSpec("caption_table_valid", asset=g.key("filtered_captions"), blocking=True,
                                       description="every caption within CLIP's 77 tokens, unique ids, "
                                                   "splits as hashed (data.validators.validate_caption_table)")],
           description="Captions kept by the 77-token CLIP filter, with ids and train/test split (Sec. 4).")
    def filtered_captions(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                          dvc: DVCResource):
        from m2m_pipeline.data import filter_captions, validate_caption_table

        params = lambda r: {"max_tokens": r.mis.max_tokens, "dedup": r.mis.dedup,  # noqa: E731
                            "test_fraction": r.mis.test_fraction}
        with tracked_step(g.profile, context, settings, mlflow, dvc, "filtered_captions", params) as step:
            r, table = step.r, captions_table(step.r)
            start = time.perf_counter()
            stats = filter_captions(_caption_sources(r, r.path(g.paths["raw_captions"])), table, r.mis, progress=False)
            seconds = time.perf_counter() - start
            step.run.log_metrics({f"captions/{k}": v for k, v in stats.to_dict().items() if isinstance(v, int)})
            check = validate_caption_table(table, max_tokens=r.mis.max_tokens)
        yield MaterializeResult(metadata={
            "kept": stats.kept, "train": stats.train, "validation": stats.validation, "test": stats.test,
            "dropped": MetadataValue.json({"malformed": stats.malformed, "empty": stats.empty,
                                           "too_long": stats.too_long,
                                           "duplicates": stats.duplicates if r.mis.dedup else 0}),
            "duplicates_seen": stats.duplicates, "lines_read": stats.lines_read,
            "lines_per_s": round(stats.lines_read / max(seconds, 1e-9), 1), **step.metadata([table])})
        yield check_result("caption_table_valid", g.key("filtered_captions"), check)

    return filtered_captions


# ------------------------------------------------------------------ MIS shards (partitioned)
def mis_shards_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("mis_shards"), group_name="mis", deps=[g.key("filtered_captions")], partitions_def=g.partitions,
           backfill_policy=BackfillPolicy.single_run(), kinds={"python", "webdataset"}, op_tags=g.gpu_tags,
           pool=g.pool, retry_policy=DATA_RETRY,
           check_specs=[AssetCheckSpec("mis_shards_valid", asset=g.key("mis_shards"), blocking=True,
                                       description="25 decodable images per set, captions within the token "
                                                   "limit, bytes and keys match the manifest")],
           description="Multi-Image Sets: 25 images per caption, webdataset shards; partition p holds the "
                       "shards with index % partitions == p of both splits.")
    def mis_shards(context: AssetExecutionContext, config: MISShardsConfig, settings: M2MSettings,
                   compute: ComputeResource, mlflow: MLflowResource, dvc: DVCResource):
        from m2m_pipeline.data import validate_mis_shard

        world, mine = g.profile.num_partitions, [int(k) for k in context.partition_keys]
        params = lambda r: {"preset": r.mis.name, "generator": r.mis.generator,  # noqa: E731
                            "resolution": r.mis.resolution, "images_per_set": r.mis.images_per_set,
                            "sets_per_shard": r.mis.sets_per_shard, "seed": r.mis.seed,
                            "partitions": f"{mine} of {world}"}
        with tracked_step(g.profile, context, settings, mlflow, dvc, "mis_shards", params) as step:
            r, root = step.r, step.r.path(g.paths["mis_shards"])
            manifests, shards, seconds = _generate_owned_mis(r, root, mine, world, config.force, compute)
            made = [m for m in manifests if not m["skipped"]]
            sets = sum(m["num_samples"] for m in manifests)
            images_per_s = sum(m["num_samples"] for m in made) * r.mis.images_per_set / max(seconds, 1e-9)
            step.run.log_metrics({"mis/shards": len(manifests), "mis/shards_written": len(made), "mis/sets": sets,
                                  "mis/images_per_s": images_per_s})
        checks = [validate_mis_shard(s, r.mis.images_per_set, r.mis.max_tokens) for s in shards]
        grid = _mis_preview(shards[:1], r, root) if shards else None
        meta = {"shards": len(manifests), "shards_written": len(made), "shards_skipped": len(manifests) - len(made),
                "sets": sets, "images": sets * r.mis.images_per_set, "seconds": round(seconds, 2),
                "images_per_s": round(images_per_s, 1), "bytes": sum(m["bytes"] for m in manifests),
                **step.metadata(shards)}
        if grid is not None:
            meta["preview"] = image_markdown(grid, "first sets of the first shard")
        yield MaterializeResult(metadata=meta)
        yield merged_check("mis_shards_valid", g.key("mis_shards"), checks)

    return mis_shards


def _generate_owned_mis(r: Resolved, root: Path, mine: list[int], world: int, force: bool,
                        compute: ComputeResource) -> tuple[list[dict[str, Any]], list[Path], float]:
    """The library's generate_mis over the partitions this step owns, both splits: (manifests, shards, seconds)."""
    from m2m_pipeline.data import generate_mis, make_generator

    if force:
        for split in SPLITS:
            for tar in owned_shards(root / split, mine, world):
                tar.with_suffix(".json").unlink(missing_ok=True)  # uncommit: regenerated below
    generator = make_generator(r.mis, device=compute.resolved_device(), dtype=compute.dtype)
    start = time.perf_counter()
    manifests: list[dict[str, Any]] = []
    shards: list[Path] = []
    for rank in mine:
        for split in SPLITS:
            done = generate_mis(captions_table(r), root / split, generator, r.mis, split=split, rank=rank,
                                world_size=world, progress=False)
            manifests += done
            shards += [root / split / m["shard"] for m in done]
    return manifests, shards, time.perf_counter() - start


# ------------------------------------------------------------------ feature caches (partitioned)
def feature_caches_asset(g: ProfileGraph) -> Any:
    ae_deps = [g.key("autoencoder")] if g.profile.autoencoder_preset is not None else []
    feature_check = lambda name: AssetCheckSpec(  # noqa: E731
        "feature_shards_valid", asset=g.key(name), blocking=True,
        description="finite fp16 latents and DINO features of the expected shapes, keys match the MIS shard")

    @multi_asset(
        specs=[AssetSpec(g.key("latent_cache"), group_name="features", deps=[g.key("mis_shards")] + ae_deps,
                         kinds={"pytorch"},
                         description="Autoencoder latents of every MIS image (pixels in [-1, 1] for pixel-space "
                                     "presets), fp16, one feature shard per MIS shard."),
               AssetSpec(g.key("dino_features"), group_name="features", deps=[g.key("mis_shards")], kinds={"pytorch"},
                         description="DINOv2 last hidden states (CLS + patches) of every MIS image, fp16, stored "
                                     "in the same feature shards.")],
        check_specs=[feature_check("latent_cache"), feature_check("dino_features")],
        partitions_def=g.partitions, backfill_policy=BackfillPolicy.single_run(), op_tags=g.gpu_tags,
        pool=g.pool, name=f"{g.name}__feature_caches", retry_policy=DATA_RETRY)
    def feature_caches(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                       mlflow: MLflowResource, dvc: DVCResource):
        mine = [int(k) for k in context.partition_keys]
        params = lambda r: {"autoencoder": r.mis.autoencoder,  # noqa: E731
                            "dino": r.mis.dino_path or f"random-{r.mis.dino_hidden_size}x{r.mis.dino_layers}"}
        with tracked_step(g.profile, context, settings, mlflow, dvc, "latent_cache", params) as step:
            r, dst = step.r, step.r.path(g.paths["features"])
            manifests, checks, seconds = _build_owned_features(r, r.path(g.paths["mis_shards"]), dst, mine,
                                                               g.profile.num_partitions, compute)
            images = sum(m["num_samples"] * m["images_per_set"] for m in manifests if not m["skipped"])
            step.run.log_metrics({"features/shards": len(manifests),
                                  "features/images_per_s": images / max(seconds, 1e-9)})
        first = manifests[0] if manifests else {}
        common = {"shards": len(manifests), "shards_skipped": sum(m["skipped"] for m in manifests),
                  "sets": sum(m["num_samples"] for m in manifests), "seconds": round(seconds, 2),
                  "images_per_s": round(images / max(seconds, 1e-9), 1), **step.metadata([dst])}
        yield MaterializeResult(asset_key=g.key("latent_cache"), metadata={
            **common, "shape_per_set": str(first.get("latents_shape")), "dtype": "float16",
            "autoencoder": r.mis.autoencoder})
        yield MaterializeResult(asset_key=g.key("dino_features"), metadata={
            **common, "shape_per_set": str(first.get("dino_shape")), "dtype": "float16",
            "encoder": r.mis.dino_path or f"random DINOv2 {r.mis.dino_hidden_size} wide, {r.mis.dino_layers} layers"})
        yield merged_check("feature_shards_valid", g.key("latent_cache"), checks)
        yield merged_check("feature_shards_valid", g.key("dino_features"), checks)

    return feature_caches


def _build_owned_features(r: Resolved, src: Path, dst: Path, mine: list[int], world: int, compute: ComputeResource
                          ) -> tuple[list[dict[str, Any]], list[Any], float]:
    """The library's build_feature_shard over the MIS shards this step owns: (manifests, checks, seconds)."""
    from m2m_pipeline.data import build_feature_shard, load_feature_encoders, validate_feature_shard

    autoencoder, dino = load_feature_encoders(r.mis, compute.resolved_device())
    start = time.perf_counter()
    manifests, checks = [], []
    for split in SPLITS:
        for shard in owned_shards(src / split, mine, world):
            manifests.append(build_feature_shard(shard, dst / split, autoencoder, dino, r.mis, progress=False))
            checks.append(validate_feature_shard(dst / split / shard.name))
    return manifests, checks, time.perf_counter() - start


# ------------------------------------------------------------------ training
def checkpoint_asset(g: ProfileGraph, variant: str) -> Any:
    name = f"m2m_{variant}_checkpoint"
    deps = [g.key("latent_cache")] + ([g.key("dino_features")] if variant == "dino" else [])
    deps += [g.key("base_model")] if g.profile.base_model_preset is not None else []  # its initial weights

    @asset(key=g.key(name), group_name="training", deps=deps, kinds={"pytorch"}, op_tags=g.gpu_tags, pool=GPU_POOL,
           description=f"M2M-{variant.capitalize()} trained on the train-split feature shards (Sec. 6.1); "
                       f"a diffusers-style folder (config.json + model.safetensors).")
    def checkpoint(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                   mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.orchestration.training_launch import run_training

        with tracked_step(g.profile, context, settings, mlflow, dvc, name, tags={"m2m.variant": variant}) as step:
            r, out = step.r, step.r.path(g.paths[name])
            shards = sorted(str(s) for s in (r.path(g.paths["features"]) / "train").glob("mis-*.tar"))
            if not shards:
                raise FileNotFoundError(f"no train feature shards under {r.path(g.paths['features']) / 'train'}")
            result = run_training(context, r, variant, shards, out, compute, step.run)
            plot = loss_plot(result["losses"], out / "loss.png", f"M2M-{variant} ({g.name})")
            step.run.log_artifact(plot)
            steps_per_s = result["steps"] / max(result["seconds"], 1e-9)
            step.run.log_metrics({"train/final_loss": result["final_loss"], "train/seconds": result["seconds"],
                                  "train/steps_per_s": steps_per_s})
        return MaterializeResult(metadata={
            "variant": variant, "steps": result["steps"], "final_loss": round(result["final_loss"], 5),
            "seconds": round(result["seconds"], 1), "steps_per_s": round(steps_per_s, 2),
            "parameters": result["parameters"], "checkpoint": str(Path(result["checkpoint_dir"]).relative_to(r.root)),
            # the training sets (Sec. 7.1.1; training.draw_subset), also in the checkpoint's train_state.json
            **({"data_subset": MetadataValue.json(result["data_subset"])} if result.get("data_subset") else {}),
            "loss_curve": image_markdown(plot, "training loss"), **step.metadata([out])})

    return checkpoint


# ------------------------------------------------------------------ evaluation
def attribute_oracle_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("attribute_oracle"), group_name="evaluation", kinds={"pytorch"},
           description="Attribute classifier of the procedural shapes world (shape, colour, background pattern, "
                       "background colour), trained on freshly rendered images: the offline judge of consistency "
                       "and the offline FID / IS feature network.")
    def attribute_oracle(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                         mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.orchestration import evaluation

        with tracked_step(g.profile, context, settings, mlflow, dvc, "attribute_oracle",
                          lambda r: {"image_size": r.mis.resolution, **r.eval.oracle_overrides}) as step:
            out = step.r.path(g.paths["attribute_oracle"])
            _, info = evaluation.train_oracle_for(step.r, out, compute)
            accuracy = info["heldout_accuracy"] or {}
            step.run.log_metrics({f"oracle/heldout_{k}": v for k, v in accuracy.items()})
        return MaterializeResult(metadata={
            **{f"heldout_accuracy_{k}": round(v, 4) for k, v in accuracy.items()},
            "image_size": info["image_size"], "train_images": info["train_images"], **step.metadata([out])})

    return attribute_oracle


def report_asset(g: ProfileGraph, variant: str) -> Any:
    name, ckpt = f"m2m_{variant}_evaluation_report", f"m2m_{variant}_checkpoint"
    shapes = g.profile.shapes_world
    what = ("the Sec. 8.4 protocol per position (oracle consistency, caption agreement, FID / IS on oracle "
            "features), the unconditional branch, drift over 25 images, 1-4 preceding images, zero-shot real "
            "photographs, and their figures" if shapes else
            "Table 1 of Sec. 8.4 (FID and IS on Inception features, CLIP text-image and image-image per position, "
            "mean +- std over positions), drift and 1-4 preceding images by CLIP image-image consistency, and "
            "their figures")

    @asset(key=g.key(name), group_name="evaluation",
           deps=[g.key(ckpt), g.key("latent_cache"), g.key("dino_features"),
                 *([g.key("attribute_oracle")] if shapes else [])],
           kinds={"pytorch"}, op_tags=g.gpu_tags, pool=GPU_POOL,
           description=f"M2M-{variant.capitalize()} on the test split: {what}.")
    def report(context: AssetExecutionContext, config: EvaluationConfig, settings: M2MSettings,
               compute: ComputeResource, mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.orchestration import evaluation

        params = lambda r: {"num_sets": r.eval.num_sets, "context_images": r.eval.context_images,  # noqa: E731
                            "generated_images": r.eval.generated_images, "steps": r.eval.steps,
                            "guidance_scale": r.eval.guidance_scale, "context_policy": r.eval.context_policy,
                            "drift_images": r.eval.drift_images, "drift_sets": r.eval.drift_sets, "seed": config.seed}
        with tracked_step(g.profile, context, settings, mlflow, dvc, name, params, tags={"m2m.variant": variant}) as step:
            r, out = step.r, step.r.path(g.paths[name])
            features = r.path(g.paths["features"])
            res = evaluation.evaluate_variant(r, variant, r.path(g.paths[ckpt]) / "final", features / "test",
                                              r.path(g.paths["attribute_oracle"]) if shapes else None, out, compute,
                                              seed=config.seed,
                                              validation_dir=features / "validation")
            _log_report(step.run, res, out)
        return MaterializeResult(metadata={"variant": variant, **_report_metadata(res, r.eval, variant),
                                           **step.metadata([out])})

    return report


def _log_report(run: MlflowRun, res: dict[str, Any], out: Path) -> None:
    """An evaluation report (either kind, evaluation/report.py) into its MLflow run: per-position metrics with
    step = n, Table 1's row (paper) or the position-1 branches (shapes world), the validation sweep, drift, and
    the files."""
    for metric, values in res["report"]["per_position"].items():  # one MLflow step per position n
        for n, value in enumerate(values, start=1):
            run.log_metrics({f"eval/{metric}": value}, step=n)
    for metric, stats in res["report"]["summary"].items():
        run.log_metrics({f"eval/{metric}_mean": stats["mean"], f"eval/{metric}_std": stats["std"]})
    for column, stats in res.get("table1", {}).items():
        run.log_metrics({f"table1/{column}_mean": stats["mean"], f"table1/{column}_std": stats["std"]})
    run.log_params({f"test_sets.{k}": v for k, v in res.get("test_sets", {}).items() if k != "method"})
    for branch, values in res.get("position1", {}).items():
        run.log_metrics({f"position1/{branch}/{k}": v for k, v in values.items()})
    run.log_params({f"chosen.{k}": v for k, v in res["sampling"].items()})
    for i, row in enumerate((res["sweep"] or {}).get("rows", [])):
        run.log_metrics({f"validation_sweep/{k}": row[k] for k in ("score", "colour", "background", "shape",
                                                                   "guidance_scale", "steps")}, step=i)
    for metric, values in res["drift"].items():
        for n, value in enumerate(values, start=1):
            run.log_metrics({f"drift/{metric}": value}, step=n)
    for path in [*res["files"].values(), res["report_path"], out / "table.txt"]:
        run.log_artifact(path)


def _report_metadata(res: dict[str, Any], ev: Any, variant: str) -> dict[str, Any]:
    if res.get("kind") == "paper":
        return _paper_report_metadata(res, ev, variant)
    g, u = res["position1"]["guided"], res["position1"]["unconditional"]
    table = "| position 1 | guided | unconditional | chance | target |\n|---|---|---|---|---|\n" + "".join(
        f"| {k} | {g[k]:.3f} | {u[k]:.3f} | {res['chance'][k]:.3f} | "
        f"{res['verdict'][k]['target'] if k in res['verdict'] else ''} |\n"
        for k in ("colour", "background", "shape", "background_pattern", "background_colour"))
    return {
        "sets": res["num_sets"], "context_images": ev.context_images, "generated_images": ev.generated_images,
        "steps": res["sampling"]["steps"], "guidance_scale": res["sampling"]["guidance_scale"],
        "sampling_chosen_on": res["sampling"]["chosen_on"],
        **({"validation_sweep": MetadataValue.md(res["sweep"]["table"])} if res["sweep"] else {}),
        "position1": MetadataValue.md(table), "protocol_table": MetadataValue.md("```\n" + res["table"] + "\n```"),
        **{f"{m}_mean": round(sv["mean"], 4) for m, sv in res["report"]["summary"].items()},
        "grid": image_markdown(res["files"]["grid"], f"M2M-{variant}: preceding | generated (Fig. 4)"),
        "drift": image_markdown(res["files"]["drift"], "consistency by position"),
        "context_count": image_markdown(res["files"]["context_count"], "vs preceding images (Fig. 6)"),
        "zero_shot": image_markdown(res["files"]["zero_shot"], "real photographs, zero-shot (Fig. 5)"),
        "seconds": MetadataValue.json(res["seconds"])}


def _paper_report_metadata(res: dict[str, Any], ev: Any, variant: str) -> dict[str, Any]:
    """The paper report's metadata: the Table 1 row, the draw of the test sets, the figures."""
    row = res["table1"]
    table = ("| model | " + " | ".join(row) + " |\n|---|" + "---|" * len(row) + "\n"
             + f"| M2M-{variant} | " + " | ".join(f"{v['mean']:.2f} +- {v['std']:.2f}" for v in row.values()) + " |\n")
    draw = res["test_sets"]
    return {
        "sets": res["num_sets"], "context_images": ev.context_images, "generated_images": ev.generated_images,
        "steps": res["sampling"]["steps"], "guidance_scale": res["sampling"]["guidance_scale"],
        "table1": MetadataValue.md(table), "protocol_table": MetadataValue.md("```\n" + res["table"] + "\n```"),
        **{f"{c}_mean": round(v["mean"], 4) for c, v in row.items()},
        "test_sets": MetadataValue.json(draw), "draw_seed": draw["seed"], "candidate_sets": draw["candidates"],
        "grid": image_markdown(res["files"]["grid"], f"M2M-{variant}: preceding | generated (Fig. 4)"),
        **{m: image_markdown(res["files"][m], f"{m} by position") for m in ("fid", "inception_score",
                                                                           "clip_text_image", "clip_image_image")},
        "drift": image_markdown(res["files"]["drift"], "CLIP image-image consistency by position"),
        "context_count": image_markdown(res["files"]["context_count"], "vs preceding images (Fig. 6)"),
        "seconds": MetadataValue.json(res["seconds"])}


def learnability_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("learnability"), group_name="evaluation",
           deps=[g.key("m2m_self_evaluation_report"), g.key("m2m_dino_evaluation_report"),
                 g.key("m2m_self_checkpoint"), g.key("m2m_dino_checkpoint")],
           description="The learnability verdict: per variant, position-1 consistency (guided) against the "
                       "targets (colour >= 0.9, background >= 0.8, shape >= 0.5), the unconditional branch next to "
                       "chance, and the training time it took.")
    def learnability(context: AssetExecutionContext, settings: M2MSettings, mlflow: MLflowResource,
                     dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.evaluation.report import learnability_table

        with tracked_step(g.profile, context, settings, mlflow, dvc, "learnability") as step:
            r, out = step.r, step.r.path(g.paths["learnability"])
            reports = {v: r.path(g.paths[f"m2m_{v}_evaluation_report"]) / "report.json" for v in VARIANTS}
            states = {v: r.path(g.paths[f"m2m_{v}_checkpoint"]) / "final" for v in VARIANTS}
            res = learnability_table(reports, states, out)
            for v, row in res["rows"].items():
                step.run.log_metrics({f"{v}/{k}": val for k, val in row.items() if isinstance(val, (int, float))})
            step.run.log_artifact(res["path"])
        return MaterializeResult(metadata={"table": MetadataValue.md(res["markdown"]),
                                           "all_targets_met": res["all_met"], **step.metadata([out])})

    return learnability


def sampling_benchmark_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("sampling_benchmark"), group_name="evaluation",
           deps=[g.key("m2m_self_checkpoint"), g.key("m2m_dino_checkpoint")], kinds={"pytorch"}, op_tags=g.gpu_tags,
           pool=GPU_POOL,
           description="Fig. 9: seconds per generated image vs context images for the SD baseline (same U-Net, "
                       "text cross-attention), M2M-DINO and M2M-Self with and without its KV cache; ratios to SD.")
    def sampling_benchmark(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                           mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.orchestration import evaluation

        params = lambda r: {"contexts": list(r.eval.benchmark_contexts), "images": r.eval.benchmark_images,  # noqa: E731
                            "steps": r.eval.benchmark_steps, "repeats": r.eval.benchmark_repeats,
                            "guidance": r.eval.guidance_scale, "device": compute.resolved_device()}
        with tracked_step(g.profile, context, settings, mlflow, dvc, "sampling_benchmark", params) as step:
            r, out = step.r, step.r.path(g.paths["sampling_benchmark"])
            rows, plot = evaluation.benchmark(
                r, {v: r.path(g.paths[f"m2m_{v}_checkpoint"]) / "final" for v in VARIANTS}, out, compute)
            for row in rows:
                step.run.log_metrics({f"benchmark/{row['method']}/s_per_image": row["seconds_per_image"],
                                      f"benchmark/{row['method']}/ratio_to_sd": row["ratio_to_sd"]}, step=row["context"])
            step.run.log_artifact(out / "benchmark.json")
            step.run.log_artifact(plot)
        table = "| method | context images | s / image | ratio to SD |\n|---|---|---|---|\n" + "".join(
            f"| {row['method']} | {row['context']} | {row['seconds_per_image']:.4f} | {row['ratio_to_sd']:.2f} |\n"
            for row in rows)
        return MaterializeResult(metadata={
            "table": MetadataValue.md(table), "device": compute.resolved_device(), "steps": r.eval.benchmark_steps,
            "fig9": image_markdown(plot, "seconds per image vs context images"),
            **{f"{row['method']}_ctx{row['context']}_ratio_to_sd": round(row["ratio_to_sd"], 3) for row in rows},
            **step.metadata([out])})

    return sampling_benchmark


# ------------------------------------------------------------------ MSCOCO zero-shot (profiles whose run has COCO)
COCO_FIGURES = {"self": 16, "dino": 17}  # the paper's figure of each variant's MSCOCO continuations


def coco_zero_shot_asset(g: ProfileGraph) -> Any:
    @asset(key=g.key("coco_zero_shot"), group_name="evaluation",
           deps=[g.key(f"m2m_{v}_checkpoint") for v in VARIANTS], kinds={"pytorch"}, op_tags=g.gpu_tags,
           pool=GPU_POOL,
           description="Sec. 8.3, Figs. 16 (M2M-Self) and 17 (M2M-DINO): MSCOCO sets of 4 real images sharing one "
                       "object category (settings.coco_dir), continued zero-shot by both models; CLIP image-image "
                       "consistency of generated image n with the real images, next to real-vs-real and "
                       "other-category references (m2m_pipeline/evaluation/coco_zero_shot.py).")
    def coco_zero_shot(context: AssetExecutionContext, config: EvaluationConfig, settings: M2MSettings,
                       compute: ComputeResource, mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from dagster import Failure

        from m2m_pipeline.data.coco import load_coco_sets
        from m2m_pipeline.evaluation.coco_zero_shot import CocoZeroShotSpec
        from m2m_pipeline.evaluation.coco_zero_shot import coco_zero_shot as continue_coco

        params = lambda r: {"coco_split": r.coco_split, "coco_sets": r.eval.coco_sets,  # noqa: E731
                            "views": r.eval.context_images, "generated_images": r.eval.zero_shot_images,
                            "steps": r.eval.steps, "guidance_scale": r.eval.guidance_scale,
                            "context_policy": r.eval.context_policy, "seed": config.seed, "clip_model": r.clip_model}
        with tracked_step(g.profile, context, settings, mlflow, dvc, "coco_zero_shot", params) as step:
            r, out = step.r, step.r.path(g.paths["coco_zero_shot"])
            if r.coco_dir is None:
                raise Failure("resources.settings.config.coco_dir: not set; the coco_zero_shot asset needs a COCO "
                              "2017 folder (annotations/instances_<split>2017.json, <split>2017/*.jpg)")
            checkpoints = {v: r.path(g.paths[f"m2m_{v}_checkpoint"]) / "final" for v in VARIANTS}
            for v, ckpt in checkpoints.items():
                if not (ckpt / "model.safetensors").exists():
                    raise FileNotFoundError(f"no checkpoint at {ckpt}; materialize m2m_{v}_checkpoint first")
            spec = CocoZeroShotSpec.from_eval(dataclasses.replace(r.eval, precision=compute.dtype), config.seed)
            sets = load_coco_sets(r.coco_dir, r.coco_split, spec.sets)  # one draw: both variants see the same sets
            device = compute.resolved_device()
            scorer = None
            if r.clip_model is not None:
                from m2m_pipeline.evaluation.clip_score import ClipScorer

                scorer = ClipScorer(r.clip_model, r.clip_pretrained, device=device)
            else:
                context.log.warning("settings.clip_model is not set: the MSCOCO grids without CLIP consistency")
            res = {v: continue_coco(ckpt, sets, out / f"m2m_{v}", scorer, spec, dino=r.mis.dino_path, device=device)
                   for v, ckpt in checkpoints.items()}
            for v, one in res.items():
                clip = one["clip_image_image"]
                if clip is not None:
                    for n, value in enumerate(clip["by_position"], start=1):
                        step.run.log_metrics({f"coco/{v}/clip_image_image": value}, step=n)
                    step.run.log_metrics({f"coco/{v}/{k}": clip[k] for k in ("mean", "real_vs_real", "other_category")
                                          if clip[k] is not None})
                for path in {*one["files"].values(), one["report_path"]}:
                    step.run.log_artifact(path)
        return MaterializeResult(metadata={
            "sets": len(sets.sets), "categories": MetadataValue.json(sorted({s.category for s in sets.sets})),
            "skipped_categories": MetadataValue.json(sets.skipped), "coco_split": r.coco_split,
            "annotations_sha256": sets.index.sha256,
            "consistency": MetadataValue.md("\n".join(one["table"] for one in res.values())),
            **{f"fig{COCO_FIGURES[v]}_m2m_{v}": image_markdown(
                one["files"]["preview"], f"M2M-{v}: MSCOCO real | generated (Fig. {COCO_FIGURES[v]})")
               for v, one in res.items()},
            **{f"m2m_{v}_clip_mean": round(one["clip_image_image"]["mean"], 3) for v, one in res.items()
               if one["clip_image_image"] is not None},
            **step.metadata([out])})

    return coco_zero_shot


# ====================================================================== the autoencoder of a CPU profile
def autoencoder_assets(g: ProfileGraph) -> list[Any]:
    """`<profile>/autoencoder` (trained on the shapes world; SD's VAE at paper scale) and its blocking check
    that the attribute oracle still reads every attribute from its reconstructions."""
    @asset(key=g.key("autoencoder"), group_name="features", kinds={"pytorch"}, op_tags=g.gpu_tags,
           description="The CPU profiles' AutoencoderKL (E / D of Sec. 3, in the role of SD-2.1's VAE): trained on "
                       "freshly rendered shapes-world images, saved as a Stable-Diffusion-style folder (vae/) and "
                       "loaded by the paper path's VaeAutoencoder.from_pretrained.")
    def autoencoder(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                    mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.autoencoder import GRID_NAME, AutoencoderConfig, train_autoencoder

        config = lambda r: AutoencoderConfig.preset(g.profile.autoencoder_preset, image_size=r.mis.resolution)  # noqa: E731
        with tracked_step(g.profile, context, settings, mlflow, dvc, "autoencoder", lambda r: config(r).to_dict()
                          ) as step, compute.threads(compute.autoencoder_threads):
            out = step.r.path(g.paths["autoencoder"])
            report = train_autoencoder(config(step.r), out, progress=False,
                                       on_metrics=step.run.metrics_logger("autoencoder"))
            summary = {k: report[k] for k in ("heldout_psnr_db", "heldout_mse", "train_seconds", "steps",
                                              "scaling_factor", "parameters")}
            step.run.log_metrics({f"autoencoder/{k}": v for k, v in summary.items()})
            step.run.log_artifact(out / GRID_NAME)
        return MaterializeResult(metadata={
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()},
            "latent_shape": str(tuple(report["latent_shape"])), "downsample": report["downsample"],
            "cut_short_by_max_seconds": report["cut_short_by_max_seconds"],
            "reconstructions": image_markdown(out / GRID_NAME, "held-out images | reconstructions"),
            **step.metadata([out])})

    @asset_check(asset=g.key("autoencoder"), name="reconstructions_keep_attributes", blocking=True,
                 additional_deps=[g.key("attribute_oracle")],
                 description="The attribute oracle reads every attribute from the autoencoder's reconstructions of "
                             "held-out images (>= 99% per attribute on the demo profile): the autoencoder must not "
                             "destroy what is judged.")
    def reconstructions_keep_attributes(context: AssetCheckExecutionContext, settings: M2MSettings,
                                        compute: ComputeResource, mlflow: MLflowResource) -> AssetCheckResult:
        from m2m_pipeline.autoencoder import oracle_reconstruction_accuracy
        from m2m_pipeline.evaluation.oracle import AttributeOracle

        r = settings.resolve(g.profile)
        oracle = AttributeOracle.load(r.path(g.paths["attribute_oracle"]))
        res = oracle_reconstruction_accuracy(r.path(g.paths["autoencoder"]), oracle)
        bar = r.eval.autoencoder_min_accuracy
        worst = min(res["reconstruction"].values())
        # An asset check's context carries the run through its op context; the nested run is named after the check.
        with mlflow.asset_run(context.op_execution_context, g.name, {"images": res["images"], "bar": bar},
                              extra_tags={"dagster.asset_key": f"{g.name}/autoencoder:reconstructions_keep_attributes"}
                              ) as run:
            run.log_metrics({f"autoencoder/oracle_reconstruction_{k}": v for k, v in res["reconstruction"].items()})
            run.log_metrics({f"autoencoder/oracle_original_{k}": v for k, v in res["original"].items()})
        return AssetCheckResult(
            passed=bar is None or worst >= bar, severity=AssetCheckSeverity.ERROR,
            metadata={"bar": bar if bar is not None else "none (reported only)", "worst": round(worst, 4),
                      "images": res["images"], "psnr_db": round(res["psnr_db"], 2),
                      **{f"reconstruction_{k}": round(v, 4) for k, v in res["reconstruction"].items()},
                      **{f"original_{k}": round(v, 4) for k, v in res["original"].items()}})

    return [autoencoder, reconstructions_keep_attributes]


# ====================================================================== the base model of a CPU profile
def base_model_asset(g: ProfileGraph) -> Any:
    """`<profile>/base_model`: the text-to-image model both M2M variants start from (SD-2.1-base's role)."""
    @asset(key=g.key("base_model"), group_name="training", deps=[g.key("autoencoder"), g.key("attribute_oracle")],
           kinds={"pytorch"}, op_tags=g.gpu_tags,
           description="The CPU profiles' text-to-image latent diffusion model (SD-2.1-base's role, Sec. 6.1): the M2M "
                       "preset's U-Net with text cross-attention, trained on captioned shapes-world images in the "
                       "autoencoder's latent space; a Stable Diffusion pipeline folder. Both M2M variants start "
                       "from its weights (all but the Image-Set Attention). Metadata: the oracle's reading of its "
                       "samples of held-out captions.")
    def base_model(context: AssetExecutionContext, settings: M2MSettings, compute: ComputeResource,
                   mlflow: MLflowResource, dvc: DVCResource) -> MaterializeResult:
        from m2m_pipeline.base_model import GRID_NAME, BaseModelConfig, train_base_model
        from m2m_pipeline.evaluation.oracle import AttributeOracle

        config = BaseModelConfig.preset(g.profile.base_model_preset)
        with tracked_step(g.profile, context, settings, mlflow, dvc, "base_model", lambda r: config.to_dict()
                          ) as step, compute.threads(compute.autoencoder_threads):
            r, out = step.r, step.r.path(g.paths["base_model"])
            oracle = AttributeOracle.load(r.path(g.paths["attribute_oracle"]))
            report = train_base_model(config, r.path(g.paths["autoencoder"]), out, oracle=oracle, progress=False,
                                      on_metrics=step.run.metrics_logger("base_model"))
            accuracy = report.get("oracle_accuracy", {})
            summary = {"steps": report["steps"], "train_seconds": report["train_seconds"],
                       "parameters": report["parameters"], **{f"samples_{k}": v for k, v in accuracy.items()}}
            step.run.log_metrics({f"base_model/{k}": v for k, v in summary.items()})
            step.run.log_artifact(out / GRID_NAME)
        return MaterializeResult(metadata={
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()},
            "samples": image_markdown(out / GRID_NAME, "samples of held-out captions"), **step.metadata([out])})

    return base_model


# ====================================================================== helpers
def check_result(name: str, asset_key: AssetKey, result: Any) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=name, asset_key=asset_key, passed=bool(result.passed), severity=AssetCheckSeverity.ERROR,
        metadata={"target": result.target, "errors": MetadataValue.json(result.errors[:20]),
                  **{k: v for k, v in result.details.items() if isinstance(v, (int, float, str))}})


def merged_check(name: str, asset_key: AssetKey, results: list[Any]) -> AssetCheckResult:
    errors = [e for res in results for e in res.errors][:20]
    passed = bool(results) and all(res.passed for res in results)
    if not results:
        errors = ["no shards were produced for these partitions"]
    return AssetCheckResult(
        check_name=name, asset_key=asset_key, passed=passed, severity=AssetCheckSeverity.ERROR,
        metadata={"shards_checked": len(results), "failed": sum(not res.passed for res in results),
                  "errors": MetadataValue.json(errors),
                  "samples": sum(int(res.details.get("samples", 0)) for res in results)})


def _mis_preview(shards: list[Path], r: Resolved, root: Path, sets: int = 4, images: int = 8) -> Path | None:
    """A PNG of the first images of the first sets (one row per set), written beside the state folder."""
    import numpy as np
    from PIL import Image

    from m2m_pipeline.data import decode_mis_sample, read_samples

    rows = []
    for raw in read_samples([shards[0]]):
        sample = decode_mis_sample(raw)
        rows.append(np.concatenate(list(sample.images[:images]), axis=1))
        if len(rows) == sets:
            break
    if not rows:
        return None
    scale = max(1, 64 // rows[0].shape[0])
    image = Image.fromarray(np.concatenate(rows, axis=0))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = r.root / ".state" / "previews" / r.profile.name / f"{shards[0].stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


