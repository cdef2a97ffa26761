"""Training child process launched by the training assets through Dagster Pipes.

`python -m m2m_pipeline.orchestration.pipes_train` (or under `accelerate launch`): reads its job from
the Pipes extras, trains, logs metrics to the asset's MLflow run, writes `<out>/train_result.json`.
Only rank 0 reports when several processes run.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster_pipes import open_dagster_pipes


def main() -> None:
    with open_dagster_pipes() as pipes:
        rank = int(os.environ.get("RANK", "0"))
        extras = pipes.extras
        from m2m_pipeline.network import M2MConfig
        from m2m_pipeline.orchestration.training_launch import summarise
        from m2m_pipeline.tracking import MlflowRun, NullRun
        from m2m_pipeline.training import TrainConfig, initial_network, train

        tracked = extras.get("tracking_uri") and extras.get("mlflow_run_id") and rank == 0
        log_train = (MlflowRun.attach(extras["tracking_uri"], extras["mlflow_run_id"]) if tracked
                     else NullRun()).metrics_logger("train")  # the asset's own run: the child never ends it

        net_config = M2MConfig.preset(extras["net_preset"], variant=extras["variant"])
        # the variant's own subset and steps, as train() resolves them (TrainConfig.for_variant)
        train_config = TrainConfig.preset(extras["train_preset"], **extras["train_overrides"]).for_variant(extras["variant"])
        # metrics stream back into the Dagster run as Pipes log lines, about 20 per run (and to MLflow, every one)
        every = max(train_config.log_every, train_config.steps // 20 // train_config.log_every * train_config.log_every)

        def on_metrics(metrics: dict[str, float], step: int) -> None:
            log_train(metrics, step)
            if rank == 0 and step % every == 0:
                pipes.log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

        net = initial_network(extras.get("init_from"), net_config, bool(extras.get("from_scratch")))  # the in-process path's initial weights
        result = train(net_config, train_config, extras["shards"], Path(extras["out"]), net=net, on_metrics=on_metrics,
                       device=extras["device"], progress=False)
        if rank == 0:
            summary = summarise(result, Path(extras["out"]))
            pipes.log.info(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s, "
                           f"final loss {summary['final_loss']:.4f}")


if __name__ == "__main__":
    main()
