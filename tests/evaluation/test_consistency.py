"""Oracle consistency and caption agreement: exact values on hand-made predictions, chance levels."""

from __future__ import annotations

import pytest
import torch

from m2m_pipeline.data.shapes import VOCABULARIES
from m2m_pipeline.evaluation.consistency import (
    attribute_consistency,
    caption_agreement,
    caption_attributes,
    chance_levels,
)


def _ids(**kw):
    return {name: kw.get(name, 0) for name in VOCABULARIES}


def test_chance_levels():
    c = chance_levels()
    assert c["colour"] == 1 / 8 and c["shape"] == 1 / 4 and c["content"] == 1 / 4
    assert c["style"] == pytest.approx((1 / 8 + 1 / 4 + 1 / 4) / 3)


def test_attribute_consistency_per_position():
    targets = {name: torch.tensor([1, 2]) for name in VOCABULARIES}                 # 2 sets
    predicted = {name: torch.tensor([[1, 0, 1], [2, 2, 0]]) for name in VOCABULARIES}  # 3 positions
    predicted["shape"] = torch.tensor([[0, 0, 0], [0, 0, 0]])                     # content always wrong
    out = attribute_consistency(predicted, targets)
    assert out["colour"].tolist() == [1.0, 0.5, 0.5]
    assert out["content"].tolist() == [0.0, 0.0, 0.0]
    assert out["style"].tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="must be \\(B, K\\)"):
        attribute_consistency({n: torch.zeros(2) for n in VOCABULARIES}, targets)


def test_random_predictions_sit_at_chance():
    g = torch.Generator().manual_seed(0)
    b, k = 4000, 2
    targets = {n: torch.randint(len(v), (b,), generator=g) for n, v in VOCABULARIES.items()}
    predicted = {n: torch.randint(len(v), (b, k), generator=g) for n, v in VOCABULARIES.items()}
    out = attribute_consistency(predicted, targets)
    for name, level in chance_levels().items():
        assert out[name].mean().item() == pytest.approx(level, abs=0.02)


def test_caption_agreement_counts_named_attributes_only():
    assert caption_attributes("a red square") == {"colour": 0, "shape": 1}
    predicted = {name: torch.tensor([[0, 0]]) for name in VOCABULARIES}
    predicted["shape"] = torch.tensor([[1, 0]])  # position 1 right shape, position 2 wrong
    agreement = caption_agreement(predicted, ["a red square"])  # names colour (red = 0) and shape (square = 1)
    assert agreement.tolist() == [1.0, 0.5]
    assert torch.isnan(caption_agreement(predicted, ["a photo of a dog"])).all()
