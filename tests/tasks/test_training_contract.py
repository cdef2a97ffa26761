"""The task batches fit the network and objective as they stand: one loss + backward per task (tiny preset)."""

import pytest
import torch

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.objective import M2MObjective
from m2m_pipeline.tasks import ObjaverseViews, ProcedureSteps
from m2m_pipeline.tasks.batching import make_task_loader


@pytest.mark.parametrize("task", ["camera", "position"])
def test_batch_trains_tiny_net(task, polyhedra_root, procedures_root):
    config = M2MConfig.preset("tiny", "self", task=task)
    dataset = (ObjaverseViews(polyhedra_root, n_views=3, image_size=config.image_size) if task == "camera"
               else ProcedureSteps(procedures_root, n_steps=3, image_size=config.image_size))
    batch = next(iter(make_task_loader(dataset, batch_size=2)))
    net = M2MUNet(config)
    loss = M2MObjective(config)(net, batch["latents"], batch["latents"], batch["task_cond"],
                                generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
