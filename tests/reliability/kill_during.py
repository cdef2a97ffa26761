"""`python -m reliability.kill_during STAGE ROOT THREADS` (from tests/): run one pipeline stage on the tiny build at
ROOT and SIGKILL this very process in the middle of its writing (tests/reliability/test_sigkill.py):

- captions:   after 5 rows of the caption table
- mis:        at the 5th (last) image set of the train split, i.e. inside the second MIS shard (4 sets per shard)
- features:   while encoding the second feature shard
- checkpoint: while saving checkpoint-0000004, after its tensors and before its train_state.json
- step:       in training step 3, between checkpoint-0000002 and checkpoint-0000004
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(stage: str, root: Path) -> None:
    from m2m_pipeline.data import get_preset

    cfg = get_preset("tiny")
    if stage == "captions":
        from m2m_pipeline.data import captions

        real = captions.iter_filtered_captions

        def dying(*args, **kwargs):
            for i, record in enumerate(real(*args, **kwargs)):
                if i == 5:
                    die()
                yield record

        captions.iter_filtered_captions = dying
        captions.filter_captions(root / "captions.tsv", root / "captions.jsonl", cfg, progress=False)
    elif stage == "mis":
        from m2m_pipeline.data import generate_mis, make_generator

        generator, made = make_generator(cfg), []
        real = generator.generate

        def dying(captions, indices=None):
            for image_set in real(captions, indices):
                made.append(image_set)
                if len(made) == 5:
                    die()
                yield image_set

        generator.generate = dying
        generate_mis(root / "captions.jsonl", root / "mis" / "train", generator, cfg, progress=False)
    elif stage == "features":
        from m2m_pipeline.data import features

        real, calls = features.encode_images, []

        def dying(encoder, samples, batch_size, bar):
            calls.append(1)
            if len(calls) == 3:  # DINO + autoencoder of shard 0, then shard 1
                die()
            return real(encoder, samples, batch_size, bar)

        features.encode_images = dying
        features.build_feature_shards(root / "mis" / "train", root / "features" / "train", cfg, device="cpu",
                                      progress=False)
    elif stage in ("checkpoint", "step"):
        from test_training_scale import MICRO, list_data, micro_config

        from m2m_pipeline import checkpointing
        from m2m_pipeline.training import train

        real = checkpointing.write_state

        def dying(directory, state):
            if state.get("step") == 4 and state.get("resumable"):
                die()
            real(directory, state)

        if stage == "checkpoint":
            checkpointing.write_state = dying
        train(MICRO, micro_config(steps=6, checkpoint_every=2), list_data(), root / "run", progress=False,
              device="cpu", on_metrics=(lambda metrics, step: step == 3 and die()) if stage == "step" else None)
    raise SystemExit(f"stage {stage!r} ended without being killed")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(sys.argv[3]))  # the parent's count: same reduction order, same bits
    main(sys.argv[1], Path(sys.argv[2]))
