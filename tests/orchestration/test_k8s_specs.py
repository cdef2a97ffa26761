"""The pod specs dagster-k8s' k8s_job_executor would submit for the paper job, rendered offline from paper.yaml."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from m2m_pipeline.orchestration.k8s_specs import CONFIGS, render_job, resources_of

GPU_STEPS = {"mis_shards", "feature_caches", "m2m_self_evaluation_report", "m2m_dino_evaluation_report", "coco_zero_shot",
             "sampling_benchmark", "nvs_checkpoint", "procedure_checkpoint", "nvs_evaluation", "procedure_evaluation"}
TRAINING = {"m2m_self_checkpoint", "m2m_dino_checkpoint"}


@pytest.fixture(scope="module")
def rendered():
    return render_job(image="registry.example/m2m:1.0")


def test_every_op_gets_a_job_with_the_image_namespace_env_and_shard_store(rendered):
    assert {op.removeprefix("paper__") for op in rendered} >= GPU_STEPS | TRAINING | {"raw_captions"}
    for op, r in rendered.items():
        assert r["namespace"] == "m2m" and r["job"]["kind"] == "Job"
        spec = r["job"]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["image"] == "registry.example/m2m:1.0" and container["imagePullPolicy"] == "IfNotPresent"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and env["DAGSTER_RUN_STEP_KEY"] == op
        assert {"name": "m2m-data", "mountPath": "/data/m2m"} in container["volumeMounts"]
        assert {"name": "m2m-data", "persistentVolumeClaim": {"claimName": "m2m-data"}} in spec["volumes"]
        assert r["job"]["metadata"]["labels"]["dagster/op"] == op


def test_gpu_limits_follow_the_op_tags_and_per_step_config(rendered):
    for op, r in rendered.items():
        name, limits = op.removeprefix("paper__"), resources_of(r)["limits"]
        gpus = limits.get("nvidia.com/gpu")
        assert gpus == ("8" if name in TRAINING else "1" if name in GPU_STEPS else None), (op, limits)
        assert resources_of(r)["requests"] == {"cpu": "4", "memory": "32Gi"}
    train = rendered["paper__m2m_dino_checkpoint"]["job"]["spec"]["template"]["spec"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in train["containers"][0]["volumeMounts"]
    assert resources_of(rendered["paper__m2m_self_checkpoint"])["limits"]["memory"] == "512Gi"


def test_a_config_without_per_step_training_gpus_renders_one(rendered):
    config = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    del config["execution"]["config"]["per_step_k8s_config"]
    other = render_job(run_config=config)
    assert resources_of(other["paper__m2m_self_checkpoint"])["limits"]["nvidia.com/gpu"] == "1"  # the op tag


def test_cli_prints_json():
    proc = subprocess.run([sys.executable, "-m", "m2m_pipeline.orchestration.k8s_specs", "--image", "x:1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["paper__mis_shards"]["job"]["spec"]["template"]["spec"]["containers"][0][
        "image"] == "x:1"
