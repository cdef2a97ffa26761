"""Can a DINO stand-in pretrained on the shapes world hand M2M-DINO the shape? (docs/model.md, "Learnability").

At paper scale M2M-DINO's context comes from a *pretrained* DINOv2, whose tokens carry object identity
linearly; the CPU demo's stand-in is a frozen random DINOv2 (`DinoEncoder.random`), whose tokens carry colour
and background linearly but shape only at 0.38 (chance 0.25, `m2m probe-features`). This experiment pretrains
the same small DINOv2 self-supervised on rendered shapes-world images (SimCLR's InfoNCE between two augmented
views: flips, rotation, resized crop — no labels, no set structure; hand-written because the loss is six lines
and transformers ships no DINO/SimCLR trainer) for a wall-clock budget, then probes its tokens with the same
linear probe as `m2m probe-features`, beside the random stand-in of the same shape.

    python benchmarks/dino_standin_pretraining.py --seconds 300 --patch-size 8 --threads 2

Prints the probe table; --out saves the pretrained encoder with save_pretrained (a DINOv2 folder that
`DinoEncoder.from_pretrained` loads). Not part of CI or make demo. The recipe that is shipped (colour
distortion, resumable, hash-pinned) is the library's, m2m_pipeline/pretrain/dino_standin.py.

    python benchmarks/dino_standin_pretraining.py --supervised-steps 400 --layers 2 --batch 256 --threads 1

trains the same network *supervised* on the shape labels instead (cross-entropy on its CLS token, no
augmentation) for that many steps: a ceiling for how fast this architecture can learn shape at all
(docs/model.md, "DINO stand-in pretraining"); the table adds CLS-only rows beside all tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


def augment(images: torch.Tensor) -> torch.Tensor:
    """One random view per image: flips, any rotation, resized crop (pose changes; colours untouched)."""
    import torchvision.transforms.v2 as T

    b, c, h, w = images.shape
    view = T.Compose([T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                      T.RandomRotation(180, interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomResizedCrop(h, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)])
    return torch.stack([view(x) for x in images])


def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B projections: row i's positive is its other view (i + B mod 2B)."""
    z = F.normalize(z, dim=1)
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))
    b = len(z) // 2
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--supervised-steps", type=int, default=0,
                    help="train on the shape labels for this many steps instead of SimCLR (a ceiling)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.supervised_steps:
        supervised_ceiling(args)
        return

    from tqdm import tqdm
    from transformers import Dinov2Config, Dinov2Model

    from m2m_pipeline.data.shapes import render_dataset
    from m2m_pipeline.encoders import DinoEncoder
    from m2m_pipeline.evaluation.probe import format_probe_table, probe_representations

    torch.manual_seed(0)
    images, _ = render_dataset(args.images, 32, seed=5, progress=True)  # the probe renders its own (seed 77)
    cfg = Dinov2Config(image_size=32, patch_size=args.patch_size, hidden_size=args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=4, intermediate_size=4 * args.hidden)
    random_vit, vit = Dinov2Model(cfg).eval(), Dinov2Model(cfg)
    head = nn.Sequential(nn.Linear(args.hidden, 256), nn.GELU(), nn.Linear(256, 128))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    encoder = DinoEncoder(vit, image_size=32)  # its preprocessing (ImageNet mean / std), as in the feature cache

    start, step = time.perf_counter(), 0
    bar = tqdm(desc="SimCLR pretraining", unit="step")
    while time.perf_counter() - start < args.seconds:
        x = images[torch.randint(len(images), (args.batch,))]
        pooled = vit(pixel_values=encoder.preprocess(torch.cat([augment(x), augment(x)]))).pooler_output
        loss = info_nce(head(pooled), temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    trained = DinoEncoder(vit.eval(), image_size=32)
    untrained = DinoEncoder(random_vit, image_size=32)
    results = probe_representations({"random stand-in (tokens)": untrained.encode,
                                     f"SimCLR {step} steps (tokens)": trained.encode}, 32)
    print(f"patch {args.patch_size}, {args.layers} layers x {args.hidden}, {step} steps in "
          f"{time.perf_counter() - start:.0f} s")
    print(format_probe_table(results))
    if args.out:
        vit.save_pretrained(args.out)


def supervised_ceiling(args: argparse.Namespace) -> None:
    """Shape-supervised training of the stand-in's architecture, probed like the SimCLR encoder."""
    from tqdm import tqdm

    from m2m_pipeline.data.shapes import VOCABULARIES, render_dataset
    from m2m_pipeline.encoders import DinoEncoder
    from m2m_pipeline.evaluation.probe import format_probe_table, probe_representations

    arch = dict(image_size=32, patch_size=args.patch_size, hidden_size=args.hidden, num_layers=args.layers)
    random_encoder, encoder = DinoEncoder.random(**arch), DinoEncoder.random(**arch)
    vit = encoder.model.train().requires_grad_(True)
    head = nn.Linear(args.hidden, len(VOCABULARIES["shape"]))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    torch.manual_seed(0)
    images, labels = render_dataset(args.images, 32, seed=5, progress=True)
    start = time.perf_counter()
    for _ in tqdm(range(args.supervised_steps), desc="shape-supervised", unit="step"):
        i = torch.randint(len(images), (args.batch,))
        loss = F.cross_entropy(head(vit(pixel_values=encoder.preprocess(images[i])).pooler_output), labels[i, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vit.eval()
    results = probe_representations({
        "random stand-in (tokens)": random_encoder.encode,
        "random stand-in (CLS)": lambda x: random_encoder.encode(x)[:, 0],
        f"shape-supervised {args.supervised_steps} steps (tokens)": encoder.encode,
        f"shape-supervised {args.supervised_steps} steps (CLS)": lambda x: encoder.encode(x)[:, 0]}, 32)
    print(f"patch {args.patch_size}, {args.layers} layers x {args.hidden}, {args.supervised_steps} supervised steps "
          f"in {time.perf_counter() - start:.0f} s, last training loss {loss.item():.3f}")
    print(format_probe_table(results))


if __name__ == "__main__":
    main()
