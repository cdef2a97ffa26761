"""MLflow runs: one wrapper for every front-end — the Dagster assets' nested runs (orchestration.resources),
the Pipes training child, the `m2m` CLI and the task CLI. The library side: no dagster import.

The local store is the one the Dagster MLflow resource uses (`.state/mlflow/mlflow.db`, artifacts under
`.state/mlflow/artifacts`; MLflow 3 refuses a bare ./mlruns) unless a URI or MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def local_tracking_uri(root: str | os.PathLike = ".") -> str:
    """sqlite:///<root>/.state/mlflow/mlflow.db (its folder created)."""
    db = Path(root).resolve() / ".state" / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


class MlflowRun:
    """One MLflow run through MlflowClient (no global "active run", so several can be open in one process):
    params, step-wise metrics, artifacts, tags; as a context manager it ends FINISHED, or FAILED on error."""

    def __init__(self, client: Any, run_id: str, url: str = ""):
        self.client, self.run_id, self.url = client, run_id, url

    @classmethod
    def start(cls, run_name: str, *, experiment: str = "m2m", tracking_uri: str | None = None,
              tags: dict[str, str] | None = None, root: str | os.PathLike = ".") -> MlflowRun:
        """A new run in `experiment` (created with a local artifact folder when the store is local)."""
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(root)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        artifacts = (Path(root).resolve() / ".state" / "mlflow" / "artifacts").as_uri() \
            if uri.startswith("sqlite") else None
        exp = found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifacts)
        return cls(client, client.create_run(exp, run_name=run_name, tags=tags or {}).info.run_id)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> MlflowRun:
        """A run another process created (the Pipes child logs into its asset's run)."""
        from mlflow.tracking import MlflowClient

        return cls(MlflowClient(tracking_uri=tracking_uri), run_id)

    def __enter__(self) -> MlflowRun:  # noqa: PYI034 - subclasses return themselves too
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.end(failed=kind is not None)

    def end(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), timestamp=ts, step=step or 0)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def metrics_logger(self, prefix: str) -> Callable[[dict[str, float], int], None]:
        """An `on_metrics(metrics, step)` callback for train() / train_autoencoder() / finetune()."""
        return lambda metrics, step: self.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)


class NullRun(MlflowRun):
    """Tracking off: every call does nothing."""

    def __init__(self) -> None:
        super().__init__(None, "", "")

    def end(self, failed: bool = False) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...


def flatten(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    """Nested config dict -> {"prefix.a.b": value} for log_params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flatten(name, value) if isinstance(value, dict) else {name: value})
    return out
