"""The Kubernetes Jobs dagster-k8s' `k8s_job_executor` would submit for each step of the paper job, rendered
offline (docs/orchestration.md): no cluster, no kubeconfig.

The per-step merge is the executor's own (`dagster_k8s.executor.k8s_job_executor` and
`K8sStepHandler._get_container_context`): the run config's executor fields -> `K8sContainerContext`, then the
op's `dagster-k8s/config` tag, then `per_step_k8s_config[op]`; the Job body comes from dagster-k8s'
`construct_dagster_k8s_job`. Only the Dagster API call a pod runs (`dagster api execute_step` with a serialized
step) is left out, because it needs a live run.

    python -m m2m_pipeline.orchestration.k8s_specs --image ghcr.io/org/m2m-pipeline:TAG > pods.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class RunLauncherFields:
    """What `get_k8s_job_config` reads from the deployment's K8sRunLauncher; defaults: the dagster Helm chart's
    for a release named "dagster" (docs/deploy.md)."""

    job_image: str | None = None
    dagster_home: str = "/opt/dagster/dagster_home"
    instance_config_map: str = "dagster-instance"
    postgres_password_secret: str = "dagster-postgresql-secret"


def container_context(executor_config: dict[str, Any]) -> Any:
    """`K8sContainerContext` from the executor's run-config fields, exactly as `k8s_job_executor` builds it."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    c = executor_config
    return K8sContainerContext(
        image_pull_policy=c.get("image_pull_policy"), image_pull_secrets=c.get("image_pull_secrets"),
        service_account_name=c.get("service_account_name"), env_config_maps=c.get("env_config_maps"),
        env_secrets=c.get("env_secrets"), env_vars=c.get("env_vars"), volume_mounts=c.get("volume_mounts"),
        volumes=c.get("volumes"), labels=c.get("labels"), namespace=c.get("job_namespace"),
        resources=c.get("resources"), scheduler_name=c.get("scheduler_name"),
        security_context=c.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(c.get("step_k8s_config", {})),
    )


def step_job(op_name: str, op_tags: dict[str, Any], executor_config: dict[str, Any], image: str,
             job_name: str, launcher: RunLauncherFields = RunLauncherFields()) -> dict[str, Any]:
    """The V1Job (as the JSON the API server receives) of one step."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
    from kubernetes.client import ApiClient

    context = container_context(executor_config)
    per_op = UserDefinedDagsterK8sConfig.from_dict(executor_config.get("per_step_k8s_config", {}).get(op_name, {}))
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(op_tags))).merge(
        K8sContainerContext(run_k8s_config=per_op))
    job_config = context.get_k8s_job_config(image, launcher)
    name = f"dagster-step-{op_name.replace('_', '-')}"[:63]
    job = construct_dagster_k8s_job(
        job_config=job_config, args=["dagster", "api", "execute_step"], job_name=name, pod_name=name,
        component="step_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job_name, "dagster/op": op_name},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": job_name}, {"name": "DAGSTER_RUN_STEP_KEY",
                                                                        "value": op_name}])
    return {"namespace": context.namespace, "job": ApiClient().sanitize_for_serialization(job)}


def render_job(job_name: str = "m2m_paper_job", run_config: dict[str, Any] | None = None,
               image: str = "m2m-pipeline:latest") -> dict[str, dict[str, Any]]:
    """{op name: {"namespace", "job"}} for every op of `job_name` under `run_config` (default: paper.yaml)."""
    from m2m_pipeline.definitions import defs

    config = run_config if run_config is not None else yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    executor_config = config.get("execution", {}).get("config", {})
    job = defs.resolve_job_def(job_name)
    return {name: step_job(name, dict(node.definition.tags), executor_config, image, job_name)
            for name, node in sorted(job.graph.node_dict.items())}


def resources_of(rendered: dict[str, Any]) -> dict[str, Any]:
    """The first container's resources of a rendered step."""
    return rendered["job"]["spec"]["template"]["spec"]["containers"][0].get("resources", {})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="m2m_paper_job")
    ap.add_argument("--config", type=Path, default=CONFIGS / "paper.yaml")
    ap.add_argument("--image", default="m2m-pipeline:latest", help="the image every step pod runs")
    args = ap.parse_args(argv)
    rendered = render_job(args.job, yaml.safe_load(args.config.read_text()), args.image)
    json.dump(rendered, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
