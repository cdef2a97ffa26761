"""`python tests/scripts/train_until_killed.py OUT THREADS`: the micro run of test_training_scale, slowed down after
its first checkpoint (sleeping in the metrics callback changes no number) so the test can SIGKILL it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_training_scale import MICRO, list_data, micro_config

import torch

from m2m_pipeline.training import train


def slow_after_first_checkpoint(metrics: dict, step: int) -> None:
    if step >= 5:
        time.sleep(1.0)


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))  # the parent's count: same reduction order, same bits
    train(MICRO, micro_config(), list_data(), Path(sys.argv[1]), progress=False, device="cpu",
          on_metrics=slow_after_first_checkpoint)
