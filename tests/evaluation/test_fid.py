"""FID / IS sanity (issue 6 "must show"): self ~ 0, same-distribution draws << different-attribute draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_pipeline.evaluation import fid as fid_module
from m2m_pipeline.evaluation.fid import (
    INCEPTION_FILE,
    compute_fid,
    extract_features,
    fid_from_features,
    inception_feature_network,
    inception_score,
    oracle_feature_network,
    to_uint8,
)
from m2m_pipeline.evaluation.sanity import draw_shapes as draw
from m2m_pipeline.weights import WeightsNotFoundError


@pytest.fixture(scope="module")
def network(quick_oracle):
    return oracle_feature_network(quick_oracle)


def test_fid_of_a_folder_against_itself_is_zero(tmp_path, network):
    images = draw(64, 0, [0, 1, 2, 3])
    for i, a in enumerate(to_uint8(images)):
        Image.fromarray(a).save(tmp_path / f"{i:03d}.png")
    assert abs(compute_fid(tmp_path, tmp_path, network)) < 1e-3  # sqrtm round-off; same-distribution FID is ~1-10
    # The tensor path quantizes like a PNG write: identical features to the folder path.
    assert np.allclose(extract_features(images, network), extract_features(tmp_path, network), atol=1e-5)


def test_same_distribution_draws_score_far_lower_than_different_attributes(network):
    warm_a, warm_b = draw(200, 1, [0, 3, 6]), draw(200, 2, [0, 3, 6])   # red, yellow, orange
    cold = draw(200, 3, [1, 2, 5])                                        # green, blue, cyan
    fa, fb, fc = (extract_features(x, network) for x in (warm_a, warm_b, cold))
    same, different = fid_from_features(fa, fb), fid_from_features(fa, fc)
    assert same < different / 5, (same, different)


def test_inception_score_single_class_vs_diverse(network):
    one = draw(64, 4, [0], fixed={"shape": 0, "background": 0, "background_colour": 0})
    diverse = draw(64, 5, list(range(8)))
    assert inception_score(one, network) < 1.5  # every image the same class: IS ~ 1
    assert inception_score(diverse, network) > 3 * inception_score(one, network)


def test_fid_rejects_bad_input(network, tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_features(tmp_path / "missing", network)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        extract_features(torch.zeros(2, 1, 16, 16), network)


def test_missing_inception_weights_fail_clearly_without_download(monkeypatch, tmp_path):
    monkeypatch.setattr(fid_module, "CLEANFID_DEFAULT_DIR", tmp_path / "cleanfid-cache")
    monkeypatch.delenv(fid_module.INCEPTION_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(WeightsNotFoundError, match=INCEPTION_FILE):
        inception_feature_network(tmp_path / "weights")
