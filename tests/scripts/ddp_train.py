"""Run under `accelerate launch --num_processes 2 --cpu tests/scripts/ddp_train.py OUT` (tests/test_ddp.py).

1. trains the micro M2M on colour sets, 2 sets per process per step (global batch 4); rank 0 writes losses;
2. trains on data whose sets are NaN on rank 1 only: both ranks must skip together, then abort naming rank 1's
   data; each rank writes the message it raised;
3. trains 8 steps straight, and 4 steps then a resume to 8 from the checkpoint (each rank restores its own RNG
   state from safetensors + JSON); rank 0 writes both loss lists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared test data

from test_training_scale import MICRO, ColourSets, micro_config

from m2m_pipeline.data.loader import collate_examples
from m2m_pipeline.training import train


def main(out: Path, steps: int) -> None:
    rank = int(__import__("os").environ.get("RANK", "0"))
    data = DataLoader(ColourSets(24), batch_size=2, shuffle=True, collate_fn=collate_examples, drop_last=True)
    result = train(MICRO, micro_config(steps=steps, checkpoint_every=0), data, out / "ddp", progress=False,
                   device="cpu")
    if rank == 0:
        (out / "ddp_losses.json").write_text(json.dumps(result.losses))
    # Round-robin split of a list: batch i goes to rank i % 2, so odd batches (rank 1's) are NaN.
    good = {"latents": torch.zeros(2, 2, 3, 8, 8), "key": ["good-a", "good-b"]}
    bad = {"latents": torch.full((2, 2, 3, 8, 8), float("nan")), "key": ["mis-000001.tar#bad-a", "bad-b"]}
    try:
        train(MICRO, micro_config(steps=5, max_bad_steps=3, checkpoint_every=0), [good, bad], out / "nan",
              progress=False, device="cpu")
        message = "no error"
    except FloatingPointError as e:
        message = str(e)
    (out / f"nan_rank{rank}.txt").write_text(message)
    tc = micro_config(steps=8, checkpoint_every=4)
    straight = train(MICRO, tc, data, out / "straight", progress=False, device="cpu")
    train(MICRO, micro_config(steps=4, checkpoint_every=4), data, out / "resumed", progress=False, device="cpu")
    resumed = train(MICRO, tc, data, out / "resumed", progress=False, device="cpu", resume_from="latest")
    if rank == 0:
        (out / "resume_losses.json").write_text(json.dumps({"straight": straight.losses, "resumed": resumed.losses}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
