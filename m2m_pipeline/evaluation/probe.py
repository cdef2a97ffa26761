"""Linear probes: how much of each judged attribute a frozen representation carries (docs/model.md,
"Learnability"). A conditioning signal that a linear classifier cannot read an attribute from is a weak
signal for Image-Set Attention too, whose keys and values are linear maps of it.

    m2m probe-features --preset demo --autoencoder models/demo/autoencoder

Held-out accuracy of a multinomial logistic regression (full-batch Adam, L2 1e-4) per attribute on
standardised features of rendered shapes-world images with uniformly random attributes; chance is
1 / vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from m2m_pipeline.data.shapes import VOCABULARIES, render_dataset

Encode = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) in [-1, 1] -> features (B, ...)


def encode_all(encode: Encode, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encode(images[i : i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300, lr: float = 1e-2, l2: float = 1e-4, seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier trained on (train_x, train_y); features standardised on train."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def probe_representations(encoders: dict[str, Encode], image_size: int, train_images: int = 5000,
                          heldout_images: int = 1000, seed: int = 77) -> dict[str, dict[str, float]]:
    """{representation: {attribute: held-out linear-probe accuracy}} on the same rendered images."""
    if train_images < 1 or heldout_images < 1:
        raise ValueError("probe_representations needs at least one training and one held-out image")
    images, labels = render_dataset(train_images + heldout_images, image_size, seed=seed)
    out = {}
    for name, encode in encoders.items():
        feats = encode_all(encode, images)
        out[name] = {attr: linear_probe(feats[:train_images], labels[:train_images, j], feats[train_images:],
                                        labels[train_images:, j])
                     for j, attr in enumerate(VOCABULARIES)}
    return out


def chance_levels() -> dict[str, float]:
    return {attr: 1.0 / len(vocab) for attr, vocab in VOCABULARIES.items()}


def format_probe_table(results: dict[str, dict[str, float]]) -> str:
    attrs = list(VOCABULARIES)
    chance = chance_levels()
    lines = ["| representation | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|",
             "| chance | " + " | ".join(f"{chance[a]:.3f}" for a in attrs) + " |"]
    for name, accs in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{accs[a]:.3f}" for a in attrs) + " |")
    return "\n".join(lines)
