"""MLflow runs for the task CLI, in the same local store as the Dagster MLflow resource
(`.state/mlflow/mlflow.db`, artifacts under `.state/mlflow/artifacts`) unless MLFLOW_TRACKING_URI names
another. No dagster import: the CLI is library-side."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


class TaskRun:
    """One MLflow run: params, step-wise metrics, artifacts; FINISHED or FAILED when the `with` block ends."""

    def __init__(self, run_name: str, experiment: str = "m2m-tasks", tracking_uri: str | None = None,
                 tags: dict[str, str] | None = None, root: str | os.PathLike = "."):
        from mlflow.tracking import MlflowClient

        state = Path(root).resolve() / ".state" / "mlflow"
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # as every MLflow client does
        if tracking_uri is None:
            state.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{state / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        exp = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(state / "artifacts").as_uri() if tracking_uri.startswith("sqlite") else None)
        self.run_id = self.client.create_run(exp, run_name=run_name, tags=tags or {}).info.run_id
        self.tracking_uri = tracking_uri

    def __enter__(self) -> TaskRun:  # noqa: PYI034 - not subclassed
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if kind else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), timestamp=ts, step=step)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path))


def flatten(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    """Nested config dict -> {"prefix.a.b": value} for log_params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flatten(name, value) if isinstance(value, dict) else {name: value})
    return out
