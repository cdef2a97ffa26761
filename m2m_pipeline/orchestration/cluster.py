"""The scale-out path run for real on one machine (docs/orchestration.md, `make cluster-smoke`): a Redis broker on 127.0.0.1,
Celery workers on the queues `gpu` (two) and `default` (one), the cluster profile's MIS and feature partitions
fanned out over them by one Dagster run per partition, a worker SIGKILLed in the middle of a MIS shard, the
broker restarted while runs are between steps, and the shards compared with an uninterrupted single-process run.

    python -m m2m_pipeline.orchestration.cluster --out runs/cluster-smoke      # ~4 minutes on two cores

1. Inputs run: captions and the autoencoder (`m2m_cluster_job -o ...`), on the workers.
2. One run per MIS partition, all at once (the partition-range tags narrowed to [p, p]: what a multi-run
   backfill launches): `mis_shards` then `feature_caches` of partition p, each step on a `gpu` worker.
3. Faults: once a gpu worker that has finished a partition step writes a shard of a MIS partition (the temp
   file exists), its process group is SIGKILLed;
   the executor (orchestration/celery_executor.py) finds it lost and retries the step under the asset's
   RetryPolicy on the other gpu worker. When the first MIS step of any run succeeds, Redis is stopped and started again
   (append-only file on, so queued tasks survive).
4. Reference: the same partitions' MIS and feature shards written in one process (execute_in_process, the
   cluster run's own autoencoder), then every shard's SHA-256 compared, no temp file left, one file per shard.
5. DVC from many executors (orchestration/dvc_pointers.py): every partition step pushes its shards from a
   working copy of its own to a shared remote and publishes pointers; `dataset_version` commits them (v1).
   The partitions are then regenerated with another MIS seed (v2, committed too), and a fresh clone checked out
   at v1 + `dvc pull` must restore v1's files exactly (SHA-256).
6. Training through the same executor: `m2m_self_checkpoint` on a gpu worker, launched by Pipes with
   `accelerate launch --multi_gpu --num_processes 2` (gloo), its metrics streamed back as Pipes log lines; its
   loss curve must agree with one process at the same global batch (`training_stats.curves_agree`, the DDP
   test's judgement).

Prints partitions per worker, the kill, the retry and the hashes; exits non-zero unless all of it holds.
Each run starts from an empty work folder under --out (settings.repo_dir), so nothing is skipped as done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from m2m_pipeline.data.shards import shard_index
from m2m_pipeline.io import atomic_write_text, sha256_file
from m2m_pipeline.orchestration.profiles import PROFILES
from m2m_pipeline.orchestration.resources import repo_root

PROFILE = PROFILES["cluster"]
JOB = "m2m_cluster_job"
INPUT_OPS = ["cluster__raw_captions", "cluster__filtered_captions", "cluster__autoencoder"]
PARTITION_OPS = ["cluster__mis_shards", "cluster__feature_caches"]
TRAIN_OPS = ["cluster__m2m_self_checkpoint"]
VERSION_OPS = ["cluster__dataset_version"]
# Multi-process training through the executor: the step on a gpu worker launches `accelerate launch --multi_gpu
# --num_processes 2` (gloo on CPU) through Pipes; the same global batch in one process is the reference.
TRAIN_STEPS, TRAIN_WINDOW = 60, 15
TRAIN_SETTINGS = {"train": {"steps": TRAIN_STEPS, "batch_size": 2, "global_batch_size": 4, "checkpoint_every": 0},
                  "train_from_scratch": True}
TRAIN_COMPUTE = {"launcher": "accelerate", "num_processes": 2}
WORKERS = (("gpu-a", "gpu"), ("gpu-b", "gpu"), ("cpu", "default"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """redis-server on 127.0.0.1 with an append-only file, so a restart keeps the queued tasks."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, _free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("cluster: no redis-server on PATH (Debian: apt-get install redis-server)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=open(self.folder / "redis.log", "a"), stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"cluster: redis-server did not answer on port {self.port}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def executor_config(broker: Broker) -> dict[str, Any]:
    """The m2m_celery executor's config: the run config's `execution` block, and the workers' -y file."""
    from m2m_pipeline.orchestration.celery_executor import CELERY_SETTINGS

    return {"broker": f"{broker.url}/0", "backend": f"{broker.url}/1", "config_source": {
        **CELERY_SETTINGS, "task_default_queue": "default",
        # ride over a broker restart: publishing and result writes retry instead of failing the step
        "broker_transport_options": {"max_retries": 60, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "result_backend_always_retry": True, "result_backend_max_retries": 60}}


class Workers:
    def __init__(self, out: Path, config_yaml: Path, env: dict[str, str]):
        self.out, self.config_yaml, self.env = out, config_yaml, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, root: Path) -> None:
        exe = Path(sys.executable).with_name("dagster-celery")
        for name, queue in WORKERS:
            log = open(self.out / f"worker-{name}.log", "w")  # noqa: SIM115 - closed with the process
            # a session of its own: SIGKILL to its process group takes the worker and its pool child, as a host loss
            self.procs[name] = subprocess.Popen(
                [str(exe), "worker", "start", "-A", "dagster_celery.app", "-y", str(self.config_yaml), "-q", queue,
                 "-n", f"{name}@%h", "--", "--concurrency=1"],
                cwd=root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, app, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SystemExit(f"cluster: worker {dead[0]} exited; see {self.out}/worker-{dead[0]}.log")
            names = {h.split("@")[0] for reply in app.control.ping(timeout=1.0) for h in reply}
            if names >= {n for n, _ in WORKERS}:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"cluster: workers {sorted({n for n, _ in WORKERS} - names)} did not start; "
                                 f"see {self.out}/worker-*.log")
            time.sleep(1)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def launch(root: Path, env: dict[str, str], configs: list[Path], ops: list[str], tags: dict[str, str],
           log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe), "job", "execute", "-m", "m2m_pipeline.definitions", "-j", JOB, "-o", ",".join(ops),
           "--tags", json.dumps(tags)]
    for c in configs:
        cmd += ["-c", str(c)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


# ---------------------------------------------------------------------- reading the event log
def _records(instance, run_id: str):
    return [r.event_log_entry for r in instance.get_records_for_run(run_id).records]


def step_workers(instance, run_id: str) -> list[tuple[str, str]]:
    """(step key, celery worker) for every attempt of every step of a run, in order."""
    out = []
    for e in _records(instance, run_id):
        ev = e.dagster_event
        if ev is not None and ev.is_engine_event and "in celery worker" in (ev.message or ""):
            meta = ev.engine_event_data.metadata
            worker = meta.get("Celery worker")
            out.append((ev.step_key, str(getattr(worker, "value", worker)).split("@")[0]))
    return out


def retries(instance, run_id: str) -> list[str]:
    return [f"{e.dagster_event.step_key}: {e.user_message}" for e in _records(instance, run_id)
            if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"]


def runs_of_cluster(instance) -> list:
    from dagster import RunsFilter

    return instance.get_runs(filters=RunsFilter(job_name=JOB))


# ---------------------------------------------------------------------- faults
class Faults(threading.Thread):
    """Kill a gpu worker inside a MIS shard (see _victim); restart the broker after the first MIS success."""

    def __init__(self, instance, run_ids: list[str], workers: Workers, broker: Broker, mis_dir: Path,
                 kill: bool, restart: bool):
        super().__init__(daemon=True)
        self.instance, self.run_ids, self.workers, self.broker, self.mis_dir = instance, run_ids, workers, broker, mis_dir
        self.kill_wanted, self.restart_wanted = kill, restart
        self.killed: dict[str, Any] | None = None
        self.restarted: dict[str, Any] | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and (self.kill_wanted and not self.killed
                                          or self.restart_wanted and not self.restarted):
            if self.kill_wanted and not self.killed:
                self._maybe_kill()
            if self.restart_wanted and not self.restarted and self._mis_succeeded():
                start = time.monotonic()
                self.broker.stop()
                self.broker.start()
                self.restarted = {"seconds_down": round(time.monotonic() - start, 2), "at": time.time()}
            time.sleep(0.05)

    def partition_runs(self) -> list[str]:
        if not hasattr(self, "_partition_runs"):
            self._partition_runs = [r for r in self.run_ids
                                    if "m2m/partition" in self.instance.get_run_by_id(r).tags]
        return self._partition_runs

    def _victim(self) -> tuple[str, str, int] | None:
        """(worker, run id, partition): a gpu worker inside a MIS step after it finished a partition step of its
        own. Four MIS steps on two one-at-a-time workers: at least two are some worker's second step or later,
        so there always is one, and the killed worker has done work the survivor did not have to redo."""
        from dagster import DagsterEventType

        finished: dict[str, int] = {}
        running = []
        for run_id in self.partition_runs():
            done = {r.event_log_entry.dagster_event.step_key
                    for r in self.instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records}
            for step, worker in step_workers(self.instance, run_id):
                if step in done:
                    finished[worker] = finished.get(worker, 0) + 1
                elif step == "cluster__mis_shards":
                    running.append((worker, run_id))
        for worker, run_id in running:
            if worker.startswith("gpu") and finished.get(worker, 0) >= 1:
                part = self.instance.get_run_by_id(run_id).tags.get("m2m/partition")
                if part is not None:
                    return worker, run_id, int(part)
        return None

    def _maybe_kill(self) -> None:
        found = self._victim()
        if found is None:
            return
        worker, run_id, part = found
        # temp files of that partition's shards (shard i belongs to partition i % partitions): it is in a shard
        partial = [p for p in sorted(self.mis_dir.glob("*/.mis-*.tmp"))
                   if shard_index(p.name) % PROFILE.num_partitions == part]
        if partial:
            self.workers.kill(worker)
            self.killed = {"worker": worker, "run_id": run_id, "partition": str(part),
                           "partial_files": [str(p.relative_to(self.mis_dir)) for p in partial], "at": time.time()}

    def _mis_succeeded(self) -> bool:
        from dagster import DagsterEventType

        for run_id in self.run_ids:
            for r in self.instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records:
                if r.event_log_entry.dagster_event.step_key == "cluster__mis_shards":
                    return True
        return False


# ---------------------------------------------------------------------- reference and comparison
def reference_shards(work: Path, reference: Path) -> None:
    """The same partitions' MIS + feature shards in one process, from the cluster run's captions and autoencoder."""
    from dagster import DagsterInstance

    from m2m_pipeline.definitions import defs
    from m2m_pipeline.orchestration.jobs import range_tags

    for sub in ("assets/cluster/captions", "models/cluster/autoencoder"):
        shutil.copytree(work / sub, reference / sub)
    cfg = yaml.safe_load((repo_root() / "m2m_pipeline/configs/cluster.yaml").read_text())
    cfg["resources"]["settings"]["config"]["repo_dir"] = str(reference)
    result = defs.resolve_job_def(JOB).execute_in_process(run_config=cfg, instance=DagsterInstance.ephemeral(),
                                                      op_selection=PARTITION_OPS, tags=range_tags(PROFILE))
    if not result.success:
        raise SystemExit("cluster: the single-process reference run failed")


def shard_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every MIS and feature file (shards and manifests). A feature manifest records the autoencoder
    by its absolute path, which is the run's own folder: it is hashed with that folder written as <repo>."""
    import hashlib

    base = root / "assets/cluster"
    out = {}
    for kind in ("mis", "features"):
        for p in sorted((base / kind).glob("*/*")):
            if p.suffix == ".json":
                out[str(p.relative_to(base))] = hashlib.sha256(p.read_bytes().replace(str(root).encode(), b"<repo>")
                                                               ).hexdigest()
            elif p.is_file():
                out[str(p.relative_to(base))] = sha256_file(p)
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in (root / "assets/cluster").rglob("*.tmp")]


# ---------------------------------------------------------------------- main
@dataclass
class Site:
    """One cluster smoke's places and processes: the repo, its output folder, the run configs, the instance."""

    root: Path
    out: Path
    env: dict[str, str]
    configs: list[Path]
    instance: Any
    pointers: dict[str, str]

    @property
    def work(self) -> Path:
        return self.out / "work"

    def run(self, ops: list[str], tags: dict[str, str], log: str, extra: list[Path] = ()) -> subprocess.Popen:
        return launch(self.root, self.env, [*self.configs, *extra], ops, tags, self.out / log)


def _prepare(out: Path, broker: Broker) -> Site:
    """The broker's executor config (for the runs and the workers), the DVC pointer store, the run config."""
    from dagster import DagsterInstance

    celery_cfg = executor_config(broker)
    # the workers' -y file: dagster-celery's CLI reads the run config's execution block
    atomic_write_text(out / "celery.yaml", [yaml.safe_dump({"execution": {"config": celery_cfg}})])
    from m2m_pipeline.orchestration.dvc_pointers import local_pointer_config

    pointers = local_pointer_config(out / "dvc")
    atomic_write_text(out / "run.yaml", [yaml.safe_dump({"execution": {"config": celery_cfg}, "resources": {
        "settings": {"config": {"repo_dir": str(out / "work")}}, "dvc": {"config": pointers}}})])
    # the venv's bin first: dagster-celery starts `celery` from PATH
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    instance = DagsterInstance.get()
    instance.get_runs(limit=1)  # create the instance's storage before workers and runs open it at once
    root = repo_root()
    return Site(root, out, env, [root / "m2m_pipeline/configs/cluster.yaml", out / "run.yaml"], instance, pointers)


def _celery_app(broker: Broker):
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.make_app import make_app

    from m2m_pipeline.orchestration.celery_executor import ResilientCeleryExecutor

    cfg = executor_config(broker)
    return make_app(ResilientCeleryExecutor(RetryMode.DISABLED, broker=cfg["broker"], backend=cfg["backend"]).app_args())


def _fan_out(site: Site, workers: Workers, broker: Broker, kill: bool, restart: bool) -> tuple[list, list, Any, float]:
    """The inputs run, then one run per partition at once with the faults injected; (runs, exit codes, faults, s)."""
    start = time.monotonic()
    before = {r.run_id for r in runs_of_cluster(site.instance)}
    if site.run(INPUT_OPS, {"m2m/cluster": "inputs"}, "run-inputs.log").wait() != 0:
        raise SystemExit(f"cluster: the inputs run failed; see {site.out / 'run-inputs.log'}")
    # one partition per run: the range tags of the chain job narrowed to [p, p]
    procs = [site.run(PARTITION_OPS, {"dagster/asset_partition_range_start": p, "dagster/asset_partition_range_end": p,
                                      "m2m/partition": p}, f"run-partition-{p}.log") for p in PROFILE.partition_keys]
    run_ids = _wait_for_runs(site.instance, before, 1 + len(procs))
    faults = Faults(site.instance, run_ids, workers, broker, site.work / "assets/cluster/mis", kill, restart)
    faults.start()
    codes = [p.wait() for p in procs]
    faults.done.set()
    return run_ids, codes, faults, time.monotonic() - start


def _train(site: Site) -> tuple[str, int]:
    """m2m_self_checkpoint through the executor with 2 processes (TRAIN_SETTINGS / TRAIN_COMPUTE)."""
    train_cfg = site.out / "train.yaml"
    atomic_write_text(train_cfg, [yaml.safe_dump({"resources": {"settings": {"config": TRAIN_SETTINGS},
                                                                "compute": {"config": TRAIN_COMPUTE}}})])
    before = {r.run_id for r in runs_of_cluster(site.instance)}
    code = site.run(TRAIN_OPS, {"m2m/cluster": "training"}, "run-training.log", [train_cfg]).wait()
    return _wait_for_runs(site.instance, before, 1)[0], code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cluster-smoke"))
    parser.add_argument("--no-kill", action="store_true", help="no worker is killed")
    parser.add_argument("--no-broker-restart", action="store_true", help="the broker is not restarted")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "work").mkdir(parents=True)
    broker = Broker(out / "redis")
    broker.start()
    workers = None
    try:
        site = _prepare(out, broker)
        workers = Workers(out, out / "celery.yaml", site.env)
        workers.start(site.root)
        workers.wait_ready(_celery_app(broker))
        print(f"broker {broker.url}, workers {[f'{n} ({q})' for n, q in WORKERS]} ready")
        run_ids, codes, faults, seconds = _fan_out(site, workers, broker, not args.no_kill, not args.no_broker_restart)
        report = _report(site.instance, run_ids, codes, faults, seconds, site.work, out / "reference")
        report.update(_versions_report(_versions(site), report))  # v2 rewrites the shards: after the check
        train_run, train_code = _train(site)
        report.update(_training_report(site.instance, train_run, train_code, site.work, report))
        report.update(_checkpoint_version_report(site, report))
        problems = report["problems"]  # every section above adds its lines and problems; the verdict comes once
        report["text"] = "\n".join([*report.pop("lines"), "", "cluster smoke: "
                                     + ("FAILED\n" + "\n".join(problems) if problems else "OK")])
    finally:
        if workers is not None:
            workers.stop()
        broker.stop()
    atomic_write_text(out / "report.json", [json.dumps(report, indent=1, default=str)])
    print(report["text"])
    return 0 if not report["problems"] else 1


def _wait_for_runs(instance, before: set[str], count: int, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = [r.run_id for r in runs_of_cluster(instance) if r.run_id not in before]
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster: only {len(ids)} of {count} runs appeared in the instance")
        time.sleep(0.5)


def raw_hashes(root: Path) -> dict[str, str]:
    """sha256 of every MIS and feature file, by its path in the repository (what `dvc pull` restores)."""
    return {str(p.relative_to(root)): sha256_file(p) for kind in ("mis", "features")
            for p in sorted((root / "assets/cluster" / kind).glob("*/mis-*")) if p.is_file()}


def _version(site: Site, name: str) -> tuple[int, str]:
    """Run the collecting step (dataset_version); its exit code and the pointer repository's new HEAD."""
    from m2m_pipeline.orchestration.dvc_pointers import git

    code = site.run(VERSION_OPS, {"m2m/cluster": name}, f"run-{name}.log").wait()
    return code, git("rev-parse", "HEAD", cwd=Path(site.pointers["pointer_repo"])).strip()


def _versions(site: Site) -> dict[str, Any]:
    """v1: the pointers of the runs above; v2: the partitions regenerated with MIS seed 1; then v1 restored."""
    from m2m_pipeline.orchestration.dvc_pointers import restore

    outbox = Path(site.pointers["pointer_outbox"])
    staged_left = [str(p) for p in outbox.rglob(".*.tmp")]
    code1, rev1 = _version(site, "version-1")
    v1 = raw_hashes(site.work)
    v2_cfg = site.out / "v2.yaml"
    atomic_write_text(v2_cfg, [yaml.safe_dump({"resources": {"settings": {"config": {"mis": {"seed": 1}}}},
                                               "ops": {"cluster__mis_shards": {"config": {"force": True}}}})])
    procs = [site.run(PARTITION_OPS, {"dagster/asset_partition_range_start": p, "dagster/asset_partition_range_end": p,
                                      "m2m/partition": p, "m2m/cluster": "v2"}, f"run-v2-partition-{p}.log", [v2_cfg])
             for p in PROFILE.partition_keys]
    codes2 = [p.wait() for p in procs]
    code2, rev2 = _version(site, "version-2")
    v2 = raw_hashes(site.work)
    restored = restore(site.pointers["pointer_repo"], rev1, site.out / "restore-v1" / "repo")
    return {"rev1": rev1, "rev2": rev2, "codes": [code1, *codes2, code2], "v1": v1, "v2": v2, "restored": restored,
            "pointer_sets": sorted(str(p.relative_to(outbox)) for p in outbox.glob("*/*")),
            "staged_left_after_kill": staged_left}


def _checkpoint_version_report(site: Site, report: dict[str, Any]) -> dict[str, Any]:
    """v3 after training: the checkpoint the training pod pushed is in the dataset version too."""
    from m2m_pipeline.orchestration.dvc_pointers import git

    code, rev3 = _version(site, "version-3")
    tracked = git("ls-tree", "-r", "--name-only", rev3, cwd=Path(site.pointers["pointer_repo"])).split()
    ckpt = [t for t in tracked if t.startswith("models/cluster/m2m_self/final/")]
    ok = code == 0 and any(t.endswith("model.safetensors.dvc") for t in ckpt)
    line = (f"v3 {rev3[:10]} after training: {len(tracked)} files tracked, {len(ckpt)} of them the checkpoint's "
            f"pointers (pushed by the training step from its own working copy)")
    if not ok:
        report["problems"].append(f"the checkpoint is not in dataset version v3 (exit {code})")
    report["lines"].append(line)
    return {"dvc_v3": {"rev": rev3, "checkpoint_pointers": ckpt}}


def _versions_report(v: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    problems = report["problems"]
    same = v["restored"] == v["v1"]
    changed = sorted(k for k in v["v1"] if v["v2"].get(k) != v["v1"][k])
    lines = ["", f"DVC from many executors: {len(v['pointer_sets'])} pointer sets published by the partition steps "
                 f"(each from its own working copy, no shared lock), committed by dataset_version as v1 "
                 f"{v['rev1'][:10]}; partitions regenerated with MIS seed 1 -> v2 {v['rev2'][:10]} ({len(changed)} "
                 f"of {len(v['v1'])} files changed); a fresh clone at v1 + dvc pull restored {len(v['restored'])} "
                 f"files: {'every SHA-256 equal to v1' if same else 'DIFFERENT from v1'}; pointer staging left by "
                 f"the killed worker: {v['staged_left_after_kill'] or 'none'}"]
    if not same or not changed or any(v["codes"]) or v["staged_left_after_kill"]:
        problems.append(f"DVC round trip: restored == v1: {same}, files changed by v2: {len(changed)}, "
                        f"exit codes {v['codes']}")
    report["lines"] += lines
    return {"dvc": {k: v[k] for k in ("rev1", "rev2", "codes", "pointer_sets", "staged_left_after_kill")},
            "dvc_restored_equal": same, "dvc_changed_by_v2": len(changed)}


def _training_report(instance, run_id: str, code: int, work: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The multi-process training run: where it ran, what it streamed back, its losses vs one process."""
    from m2m_pipeline.network import M2MConfig
    from m2m_pipeline.training import TrainConfig, train
    from m2m_pipeline.training_stats import curves_agree

    problems, lines = report["problems"], [""]
    run = instance.get_run_by_id(run_id)
    steps = step_workers(instance, run_id)
    streamed = [e.user_message for e in _records(instance, run_id) if (e.user_message or "").startswith("step ")]
    result_path = work / "models/cluster/m2m_self/train_result.json"
    if run.status.value != "SUCCESS" or code != 0 or not result_path.exists():
        problems.append(f"the training run {run_id} is {run.status.value}")
        return {"training": {"run_id": run_id, "status": run.status.value}}
    ddp = json.loads(result_path.read_text())
    shards = sorted(str(p) for p in (work / "assets/cluster/features/train").glob("mis-*.tar"))
    tc = TrainConfig.preset(PROFILE.train_preset, **{**TRAIN_SETTINGS["train"], "batch_size": 4, "global_batch_size": 0})
    single = train(M2MConfig.preset(PROFILE.net_preset, variant="self"), tc, shards, work / "reference-training",
                   progress=False)
    ok, stats = curves_agree(ddp["losses"], single.losses, window=TRAIN_WINDOW)
    state = json.loads((Path(ddp["checkpoint_dir"]) / "train_state.json").read_text())
    lines.append(f"training: m2m_self_checkpoint on {', '.join(w for _, w in steps)} via Pipes + accelerate launch "
                 f"--multi_gpu --num_processes 2: world size {state.get('world_size')}, global batch "
                 f"{state.get('global_batch_size')}, {ddp['steps']} steps, {len(streamed)} metric lines streamed back "
                 f"(e.g. {streamed[-1] if streamed else '-'!r}); loss window means (2 processes) "
                 f"{stats['window_means_a']} vs one process {stats['window_means_b']}, z {stats['z']}: "
                 f"{'agree' if ok else 'DIFFER'}")
    if not ok or state.get("world_size") != 2 or not streamed:
        problems.append(f"multi-process training through the executor: agree={ok}, world size "
                        f"{state.get('world_size')}, {len(streamed)} streamed lines")
    report["lines"] += lines
    return {"training": {"run_id": run_id, "workers": steps, "streamed": streamed, "agree": ok, "stats": stats,
                         "world_size": state.get("world_size")}}


def _report(instance, run_ids, codes, faults, seconds, work, reference) -> dict[str, Any]:
    problems: list[str] = []
    lines = [f"cluster smoke: {len(codes)} partition runs in {seconds:.0f} s", "",
             "| run | partition | status | steps on workers (attempt order) | retries |", "|---|---|---|---|---|"]
    per_worker: dict[str, list[str]] = {}
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        part = run.tags.get("m2m/partition", "inputs")
        steps = step_workers(instance, run_id)
        for step, worker in steps:
            per_worker.setdefault(worker, []).append(f"{step.removeprefix('cluster__')}[{part}]")
        retried = retries(instance, run_id)
        attempts = ", ".join(f"{s.removeprefix('cluster__')}@{w}" for s, w in steps)
        lines.append(f"| {run_id[:8]} | {part} | {run.status.value} | {attempts} | {len(retried)} |")
        if run.status.value != "SUCCESS":
            problems.append(f"run {run_id} (partition {part}) is {run.status.value}")
    lines += ["", "steps per worker: " + "; ".join(f"{w}: {', '.join(s)}" for w, s in sorted(per_worker.items()))]
    all_retries = [r for run_id in run_ids for r in retries(instance, run_id)]
    if faults.kill_wanted:
        if not faults.killed:
            problems.append("the worker kill did not land inside a MIS shard")
        else:
            lines.append(f"killed: {faults.killed['worker']} (SIGKILL to its process group) in partition "
                         f"{faults.killed['partition']} while writing {faults.killed['partial_files']}")
            if not all_retries:
                problems.append("no STEP_UP_FOR_RETRY in the event log after the kill")
            attempts = [w for s, w in step_workers(instance, faults.killed["run_id"]) if s == "cluster__mis_shards"]
            if len(attempts) < 2 or attempts[-1] == faults.killed["worker"]:
                problems.append(f"the killed MIS step was not retried on another worker: attempts on {attempts}")
    lines += [f"retry: {r}" for r in all_retries]
    if faults.restart_wanted:
        if faults.restarted:
            lines.append(f"broker restarted after the first MIS step succeeded ({faults.restarted['seconds_down']} s down)")
        else:
            problems.append("the broker was not restarted")
    reference_shards(work, reference)
    got, want = shard_hashes(work), shard_hashes(reference)
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    lines.append(f"shards: {len(got)} files (MIS + features, manifests included); single-process reference "
                 f"{len(want)}; differing: {differ or 'none'}")
    if differ or not got:
        problems.append(f"shards differ from the single-process run: {differ}")
    left = leftovers(work)
    lines.append(f"partial (temp) files left: {left or 'none'}")
    if left:
        problems.append(f"partial files left: {left}")
    return {"runs": run_ids, "exit_codes": codes, "per_worker": per_worker, "killed": faults.killed,
            "broker_restart": faults.restarted, "retries": all_retries, "hashes": got, "differ": differ,
            "leftovers": left, "problems": problems, "seconds": round(seconds, 1), "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
