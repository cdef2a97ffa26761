"""CLIP scores with a tiny random open_clip model (no downloads): self-score 100, ranges, local-only weights."""

from __future__ import annotations

import pytest
import torch

from m2m_pipeline.evaluation.clip_score import ClipScorer
from m2m_pipeline.weights import WeightsNotFoundError


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return ClipScorer(f"local-dir:{tiny_clip_dir}")


def test_image_image_self_score_is_100(scorer):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    self_score = scorer.image_image(images, images[:, None])  # each image against itself
    assert torch.allclose(self_score, torch.full((3,), 100.0), atol=1e-3)
    other = scorer.image_image(images, images.roll(1, dims=0)[:, None])
    assert (other < 100.0 - 1e-3).all()  # a different image scores lower


def test_text_image_in_range_and_shapes(scorer):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    scores = scorer.text_image(images, ["a red circle on a plain black background", "a blue square"])
    assert scores.shape == (2,)
    assert ((scores >= -100) & (scores <= 100)).all()
    emb = scorer.image_embeddings(torch.rand(2, 4, 3, 16, 16) * 2 - 1)
    assert emb.shape == (2, 4, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.text_image(images, ["one"])


def test_clamp_option_and_provenance(tiny_clip_dir):
    clamped = ClipScorer(f"local-dir:{tiny_clip_dir}", clamp_at_zero=True)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    assert (clamped.image_image(images, -images[:, None]) >= 0).all()
    info = clamped.info
    assert info["scale"] == "100 x cosine" and info["clamped_at_zero"] is True
    assert len(info["weights_sha256"]) == 16  # hash of the local checkpoint file


def test_pretrained_tag_is_refused_offline():
    with pytest.raises(WeightsNotFoundError, match="not a local file"):
        ClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        ClipScorer("local-dir:/nonexistent/clip")
