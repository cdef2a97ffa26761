"""dagster-celery's executor, with a lost worker handled as a failed step under the op's RetryPolicy.

dagster-celery waits on a step's Celery result until it is ready; a worker killed while it runs a step (a host
lost, an OOM kill, a preempted node) never sends one, so the run waits forever, and a pool child killed under a
live worker (WorkerLostError) fails the run without a retry. This executor keeps dagster-celery's submission,
queues (`dagster-celery/queue` op tag), priorities and worker tasks unchanged and only changes the wait loop:

- tasks are tracked as STARTED (`task_track_started`), which records the worker's name;
- every `liveness_seconds` the loop pings the workers that hold started steps; one that has not answered for
  `lost_after_seconds` while another worker answers (so a broker restart is not taken for a lost worker) is
  lost: its task is revoked and the step gets what Dagster's multiprocess executor gives a crashed child
  process, `Executor.log_failure_or_retry_event_after_error`: STEP_UP_FOR_RETRY with the op's RetryPolicy
  delay and backoff while retries are left, else STEP_FAILURE. The retry goes back to the step's queue, so
  another worker takes it.
- a WorkerLostError result takes the same path.

Workers fetch one task at a time (`worker_disable_prefetch`, Redis brokers) and ack it when they start it, so a
killed worker holds no queued step and a step is never redelivered behind Dagster's back.

The loop is dagster-celery 0.29's `core_celery_execution_loop` with those two changes (it is not pluggable).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from dagster import Field, executor, multiple_process_executor_requirements
from dagster import _check as check
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.retries import RetryMode
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info
from dagster_celery.core_execution_loop import DELEGATE_MARKER, _get_step_priority
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task
from dagster_celery.make_app import make_app
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG
from dagster_shared.serdes import deserialize_value

# What workers and the executor must agree on (the workers read the same executor config, cluster.py).
CELERY_SETTINGS = {"task_track_started": True, "worker_disable_prefetch": True, "task_acks_late": False,
                   "broker_connection_retry_on_startup": True}

RESILIENT_CONFIG = {
    **CELERY_CONFIG,
    "liveness_seconds": Field(float, default_value=2.0, is_required=False,
                              description="Seconds between pings of the workers that hold started steps."),
    "lost_after_seconds": Field(float, default_value=10.0, is_required=False,
                                description="A worker silent this long while others answer is lost."),
}


class ResilientCeleryExecutor(CeleryExecutor):
    def __init__(self, retries: RetryMode, liveness_seconds: float = 2.0, lost_after_seconds: float = 10.0,
                 **kwargs: Any):
        super().__init__(retries, **kwargs)
        self.config_source.__dict__.update(CELERY_SETTINGS)
        self.liveness_seconds = liveness_seconds
        self.lost_after_seconds = lost_after_seconds

    def execute(self, plan_context, execution_plan):
        return _execution_loop(plan_context, execution_plan, self)


@executor(name="m2m_celery", config_schema=RESILIENT_CONFIG, requirements=multiple_process_executor_requirements())
def m2m_celery_executor(init_context) -> ResilientCeleryExecutor:
    """dagster-celery's `celery_executor` config (broker, backend, include, config_source, retries) plus
    `liveness_seconds` and `lost_after_seconds`; see the module docstring."""
    cfg = init_context.executor_config
    return ResilientCeleryExecutor(
        retries=RetryMode.from_config(cfg["retries"]), broker=cfg.get("broker"), backend=cfg.get("backend"),
        include=cfg.get("include"), config_source=cfg.get("config_source"),
        liveness_seconds=cfg.get("liveness_seconds", 2.0), lost_after_seconds=cfg.get("lost_after_seconds", 10.0))


class _Liveness:
    """Which workers answer pings; a worker is lost once silent for `lost_after` while some other one answers."""

    def __init__(self, app, every: float, lost_after: float):
        self.app, self.every, self.lost_after = app, every, lost_after
        self.last_seen: dict[str, float] = {}
        self.next_ping = 0.0

    def lost(self, hostnames: set[str]) -> set[str]:
        now = time.monotonic()
        for h in hostnames:
            self.last_seen.setdefault(h, now)
        if not hostnames or now < self.next_ping:
            return set()
        self.next_ping = now + self.every
        try:
            replies = self.app.control.ping(timeout=1.0)  # [{hostname: {"ok": "pong"}}, ...] from every worker
        except Exception:  # noqa: BLE001 - broker unreachable (restarting): nobody is declared lost
            return set()
        answered = {h for reply in replies for h in reply}
        for h in answered:
            self.last_seen[h] = now
        if not answered:  # no worker answers: the broker, not a worker, is the likely problem
            return set()
        return {h for h in hostnames if h not in answered and now - self.last_seen[h] > self.lost_after}


def _worker_of(result) -> str | None:
    """The worker that started a task (task_track_started: state STARTED, info {"hostname": ..., "pid": ...})."""
    try:
        if result.state == "STARTED" and isinstance(result.info, dict):
            return result.info.get("hostname")
    except Exception:  # noqa: BLE001 - backend unreachable for a moment: ask again next tick
        return None
    return None


def _lost_error(step_key: str, message: str) -> SerializableErrorInfo:
    return SerializableErrorInfo(message=f"step {step_key}: {message}", stack=[], cls_name="WorkerLost", cause=None)


def _execution_loop(job_context, execution_plan, executor_: ResilientCeleryExecutor):
    """dagster-celery's core loop (see the module docstring for the two changes)."""
    from celery.exceptions import TaskRevokedError, WorkerLostError

    if execution_plan.step_keys_to_execute:
        check.invariant(execution_plan.artifacts_persisted, "the Celery executor needs a persistent IO manager")
    app = make_app(executor_.app_args())
    liveness = _Liveness(app, executor_.liveness_seconds, executor_.lost_after_seconds)
    step_results: dict[str, Any] = {}
    step_errors: dict[str, SerializableErrorInfo] = {}
    with InstanceConcurrencyContext(job_context.instance, job_context.dagster_run) as concurrency, \
            execution_plan.start(retry_mode=executor_.retries, instance_concurrency_context=concurrency) as active:
        stopping = False
        while (not active.is_complete and not stopping) or step_results:
            if active.check_for_interrupts():
                yield DagsterEvent.engine_event(job_context, "Celery executor: interrupted, revoking active tasks",
                                                EngineEventData.interrupted(list(step_results)))
                stopping = True
                active.mark_interrupted()
                for result in step_results.values():
                    result.revoke()
            yield from _collect(job_context, active, step_results, step_errors, executor_, TaskRevokedError,
                                WorkerLostError)
            yield from _handle_lost(job_context, active, step_results, liveness, executor_)
            yield from active.plan_events_iterator(job_context)
            if stopping or step_errors:
                continue
            for step in active.get_steps_to_execute():
                queue = step.tags.get(DAGSTER_CELERY_QUEUE_TAG, app.conf.task_default_queue)
                yield DagsterEvent.engine_event(job_context.for_step(step),
                                                f'Submitting celery task for step "{step.key}" to queue "{queue}".',
                                                EngineEventData(marker_start=DELEGATE_MARKER))
                priority = _get_step_priority(job_context, step, app.conf.task_default_priority)
                step_results[step.key] = _submit_task(app, job_context, step, queue, priority,
                                                      active.get_known_state())
            time.sleep(1)
        if step_errors:
            from dagster._core.errors import DagsterSubprocessError

            raise DagsterSubprocessError(
                "During celery execution errors occurred in workers:\n"
                + "\n".join(f"[{k}]: {e.to_string()}" for k, e in step_errors.items()),
                subprocess_error_infos=list(step_errors.values()))


def _collect(job_context, active, step_results, step_errors, executor_, revoked_error, lost_error):
    """Events of the finished tasks; a WorkerLostError becomes a failure-or-retry of its step."""
    for step_key, result in list(step_results.items()):
        try:
            if not result.ready():
                continue
        except Exception:  # noqa: BLE001 - the result backend is restarting: ask again next tick
            continue
        del step_results[step_key]
        step = active.get_step_by_key(step_key)
        try:
            events = result.get()
        except revoked_error:
            events = []
            yield DagsterEvent.engine_event(job_context.for_step(step), f'celery task for step "{step_key}" was revoked.',
                                            EngineEventData(marker_end=DELEGATE_MARKER))
        except lost_error:
            yield from _fail_or_retry(job_context, active, step, executor_, serializable_error_info_from_exc_info(
                sys.exc_info()))
            continue
        except Exception:  # noqa: BLE001 - dagster-celery's behaviour: the run fails with the worker's error
            events = []
            step_errors[step_key] = serializable_error_info_from_exc_info(sys.exc_info())
        for raw in events:
            event = deserialize_value(raw, DagsterEvent)
            yield event
            active.handle_event(event)
        active.verify_complete(job_context, step_key)


def _handle_lost(job_context, active, step_results, liveness, executor_):
    """Steps whose worker stopped answering: revoke, then failure-or-retry (the op's RetryPolicy)."""
    holders = {key: _worker_of(result) for key, result in step_results.items()}
    lost = liveness.lost({h for h in holders.values() if h})
    for step_key, host in holders.items():
        if host not in lost:
            continue
        step_results.pop(step_key).revoke()
        step = active.get_step_by_key(step_key)
        message = (f"celery worker {host} stopped answering for {liveness.lost_after:g} s while it ran this step "
                   f"(worker lost)")
        yield DagsterEvent.engine_event(job_context.for_step(step), message,
                                        EngineEventData({"Celery worker": host}, marker_end=DELEGATE_MARKER))
        yield from _fail_or_retry(job_context, active, step, executor_, _lost_error(step_key, message))


def _fail_or_retry(job_context, active, step, executor_, error: SerializableErrorInfo):
    event = executor_.log_failure_or_retry_event_after_error(job_context.for_step(step), error,
                                                             active.get_known_state())
    yield event
    active.handle_event(event)
    active.verify_complete(job_context, step.key)
