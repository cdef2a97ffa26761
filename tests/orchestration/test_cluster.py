"""Issue 16: the cluster profile on real Celery workers and a real Redis broker (orchestration/cluster.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from m2m_pipeline.orchestration.celery_executor import _Liveness
from m2m_pipeline.orchestration.profiles import PROFILES


def test_cluster_profile_routes_gpu_steps_to_the_gpu_queue() -> None:
    from m2m_pipeline.definitions import defs

    job = defs.resolve_job_def("m2m_cluster_job")
    assert job.executor_def.name == "m2m_celery"
    assert PROFILES["cluster"].num_partitions == 4
    tags = {n.name: n.tags for n in job.graph.nodes}
    assert tags["cluster__mis_shards"]["dagster-celery/queue"] == "gpu"
    assert "dagster-celery/queue" not in tags["cluster__raw_captions"]  # the default queue
    policy = job.graph.node_named("cluster__mis_shards").definition.retry_policy
    assert policy.max_retries >= 1 and policy.backoff is not None


class _Control:
    def __init__(self, replies):
        self.replies = replies

    def ping(self, timeout):
        return self.replies.pop(0)


class _App:
    def __init__(self, replies):
        self.control = _Control(replies)


def test_liveness_declares_a_silent_worker_lost_only_while_others_answer(monkeypatch) -> None:
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr("m2m_pipeline.orchestration.celery_executor.time.monotonic", lambda: next(clock))
    both, b_only, nobody = [{"a@h": {}}, {"b@h": {}}], [{"b@h": {}}], []
    live = _Liveness(_App([both, nobody, nobody, b_only, b_only]), every=0, lost_after=8)
    assert live.lost({"a@h"}) == set()        # t=0: both answer
    assert live.lost({"a@h"}) == set()        # nobody answers (a broker restart): nobody is lost
    assert live.lost({"a@h"}) == set()
    assert live.lost({"a@h"}) == {"a@h"}      # b answers, a silent since t=0 (> 8 s)
    assert live.lost({"b@h"}) == set()


@pytest.mark.slow
def test_cluster_smoke_survives_a_killed_worker_and_a_broker_restart(tmp_path, monkeypatch) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs it (apt-get install redis-server)")
    from m2m_pipeline.orchestration import cluster

    home = tmp_path / "dagster_home"  # its own instance: the workers and the runs share it
    home.mkdir()
    shutil.copy(cluster.repo_root() / "m2m_pipeline/orchestration/dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    assert cluster.main(["--out", str(tmp_path / "cluster")]) == 0
    report = json.loads((tmp_path / "cluster" / "report.json").read_text())
    killed = report["killed"]["worker"]
    assert killed.startswith("gpu") and report["killed"]["partial_files"]
    assert report["retries"] and report["broker_restart"] and not report["differ"] and not report["leftovers"]
    assert all(any(s.startswith("mis_shards") for s in report["per_worker"][w]) for w in ("gpu-a", "gpu-b"))
    assert report["dvc_restored_equal"] and report["dvc_changed_by_v2"] > 0  # v1 restored on a fresh copy
    training = report["training"]  # accelerate --multi_gpu --num_processes 2 through Pipes on a gpu worker
    assert training["world_size"] == 2 and training["agree"] and training["streamed"]
