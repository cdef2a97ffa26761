"""Check a finished chain run end to end (CI: after `dagster job execute -j m2m_smoke_job ...`).

    python -m m2m_pipeline.orchestration.verify --profile smoke

Exits non-zero unless: the job's latest Dagster run (in $DAGSTER_HOME) succeeded with every asset of the
profile materialized and every check passed; MLflow holds its parent run with a nested run per asset and
the training loss curves of both variants; `dvc status` of the profile's stages is clean and the remote
holds their data.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
)

from m2m_pipeline.orchestration.assets import DVC_STAGE
from m2m_pipeline.orchestration.resources import MLflowResource, repo_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--experiment", default="m2m")
    args = parser.parse_args(argv)
    p, job = args.profile, f"m2m_{args.profile}_job"
    problems: list[str] = []

    instance = DagsterInstance.get()
    runs = instance.get_runs(filters=RunsFilter(job_name=job), limit=1)
    if not runs:
        print(f"no run of {job} in {instance.root_directory}")
        return 1
    run = runs[0]
    if run.status != DagsterRunStatus.SUCCESS:
        problems.append(f"Dagster run {run.run_id} of {job} is {run.status.value}")
    names = sorted(DVC_STAGE)
    materialized = set()
    for record in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records:
        materialized.add(record.event_log_entry.dagster_event.asset_key)
    missing = [n for n in names if AssetKey([p, n]) not in materialized]
    if missing:
        problems.append(f"not materialized in run {run.run_id}: {missing}")
    checks = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records
    failed = [r.event_log_entry.dagster_event.event_specific_data.check_name for r in checks
              if not r.event_log_entry.dagster_event.event_specific_data.passed]
    if failed or not checks:
        problems.append(f"asset checks failed: {failed}" if failed else "no asset check ran")

    mlflow = MLflowResource(experiment=args.experiment)
    client = mlflow.client()
    exp = client.get_experiment_by_name(args.experiment)
    mruns = client.search_runs([exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{run.run_id}'") \
        if exp else []
    parents = [r for r in mruns if r.data.tags.get("m2m.parent") == "true"]
    nested = {r.data.tags.get("dagster.asset_key") for r in mruns if r.data.tags.get("mlflow.parentRunId")}
    if len(parents) != 1:
        problems.append(f"MLflow: {len(parents)} parent runs for Dagster run {run.run_id}, expected 1")
    if len(nested) < len(set(DVC_STAGE.values())):
        problems.append(f"MLflow: nested runs only for {sorted(nested)}")
    for variant in ("self", "dino"):
        found = [r for r in mruns if r.data.tags.get("dagster.asset_key") == f"{p}/m2m_{variant}_checkpoint"]
        if not found or not client.get_metric_history(found[0].info.run_id, "train/loss"):
            problems.append(f"MLflow: no train/loss curve for M2M-{variant}")

    stages = sorted({f"{s}@{p}" for s in DVC_STAGE.values()})
    root = repo_root()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet", *stages], cwd=root,
                            capture_output=True, text=True, check=False)
    if status.returncode != 0:
        problems.append(f"dvc status not clean:\n{status.stdout}{status.stderr}")
    remote = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", *stages], cwd=root,
                            capture_output=True, text=True, check=False)
    if remote.returncode != 0 or "in sync" not in remote.stdout:
        problems.append(f"dvc remote not in sync:\n{remote.stdout}{remote.stderr}")

    if problems:
        print("\n".join(f"FAIL: {x}" for x in problems))
        return 1
    print(f"OK: run {run.run_id} of {job}: {len(materialized)} assets, {len(checks)} checks passed; "
          f"MLflow parent {parents[0].info.run_id} with {len(nested)} nested runs; DVC {len(stages)} stages clean "
          f"and pushed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
