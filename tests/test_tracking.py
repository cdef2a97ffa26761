"""The one MLflow wrapper (m2m_pipeline/tracking.py) of the CLI, the task CLI, the assets and the Pipes child."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from m2m_pipeline.tracking import MlflowRun, NullRun, flatten, local_tracking_uri


def test_a_run_logs_params_metrics_and_ends_finished(tmp_path):
    uri = local_tracking_uri(tmp_path)
    with MlflowRun.start("r1", experiment="m2m-test", tracking_uri=uri, tags={"m2m.task": "camera"},
                         root=tmp_path) as run:
        run.log_params({"lr": 1e-3})
        log = run.metrics_logger("train")
        log({"loss": 0.5}, 1)
        log({"loss": 0.25}, 2)
    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.params["lr"] == "0.001" and got.data.tags["m2m.task"] == "camera"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] == [(1, 0.5), (2, 0.25)]
    # another process attaches to the same run (the Pipes child) and its metrics land there
    MlflowRun.attach(uri, run.run_id).metrics_logger("train")({"loss": 0.1}, 3)
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 3


def test_a_failing_block_ends_the_run_failed(tmp_path):
    uri = local_tracking_uri(tmp_path)
    with pytest.raises(RuntimeError), MlflowRun.start("r2", tracking_uri=uri, root=tmp_path) as run:
        raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "FAILED"


def test_null_run_and_flatten():
    with NullRun() as run:
        run.log_params({"a": 1})
        run.metrics_logger("x")({"loss": 1.0}, 0)
    assert flatten("", {"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}
