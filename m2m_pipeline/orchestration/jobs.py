"""Jobs: the whole chain per profile and per-stage jobs, with their executors.

Local profiles run on the multiprocess executor (step concurrency and a GPU tag limit set in the run
config); the paper profile runs each step in its own Kubernetes pod (dagster-k8s `k8s_job_executor`,
`nvidia.com/gpu` limits from the GPU steps' `dagster-k8s/config` tags and `per_step_k8s_config`).
A chain job holds partitioned and unpartitioned assets, so it carries the partition-range tags of all its
profile's shard partitions: `dagster job execute -j m2m_demo_job -c ...` needs no --tags.
"""

from __future__ import annotations

from typing import Any

from dagster import (
    AssetSelection,
    ExecutorDefinition,
    define_asset_job,
    multiprocess_executor,
)

from m2m_pipeline.orchestration.profiles import RunProfile


def production_executor() -> ExecutorDefinition:
    """dagster-k8s' k8s_job_executor when installed (the paper profile), else the multiprocess one."""
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:  # pragma: no cover - dagster-k8s is in the orchestration extra
        return multiprocess_executor
    return k8s_job_executor


def profile_executor(profile: RunProfile) -> ExecutorDefinition:
    if profile.executor == "k8s":
        return production_executor()
    if profile.executor == "celery":
        from m2m_pipeline.orchestration.celery_executor import m2m_celery_executor

        return m2m_celery_executor
    return multiprocess_executor


def range_tags(profile: RunProfile) -> dict[str, str]:
    keys = profile.partition_keys
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}


def profile_jobs(profile: RunProfile) -> list[Any]:
    p = profile.name
    prefix = AssetSelection.key_prefixes([p])
    executor = profile_executor(profile)
    tags = {"m2m/profile": p}
    key = lambda *names: AssetSelection.assets(*[[p, n] for n in names])
    # Only the shapes world has the attribute oracle and the learnability verdict (RunProfile.shapes_world); the
    # paper profile trains neither an oracle nor an autoencoder (SD-2.1's VAE is loaded), so it has no autoencoder
    # job. A selection of an asset the profile lacks only fails when the UI resolves every job (ui_check found it).
    oracle = ["attribute_oracle"] if profile.shapes_world else []
    unpartitioned = oracle + (["autoencoder"] if profile.autoencoder_preset else [])
    return [
        define_asset_job(f"m2m_{p}_job", selection=prefix, executor_def=executor, tags={**tags, **range_tags(profile)},
                         description=f"The whole M2M chain on the {p} profile: captions -> MIS -> features -> "
                                     f"M2M-Self and M2M-DINO -> evaluation."),
        define_asset_job(f"m2m_{p}_captions_job", selection=key("raw_captions", "filtered_captions"),
                         executor_def=executor, tags=tags, description="Caption source and CLIP-length filter."),
        *([define_asset_job(f"m2m_{p}_autoencoder_job", selection=key(*unpartitioned), executor_def=executor,
                            tags=tags,
                            description="The attribute oracle and the autoencoder (with its reconstruction check): "
                                        "unpartitioned inputs every MIS partition's feature caches share.")]
          if unpartitioned else []),
        define_asset_job(f"m2m_{p}_mis_job", selection=key("mis_shards", "latent_cache", "dino_features"),
                         executor_def=executor, tags=tags,
                         description="Partitioned MIS generation and feature caches: one partition per run "
                                     "(--tags '{\"dagster/partition\": \"0\"}') or a range."),
        define_asset_job(f"m2m_{p}_training_job", selection=key("m2m_self_checkpoint", "m2m_dino_checkpoint"),
                         executor_def=executor, tags=tags, description="Train M2M-Self and M2M-DINO."),
        define_asset_job(f"m2m_{p}_evaluation_job",
                         selection=key(*oracle, "m2m_self_evaluation_report", "m2m_dino_evaluation_report",
                                       *(["learnability"] if profile.shapes_world else []), "sampling_benchmark"),
                         executor_def=executor, tags=tags,
                         description="Protocol metrics and studies per model (Table 1's scorers on the paper "
                                     "profile; the oracle and the learnability verdict in the shapes world) and "
                                     "the sampling benchmark (Fig. 9)."),
    ]
