"""Oracle-based consistency on the shapes world: does a generated image keep its set's attributes?

Content = shape; style = colour, background pattern, background colour (the split the issue names).
Each is the fraction of generated images whose oracle-read attribute equals the set's true attribute;
style is the mean of its three attribute accuracies, so its chance level is the mean of theirs.
Caption agreement is the text-image analogue: of the attributes the caption names, the fraction the
oracle sees in the image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from m2m_pipeline.data.shapes import VOCABULARIES

CONTENT: tuple[str, ...] = ("shape",)
STYLE: tuple[str, ...] = ("colour", "background", "background_colour")
_WORDS = {word: (name, i) for name, vocab in VOCABULARIES.items() for i, word in enumerate(vocab)}


def chance_levels() -> dict[str, float]:
    """Accuracy of a guess uniform over each vocabulary: what an image unrelated to its set scores."""
    per = {name: 1.0 / len(vocab) for name, vocab in VOCABULARIES.items()}
    return {**per, "content": sum(per[a] for a in CONTENT) / len(CONTENT),
            "style": sum(per[a] for a in STYLE) / len(STYLE)}


def attribute_consistency(predicted: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """Per-position accuracies: predicted {attr: (B, K)} vs targets {attr: (B,)} -> {name: (K,)}.

    Names: each attribute, "content" and "style".
    """
    out: dict[str, torch.Tensor] = {}
    for name in VOCABULARIES:
        p, t = predicted[name], targets[name]
        if p.ndim != 2 or t.shape != p.shape[:1]:
            raise ValueError(f"{name}: predictions must be (B, K) and targets (B,), got {tuple(p.shape)} / "
                             f"{tuple(t.shape)}")
        out[name] = (p == t[:, None]).float().mean(dim=0)  # (K,)
    out["content"] = torch.stack([out[a] for a in CONTENT]).mean(0)
    out["style"] = torch.stack([out[a] for a in STYLE]).mean(0)
    return out


def caption_attributes(caption: str) -> dict[str, int]:
    """Attributes a caption names (any subset, unlike shapes.attributes_of, which wants all four)."""
    found: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in _WORDS:
            name, index = _WORDS[word]
            found.setdefault(name, index)  # first mention wins
    return found


def caption_agreement(predicted: Mapping[str, torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
    """Per position (K,): mean over sets of (named attributes the oracle sees) / (attributes named).

    Sets whose caption names no attribute are left out; NaN when none names any.
    """
    named = [caption_attributes(c) for c in captions]
    k = next(iter(predicted.values())).shape[1]
    scores = []
    for b, attrs in enumerate(named):
        if not attrs:
            continue
        hits = torch.stack([(predicted[name][b] == idx).float() for name, idx in attrs.items()])  # (A, K)
        scores.append(hits.mean(0))
    return torch.stack(scores).mean(0) if scores else torch.full((k,), float("nan"))
