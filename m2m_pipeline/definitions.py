"""Dagster code location: `dagster dev -m m2m_pipeline.definitions` (or workspace.yaml), and
`dagster job execute -m m2m_pipeline.definitions -j m2m_demo_job -c m2m_pipeline/configs/demo.yaml`.

One asset graph per run profile (keys `smoke/...`, `demo/...`, `paper/...`), each with its own static
shard partitions; resources default to their local forms (state under `.state/`).
"""

from __future__ import annotations

from dagster import Definitions, multiprocess_executor

from m2m_pipeline.orchestration.assets import build_profile_assets
from m2m_pipeline.orchestration.finetune_assets import (
    build_finetune_assets,
    finetune_jobs,
)
from m2m_pipeline.orchestration.jobs import profile_jobs
from m2m_pipeline.orchestration.profiles import PROFILES
from m2m_pipeline.orchestration.resources import (
    ComputeResource,
    DVCResource,
    M2MSettings,
    MLflowResource,
)


def local_resources() -> dict[str, object]:
    return {"settings": M2MSettings(), "compute": ComputeResource(), "mlflow": MLflowResource(),
            "dvc": DVCResource()}


defs = Definitions(
    assets=[a for profile in PROFILES.values() for a in build_profile_assets(profile) + build_finetune_assets(profile)],
    jobs=[j for profile in PROFILES.values() for j in profile_jobs(profile) + finetune_jobs(profile)],
    resources=local_resources(),
    executor=multiprocess_executor,  # also for `dagster asset materialize` (dvc.yaml commands)
)
