"""DDP with 2 CPU processes: same learning as one process with the same global batch, and a NaN on one rank is
skipped by both, then aborts naming that rank's data; a resume under DDP is exact.

The launch is `accelerate launch --multi_gpu --num_processes 2` with training on the CPU (gloo): in accelerate
1.15, `--cpu --num_processes 2` starts a single process unless an MPI hostfile is given (its simple launcher),
which the world-size check below caught (docs/training.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_scale import MICRO, ColourSets, micro_config
from torch.utils.data import DataLoader
from m2m_pipeline.training_stats import curves_agree

from m2m_pipeline.data.loader import collate_examples
from m2m_pipeline.training import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 60


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_and_agree_on_nan(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "scripts" / "ddp_train.py"), str(tmp_path), str(STEPS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp_losses.json").read_text())
    state = json.loads((tmp_path / "ddp" / "final" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 4 and len(ddp) == STEPS

    data = DataLoader(ColourSets(24), batch_size=4, shuffle=True, collate_fn=collate_examples, drop_last=True)
    single = train(MICRO, micro_config(steps=STEPS, batch_size=4, checkpoint_every=0), data, tmp_path / "one",
                   progress=False, device="cpu")
    ok, report = curves_agree(ddp, single.losses, window=15)
    print("DDP (a) vs one process (b):", report)
    assert ok, report
    assert report["window_means_a"][-1] < 0.8 * report["window_means_a"][0], report  # it did learn

    for rank in (0, 1):  # both ranks skipped rank 1's NaN batches together, then aborted with the same message
        message = (tmp_path / f"nan_rank{rank}.txt").read_text()
        assert "3 non-finite losses/gradients in a row, last at step 1, data ['mis-000001.tar#bad-a'" in message

    losses = json.loads((tmp_path / "resume_losses.json").read_text())  # DDP resume is exact too
    assert len(losses["straight"]) == 8 and losses["resumed"] == losses["straight"]
