"""How the training assets run `m2m_pipeline.training.train`: in the step's process, or in a child process
through Dagster Pipes (`python -m` or `accelerate launch`, so a multi-GPU launch is one config change).

The child (`pipes_train.py`) gets its job as Pipes extras, logs metrics to the asset's MLflow run itself
and writes `train_result.json`; the parent streams its logs into the Dagster run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from m2m_pipeline.orchestration.resources import ComputeResource, Resolved
from m2m_pipeline.tracking import MlflowRun


def train_overrides(r: Resolved, compute: ComputeResource) -> dict[str, Any]:
    """The run config's TrainConfig overrides plus what the compute resource decides: data-loader workers and the
    precision (compute.dtype -> mixed_precision, docs/training.md "Precision"; "auto" keeps the TrainConfig's)."""
    from m2m_pipeline.precision import accelerate_precision

    overrides = {**r.train_overrides, "num_workers": compute.workers}
    precision = accelerate_precision(compute.dtype)
    if precision != "auto":
        own = overrides.get("mixed_precision", "auto")
        if own not in ("auto", precision):
            raise ValueError(f"resources.compute.config.dtype={compute.dtype} contradicts "
                             f"resources.settings.config.train.mixed_precision={own}: set one of them")
        overrides["mixed_precision"] = precision
    return overrides


def train_configs(r: Resolved, variant: str, compute: ComputeResource) -> tuple[Any, Any]:
    """The variant's network and training configs; the TrainConfig is the variant's own (its subset, its steps)."""
    from m2m_pipeline.network import M2MConfig
    from m2m_pipeline.training import TrainConfig

    net_config = M2MConfig.preset(r.net_preset, variant=variant)
    train_config = TrainConfig.preset(r.train_preset, **train_overrides(r, compute)).for_variant(variant)
    return net_config, train_config


def run_training(context: Any, r: Resolved, variant: str, shards: list[str], out: Path, compute: ComputeResource,
                 run: MlflowRun) -> dict[str, Any]:
    """Train one model into `out` from the profile's initial weights (the previous run's checkpoints are removed
    first)."""
    net_config, train_config = train_configs(r, variant, compute)
    run.log_params({"variant": variant, "net_preset": r.net_preset, "train_preset": r.train_preset,
                    "init_from": str(r.init_from.relative_to(r.root)) if r.init_from else "random",
                    **{f"train.{k}": v for k, v in train_config.to_dict().items()},
                    "launcher": compute.launcher, "device": compute.resolved_device()})
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if compute.launcher == "inprocess":
        from m2m_pipeline.training import initial_network, train

        def on_metrics(metrics: dict[str, float], step: int) -> None:
            run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

        net = initial_network(r.init_from, net_config, r.from_scratch)
        result = train(net_config, train_config, shards, out, net=net, on_metrics=on_metrics,
                       device=compute.resolved_device(), progress=False)
        summary = summarise(result, out)
    else:
        summary = _run_with_pipes(context, r, variant, shards, out, compute, run, train_config)
    return summary


def summarise(result: Any, out: Path) -> dict[str, Any]:
    from safetensors import safe_open

    parameters = 0
    with safe_open(str(Path(result.checkpoint_dir) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
            parameters += _numel(f.get_slice(name).get_shape())
    summary = {"losses": list(result.losses), "final_loss": float(result.final_loss), "steps": int(result.steps),
               "seconds": float(result.seconds), "checkpoint_dir": str(result.checkpoint_dir),
               "parameters": parameters, "data_subset": result.data_subset}
    (out / "train_result.json").write_text(json.dumps(summary))
    return summary


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _run_with_pipes(context: Any, r: Resolved, variant: str, shards: list[str], out: Path,
                    compute: ComputeResource, run: MlflowRun, train_config: Any) -> dict[str, Any]:
    from dagster import PipesSubprocessClient

    entry = ["-m", "m2m_pipeline.orchestration.pipes_train"]
    if compute.launcher == "accelerate":
        # Several processes go through torchrun (`--multi_gpu`) even on CPU, where train() picks gloo: accelerate's
        # `--cpu --num_processes N` starts one process unless given an MPI hostfile (docs/training.md).
        if compute.num_processes > 1:
            placement = ["--multi_gpu"]
        else:
            placement = ["--cpu"] if compute.resolved_device() == "cpu" else []
        command = [sys.executable, "-m", "accelerate.commands.launch", *placement, "--num_processes",
                   str(compute.num_processes), *entry]
    else:
        command = [sys.executable, *entry]
    extras = {"net_preset": r.net_preset, "variant": variant, "train_preset": r.train_preset,
              "train_overrides": train_overrides(r, compute), "shards": shards,
              "out": str(out), "device": compute.resolved_device(), "init_from": str(r.init_from or ""),
              "from_scratch": r.from_scratch,
              "tracking_uri": run.client.tracking_uri if run.client is not None else "", "mlflow_run_id": run.run_id}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(r.root), os.environ.get("PYTHONPATH", "")])}
    PipesSubprocessClient(cwd=str(r.root), env=env).run(command=command, context=context, extras=extras)
    result_path = out / "train_result.json"
    if not result_path.exists():
        raise RuntimeError(f"training child exited without writing {result_path}")
    return json.loads(result_path.read_text())
