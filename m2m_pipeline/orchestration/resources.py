"""Dagster resources: run settings, compute, MLflow tracking and DVC versioning.

Each has a local form (the defaults: files under the repo's `.state/`) and a production form chosen by
config (`mode: production`: a tracking server, a shared DVC remote, GPUs). Assets reach the library only
through these; nothing in the PyTorch library imports dagster.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from dagster import ConfigurableResource, Failure, InitResourceContext
from filelock import FileLock
from pydantic import PrivateAttr, model_validator

from m2m_pipeline.data.config import MIS_PRESETS, MISConfig, get_preset
from m2m_pipeline.evaluation.report import EVAL_PRESETS, EvalSpec
from m2m_pipeline.orchestration.profiles import RunProfile, caption_files
from m2m_pipeline.tracking import MlflowRun, NullRun


def repo_root(repo_dir: str = "") -> Path:
    """The project root: `repo_dir` when given, else M2M_REPO_DIR, else the working directory."""
    return Path(repo_dir or os.environ.get("M2M_REPO_DIR", "") or os.getcwd()).resolve()


def state_dir(root: Path) -> Path:
    return root / ".state"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ====================================================================== settings
@dataclass(frozen=True)
class Resolved:
    """Everything one profile's assets need, after the run config's overrides were applied and checked."""

    profile: RunProfile
    root: Path
    mis: MISConfig
    net_preset: str
    train_preset: str
    train_overrides: dict[str, Any]
    eval: EvalSpec
    caption_source: str
    init_from: Path | None = None  # the SD-style folder both M2M variants start from (Sec. 6.1); None: random
    from_scratch: bool = False     # random initial weights asked for (settings.train_from_scratch)
    # The paper's scorers (EvalSpec.scorers "paper"), absolute paths; None for the shapes-world profiles.
    inception_weights: Path | None = None   # clean-fid's inception-2015-12-05.pt
    clip_model: str | None = None           # open_clip model name, or local-dir:/abs/path
    clip_pretrained: Path | None = None     # local open_clip checkpoint file (None with local-dir:)
    coco_dir: Path | None = None   # a COCO 2017 folder (settings.coco_dir), its instances file checked
    coco_split: str = "val"        # which split's instances the COCO zero-shot study reads
    # The real task folders a "folder" profile fine-tunes on ({"objaverse_dir": ..., "vgsi_dir": ...}, checked;
    # orchestration/finetune_assets.py TASK_DATA); empty for the stand-in profiles.
    task_dirs: dict[str, Path] = field(default_factory=dict)

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    @property
    def assets_dir(self) -> Path:
        return self.root / self.profile.assets_dir

    @property
    def models_dir(self) -> Path:
        return self.root / self.profile.models_dir


class M2MSettings(ConfigurableResource):
    """Run settings (resource key `settings`): which profile the config is written for, and overrides.

    Every override is checked before an asset starts; errors name the config field.
    """

    profile: str = ""                          # profile this config is for ("" = whichever job runs)
    repo_dir: str = ""                         # project root ("" = M2M_REPO_DIR or the working directory)
    mis_preset: str | None = None           # MIS_PRESETS key (must keep the profile's shard partitions)
    net_preset: str | None = None           # M2MConfig preset of both models
    train_preset: str | None = None         # TrainConfig preset
    caption_source: str | None = None       # "shapes" or a CC12M TSV glob
    sd_model_path: str | None = None        # local Stable Diffusion 2.1-base folder (MIS generator + VAE)
    dino_path: str | None = None            # local DINOv2 folder (dinov2-giant for the paper)
    eval_preset: str | None = None          # EVAL_PRESETS key replacing the profile's EvalSpec (before `eval` below)
    # Field overrides of the library's own config classes, checked against their fields (an unknown key is
    # refused naming the class's fields) and validated by the class itself when resolved; nothing is
    # re-declared here. E.g. `mis: {seed: 7}`, `train: {steps: 30, lr: 1e-4}`, `eval: {context_policy: window-4}`.
    mis: dict[str, Any] = {}                # MISConfig fields (seed, num_inference_steps, images_per_set, ...)
    train: dict[str, Any] = {}              # TrainConfig fields (steps, batch_size, global_batch_size, lr, max_seconds, ...)
    eval: dict[str, Any] = {}               # EvalSpec fields (num_sets, generated_images, steps, context_policy, ...)
    # Train M2M from random weights instead of the profile's SD-style folder (the paper: sd_model_path, Sec. 6.1;
    # the CPU profiles: their base_model asset). Warns; an SD-2.1-base-sized U-Net never does it silently.
    train_from_scratch: bool = False
    # MSCOCO 2017 (annotations/instances_<split>2017.json + <split>2017/*.jpg), relative to repo_dir: the real
    # images of the coco_zero_shot asset (Sec. 8.3, Figs. 16-17; m2m_pipeline/data/coco.py).
    coco_dir: str | None = None
    coco_split: str = "val"
    # The paper's scorers (profiles whose EvalSpec.scorers is "paper"; docs/evaluation.md), relative to repo_dir:
    # clean-fid's Inception torchscript file, an open_clip model name (or local-dir:PATH) and its weights file.
    inception_weights: str | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    # The paper profile's task data (Sec. 7.1.2), relative to repo_dir: Objaverse renders in Zero-1-to-3's layout
    # and VGSI (index.json or folders); docs/tasks.md. Checked when the config resolves, before any step runs.
    objaverse_dir: str | None = None
    vgsi_dir: str | None = None

    @model_validator(mode="after")
    def _check_fields(self) -> M2MSettings:
        from m2m_pipeline.orchestration.profiles import PROFILES

        if self.profile and self.profile not in PROFILES:
            raise ValueError(f"resources.settings.config.profile: unknown profile {self.profile!r}; "
                             f"choose one of {sorted(PROFILES)}")
        if self.mis_preset is not None and self.mis_preset not in MIS_PRESETS:
            raise ValueError(f"resources.settings.config.mis_preset: unknown MIS preset {self.mis_preset!r}; "
                             f"choose one of {sorted(MIS_PRESETS)}")
        from m2m_pipeline.network.config import PRESETS as NET_PRESETS
        from m2m_pipeline.training import TRAIN_PRESETS, TrainConfig

        for name, known in (("net_preset", NET_PRESETS), ("train_preset", TRAIN_PRESETS)):
            value = getattr(self, name)
            if value is not None and value not in known:
                raise ValueError(f"resources.settings.config.{name}: unknown preset {value!r}; "
                                 f"choose one of {sorted(known)}")
        for name, cls in (("mis", MISConfig), ("train", TrainConfig), ("eval", EvalSpec)):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(getattr(self, name)) - fields)
            if unknown:
                raise ValueError(f"resources.settings.config.{name}.{unknown[0]}: not a {cls.__name__} field; "
                                 f"choose from {sorted(fields)}")
        if "name" in self.mis:
            raise ValueError("resources.settings.config.mis.name: choose the MIS preset with mis_preset")
        from m2m_pipeline.data.coco import COCO_SPLITS

        if self.coco_split not in COCO_SPLITS:
            raise ValueError(f"resources.settings.config.coco_split: {self.coco_split!r} is not one of {list(COCO_SPLITS)}")
        if self.eval_preset is not None and self.eval_preset not in EVAL_PRESETS:
            raise ValueError(f"resources.settings.config.eval_preset: unknown preset {self.eval_preset!r}; "
                             f"choose one of {sorted(EVAL_PRESETS)}")
        return self

    def resolve(self, profile: RunProfile) -> Resolved:
        """Apply the overrides to `profile`; raise a Failure naming the field when something is wrong."""
        field = "resources.settings.config"
        if self.profile and self.profile != profile.name:
            raise Failure(f"{field}.profile is {self.profile!r} but these assets belong to profile "
                          f"{profile.name!r}: use m2m_pipeline/configs/{profile.name}.yaml")
        root = repo_root(self.repo_dir)
        if not root.is_dir():
            raise Failure(f"{field}.repo_dir: {root} is not a directory")
        mis_overrides = {**profile.mis_overrides, **self.mis}
        if self.sd_model_path is not None:
            mis_overrides["model_path"] = self.sd_model_path
        if self.dino_path is not None:
            mis_overrides["dino_path"] = self.dino_path
        if profile.autoencoder_preset is not None:  # trained by the profile's autoencoder asset
            mis_overrides["autoencoder_path"] = str(root / profile.autoencoder_dir)
        try:
            base = get_preset(self.mis_preset or profile.mis_preset).replace(**mis_overrides)
        except (ValueError, TypeError) as exn:
            raise Failure(f"{field}.mis: {exn}") from exn
        for key in ("model_path", "dino_path", "autoencoder_path"):  # relative to repo_dir, not to the cwd
            value = getattr(base, key)
            if value is not None and not Path(value).is_absolute():
                mis_overrides[key] = str(root / value)
        changed = profile.replace(mis_preset=self.mis_preset or profile.mis_preset, mis_overrides=mis_overrides)
        try:
            mis = changed.mis_config
        except (ValueError, TypeError) as exn:
            raise Failure(f"{field}.mis: {exn}") from exn
        if profile.shard_groups is None and changed.num_partitions != profile.num_partitions:
            raise Failure(f"{field}.mis_preset: {mis.name!r} gives {changed.num_partitions} MIS shard partitions, "
                          f"profile {profile.name!r} has {profile.num_partitions}; partitions are fixed by the "
                          f"profile (m2m_pipeline/orchestration/profiles.py)")
        # weights and data paths must exist before anything runs
        if mis.generator == "stable-diffusion" or (mis.autoencoder == "vae" and profile.autoencoder_preset is None):
            which = "sd_model_path"
            if not mis.model_path or not Path(mis.model_path).is_dir():
                raise Failure(f"{field}.{which}: Stable Diffusion weights not found at "
                              f"{mis.model_path or root} (the {profile.name!r} profile needs them)")
        if mis.dino_path is not None and not Path(mis.dino_path).is_dir():
            raise Failure(f"{field}.dino_path: DINOv2 weights not found at {mis.dino_path}")
        coco_dir = None
        if self.coco_dir is not None:
            from m2m_pipeline.data.coco import annotation_path

            coco_dir = root / self.coco_dir
            if not annotation_path(coco_dir, self.coco_split).is_file():
                raise Failure(f"{field}.coco_dir: no COCO annotations at {annotation_path(coco_dir, self.coco_split)}")
        source = self.caption_source or profile.caption_source
        if source != "shapes" and not caption_files(str(root / source)):
            raise Failure(f"{field}.caption_source: no caption TSV matches {root / source}")
        from m2m_pipeline.orchestration.finetune_assets import task_data_dirs

        task_dirs = task_data_dirs(profile, {"objaverse_dir": self.objaverse_dir, "vgsi_dir": self.vgsi_dir}, root)
        from m2m_pipeline.training import TrainConfig

        train_overrides = {**profile.train_overrides, **self.train}
        train_preset = self.train_preset or profile.train_preset
        base_eval = profile.eval if self.eval_preset is None else EVAL_PRESETS[self.eval_preset]
        try:
            TrainConfig.preset(train_preset, **train_overrides)  # the class checks its values; fail before any step
        except (ValueError, TypeError) as exn:
            raise Failure(f"{field}.train: {exn}") from exn
        try:
            ev = dataclasses.replace(base_eval, **self.eval)
        except (ValueError, TypeError) as exn:
            raise Failure(f"{field}.eval: {exn}") from exn
        if ev.scorers != profile.eval.scorers:  # the oracle and learnability assets exist for one kind only
            raise Failure(f"{field}.eval.scorers: {ev.scorers!r}, but profile {profile.name!r} evaluates with "
                          f"{profile.eval.scorers!r} (it shapes the asset graph: orchestration/profiles.py)")
        scorers = self._paper_scorers(root, profile) if ev.scorers == "paper" else {}
        return Resolved(profile=profile, root=root, mis=mis, net_preset=self.net_preset or profile.net_preset,
                        train_preset=train_preset, train_overrides=train_overrides,
                        eval=ev, caption_source=source, from_scratch=self.train_from_scratch,
                        coco_dir=coco_dir, coco_split=self.coco_split, task_dirs=task_dirs,
                        init_from=None if self.train_from_scratch else initial_weights(profile, mis, root),
                        **scorers)

    def _paper_scorers(self, root: Path, profile: RunProfile) -> dict[str, Any]:
        """The paper's scorers' local files, absolute, each checked before any step runs (one-line Failures)."""
        from m2m_pipeline.evaluation.fid import INCEPTION_FILE

        field = "resources.settings.config"
        need = f"the {profile.name!r} profile's evaluation (EvalSpec.scorers 'paper') needs it"
        absolute = lambda value: Path(value) if Path(value).is_absolute() else root / value
        if not self.inception_weights:
            raise Failure(f"{field}.inception_weights: not set; {need} (clean-fid's {INCEPTION_FILE})")
        inception = absolute(self.inception_weights)
        if not inception.is_file() or inception.name != INCEPTION_FILE:
            raise Failure(f"{field}.inception_weights: no file {INCEPTION_FILE} at {inception}; {need}")
        if not self.clip_model:
            raise Failure(f"{field}.clip_model: not set; {need} (an open_clip model name, or local-dir:PATH)")
        if self.clip_model.startswith("local-dir:"):
            folder = absolute(self.clip_model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise Failure(f"{field}.clip_model: no open_clip_config.json in {folder}; {need}")
            return {"inception_weights": inception, "clip_model": f"local-dir:{folder}", "clip_pretrained": None}
        if not self.clip_pretrained:
            raise Failure(f"{field}.clip_pretrained: not set; {need} (a local weights file for {self.clip_model!r})")
        weights = absolute(self.clip_pretrained)
        if not weights.is_file():
            raise Failure(f"{field}.clip_pretrained: CLIP weights not found at {weights}; {need}")
        return {"inception_weights": inception, "clip_model": self.clip_model, "clip_pretrained": weights}


def initial_weights(profile: RunProfile, mis: MISConfig, root: Path) -> Path | None:
    """The SD-style folder a profile's M2M models start from (Sec. 6.1): the profile's own base model (CPU
    profiles), else the Stable Diffusion folder that renders its MIS (the paper: SD-2.1-base), else None."""
    if profile.base_model_preset is not None:
        return root / profile.base_model_dir
    if mis.generator == "stable-diffusion" and mis.model_path:
        return root / mis.model_path
    return None


# ====================================================================== compute
class ComputeResource(ConfigurableResource):
    """Where tensors live: device, dtype, data-loader workers, and how training is launched."""

    device: str = "auto"                                     # auto (cuda if present), cpu, cuda, cuda:N
    # MIS generation, training and sampling precision (m2m_pipeline/precision.py, docs/training.md "Precision"):
    # auto: each stage's own default (fp16 SD, bf16 autocast training on CUDA; fp32 on CPU); float16 not on CPU
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    workers: int = 0                                         # data-loader worker processes
    torch_threads: int = 0                                   # intra-op CPU threads (0: torch's default)
    # The autoencoder's training may use more: it runs before the two side-by-side trainings and overlaps
    # only the short single-threaded oracle / MIS steps (0: torch_threads)
    autoencoder_threads: int = 0
    launcher: Literal["inprocess", "subprocess", "accelerate"] = "inprocess"  # training: in this process, or
    # through Dagster Pipes in a child `python -m` / `accelerate launch` (multi-GPU) process
    num_processes: int = 1                                   # accelerate launch --num_processes (GPUs per step)

    @model_validator(mode="after")
    def _check_fields(self) -> ComputeResource:
        if self.workers < 0 or self.torch_threads < 0 or self.autoencoder_threads < 0:
            raise ValueError("resources.compute.config.workers, torch_threads and autoencoder_threads must be >= 0")
        if self.num_processes < 1:
            raise ValueError(f"resources.compute.config.num_processes must be >= 1, got {self.num_processes}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"resources.compute.config.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.device == "cpu":
            from m2m_pipeline.precision import check_supported

            check_supported("cpu", self.dtype, "resources.compute.config.dtype")
        return self

    _threads_before: int = PrivateAttr(default=0)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.torch_threads:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.torch_threads)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # In-process execution (tests, `materialize`) must not leave the caller's thread count changed.
        if self._threads_before:
            import torch

            torch.set_num_threads(self._threads_before)

    @contextmanager
    def threads(self, count: int) -> Iterator[None]:
        """torch intra-op threads = `count` inside the block (0: unchanged), restored after it."""
        import torch

        before = torch.get_num_threads()
        if count:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


# ====================================================================== MLflow
class MLflowResource(ConfigurableResource):
    """One parent MLflow run per Dagster run, a nested run per asset (resource key `mlflow`).

    local: a SQLite store and artifact folder under `.state/mlflow` (MLflow 3 refuses a bare ./mlruns);
    production: `tracking_uri` names a tracking server (http[s]://), artifacts go where it says.
    """

    mode: Literal["local", "production", "off"] = "local"
    tracking_uri: str = ""          # "" (local): sqlite:///<repo>/.state/mlflow/mlflow.db
    artifact_root: str = ""         # "" (local): <repo>/.state/mlflow/artifacts
    experiment: str = "m2m"
    ui_url: str = "http://127.0.0.1:5000"   # links in the Dagster UI point here
    repo_dir: str = ""

    @model_validator(mode="after")
    def _check_fields(self) -> MLflowResource:
        if self.mode == "production" and not self.tracking_uri.startswith(("http://", "https://", "databricks")):
            raise ValueError("resources.mlflow.config.tracking_uri: production mode needs a tracking server "
                             f"(http[s]://...), got {self.tracking_uri!r}")
        if not self.experiment:
            raise ValueError("resources.mlflow.config.experiment must not be empty")
        return self

    # -------------------------------------------------------------- stores
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        db = state_dir(repo_root(self.repo_dir)) / "mlflow" / "mlflow.db"
        return f"sqlite:///{db}"

    def _lock(self) -> FileLock | Any:
        if self.mode != "local":
            return _nolock()
        path = state_dir(repo_root(self.repo_dir)) / "locks" / "mlflow.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path, timeout=600)

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        uri = self.resolved_tracking_uri()
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with self._lock():  # the first client migrates the SQLite schema; two at once would collide
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        return client

    def experiment_id(self, client: Any) -> str:
        with self._lock():
            exp = client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return exp.experiment_id
            root = self.artifact_root or (state_dir(repo_root(self.repo_dir)) / "mlflow" / "artifacts").as_uri()
            return client.create_experiment(self.experiment, artifact_location=root if self.mode == "local" or
                                            self.artifact_root else None)

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def parent_run(self, client: Any, experiment_id: str, dagster_run_id: str, tags: dict[str, str]) -> str:
        """The Dagster run's MLflow run, created by whichever step asks first (under a lock locally)."""
        query = f"tags.`dagster.run_id` = '{dagster_run_id}' and tags.`m2m.parent` = 'true'"
        with self._lock():
            found = client.search_runs([experiment_id], filter_string=query, max_results=10,
                                       order_by=["attributes.start_time ASC"])
            if found:
                return found[0].info.run_id
            run = client.create_run(experiment_id, run_name=tags.get("dagster.job", "dagster") +
                                    f" {dagster_run_id[:8]}", tags={**tags, "m2m.parent": "true"})
            return run.info.run_id

    @contextmanager
    def asset_run(self, context: Any, profile: str, params: dict[str, Any] | None = None,
                  extra_tags: dict[str, str] | None = None) -> Iterator[MlflowRun]:
        """A nested run for the asset `context` materializes; FINISHED on success, FAILED on error."""
        if self.mode == "off":
            yield NullRun()
            return
        client = self.client()
        exp = self.experiment_id(client)
        root = repo_root(self.repo_dir)
        commit = git_commit(root)
        run_id = context.run_id
        job = getattr(context, "job_name", None) or "materialize"
        base = {"dagster.run_id": run_id, "dagster.job": job, "m2m.profile": profile,
                "mlflow.source.git.commit": commit, "git.commit": commit}
        parent = self.parent_run(client, exp, run_id, base)
        keys = sorted(context.selected_asset_keys) if hasattr(context, "selected_asset_keys") else []
        asset_key = (extra_tags or {}).get("dagster.asset_key") or ",".join(k.to_user_string() for k in keys)
        partition = _partition_label(context)
        tags = {**base, "mlflow.parentRunId": parent, "dagster.asset_key": asset_key,
                "dagster.partition_key": partition, **(extra_tags or {})}
        run = client.create_run(exp, run_name=asset_key + (f"[{partition}]" if partition else ""), tags=tags)
        tracked = MlflowRun(client, run.info.run_id, self.run_url(exp, run.info.run_id))
        if params:
            tracked.log_params(params)
        try:
            yield tracked
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")


def _partition_label(context: Any) -> str:
    try:
        if context.assets_def.partitions_def is None:
            return ""
        if not context.has_partition_key_range and not context.has_partition_key:
            return ""
        keys = context.partition_keys
    except Exception:  # noqa: BLE001  (unpartitioned: the context has no partition to name)
        return ""
    return keys[0] if len(keys) == 1 else f"{keys[0]}...{keys[-1]}"


@contextmanager
def _nolock() -> Iterator[None]:
    yield


# ====================================================================== DVC
class DVCResource(ConfigurableResource):
    """Versions each data/model asset's outputs (resource key `dvc`): `dvc commit` of its dvc.yaml stage,
    then `dvc push` to the remote; hashes come back from dvc.lock for the materialization metadata.

    DVC holds a repo-wide lock, so every DVC call here runs under one file lock: concurrent steps
    (multiprocess executor, parallel partition runs) queue instead of failing on DVC's lock.
    local: the remote is a folder (`.state/dvc-remote`, remote `local` in .dvc/config);
    production: any remote configured in .dvc/config (s3://, gs://, ssh://) named by `remote`.
    M2M_DVC=off in the environment disables it (dvc.yaml commands set it: `dvc repro` holds DVC's lock).
    pointers: many executors at once, no shared lock (orchestration/dvc_pointers.py): each partition step pushes
    its files from a working copy of its own to `pointer_remote` and publishes `.dvc` pointers to
    `pointer_outbox`; the `dataset_version` step commits them to the git repository `pointer_repo`.
    """

    mode: Literal["local", "production", "pointers", "off"] = "local"
    repo_dir: str = ""
    remote: str = "local"
    push: bool = True
    lock_timeout_s: int = 1800
    pointer_remote: str = ""    # pointers: the shared DVC remote (folder or s3:// / gs:// / ssh:// URL)
    pointer_outbox: str = ""    # pointers: shared folder of published pointer sets
    pointer_scratch: str = ""   # pointers: local folder for the executors' own working copies
    pointer_repo: str = ""      # pointers: git URL of the pointer repository (its .dvc/config names the remote)

    @model_validator(mode="after")
    def _check_fields(self) -> DVCResource:
        if self.mode == "production" and self.remote == "local":
            raise ValueError("resources.dvc.config.remote: production mode needs a shared remote, not 'local'")
        if self.lock_timeout_s <= 0:
            raise ValueError("resources.dvc.config.lock_timeout_s must be positive")
        if self.mode == "pointers":
            for name in ("pointer_remote", "pointer_outbox", "pointer_scratch", "pointer_repo"):
                if not getattr(self, name):
                    raise ValueError(f"resources.dvc.config.{name}: required in pointers mode")
        return self

    def pointer_store(self):
        from m2m_pipeline.orchestration.dvc_pointers import PointerStore

        return PointerStore(self.pointer_remote, Path(self.pointer_outbox), Path(self.pointer_scratch))

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and os.environ.get("M2M_DVC", "").lower() not in ("off", "0", "false")

    def _root(self) -> Path:
        return repo_root(self.repo_dir)

    def lock(self) -> FileLock:
        path = state_dir(self._root()) / "locks" / "dvc.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path, timeout=self.lock_timeout_s)

    def _dvc(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "dvc", *args]
        out = subprocess.run(cmd, cwd=self._root(), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise Failure(f"`dvc {' '.join(args)}` failed in {self._root()} (exit {out.returncode}):\n"
                          f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return out.stdout

    def commit(self, stage: str) -> dict[str, Any]:
        """Record `stage`'s current outputs in dvc.lock and the cache, push them; return their hashes."""
        if not self.enabled:
            return {}
        with self.lock():
            self._dvc("commit", "--force", "--quiet", stage)
            if self.push:
                self._dvc("push", "--quiet", "-r", self.remote, stage)
            return self.stage_hashes(stage)

    def has_stage(self, stage: str) -> bool:
        """Whether dvc.yaml defines `stage` (`name@key` for foreach stages)."""
        path = self._root() / "dvc.yaml"
        if not path.exists():
            return False
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
        name, _, item = stage.partition("@")
        entry = stages.get(name)
        if entry is None:
            return False
        if not item:
            return "foreach" not in entry
        items = entry.get("foreach")
        return item in (items if isinstance(items, (list, dict)) else [])

    def stage_hashes(self, stage: str) -> dict[str, Any]:
        lock = self._root() / "dvc.lock"
        if not lock.exists():
            return {}
        data = yaml.safe_load(lock.read_text()) or {}
        entry = (data.get("stages") or {}).get(stage) or {}
        pick = lambda items: {i["path"]: i.get("md5") for i in items or []}
        return {"stage": stage, "outs": pick(entry.get("outs")), "deps": pick(entry.get("deps"))}


