import math
from itertools import pairwise

import pytest
import torch

from m2m_pipeline.tasks import MetricWeightsNotFoundError
from m2m_pipeline.tasks.metrics import (
    PSNR_CAP_DB,
    copy_input_view,
    image_metrics,
    lpips,
    per_position_summary,
    psnr,
    repeat_last_step,
    ssim,
)


def _images(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled noise): SSIM behaves as on natural images, not on white noise.
    small = torch.rand(*shape[:-2], shape[-2] // 4, shape[-1] // 4, generator=g) * 2 - 1
    flat = small.reshape(-1, *small.shape[-3:])
    return torch.nn.functional.interpolate(flat, size=shape[-2:], mode="bilinear").reshape(shape)


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_identical_images():
    x = _images(2, 3, 3, 32, 32)
    assert torch.all(psnr(x, x) == PSNR_CAP_DB)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 3))


def test_noisier_is_worse():
    x = _images(4, 3, 32, 32)
    values = [image_metrics(_noisy(x, s), x) for s in (0.02, 0.1, 0.4)]
    for better, worse in pairwise(values):
        assert (better["psnr"] > worse["psnr"]).all() and (better["ssim"] > worse["ssim"]).all()


def test_psnr_known_value():
    x = torch.zeros(1, 3, 16, 16)
    y = x + 0.2  # 0.1 in [0, 1] units: MSE 0.01 -> 20 dB
    assert psnr(y, x).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    x = _images(2, 3, 32, 32)
    y = _noisy(x, 0.15)
    ours = ssim(y, x)
    for i in range(2):
        theirs = skimage_metrics.structural_similarity(
            ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy(), ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
            channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-4)


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))


def test_lpips_without_weights_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MetricWeightsNotFoundError, match=r"alexnet-.*\.pth; nothing is downloaded"):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))


def test_copy_input_view_baseline():
    context = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3, 1, 1, 1).expand(2, 3, 3, 4, 4)
    first = copy_input_view(context, num_targets=2)
    assert first.shape == (2, 2, 3, 4, 4) and torch.equal(first, context[:, :1].expand(-1, 2, -1, -1, -1))
    context_cond = torch.tensor([[0.0], [1.0], [2.0]]).expand(2, 3, 1) * torch.ones(2, 3, 12)
    target_cond = torch.full((2, 2, 12), 1.9)
    target_cond[1, 0] = 0.2
    nearest = copy_input_view(context, 2, context_cond, target_cond)
    assert nearest[0, 0, 0, 0, 0] == 2 and nearest[1, 0, 0, 0, 0] == 3 and nearest[1, 1, 0, 0, 0] == 5


def test_repeat_last_step_baseline():
    context = torch.randn(2, 4, 3, 8, 8)
    pred = repeat_last_step(context, 3)
    assert pred.shape == (2, 3, 3, 8, 8)
    assert all(torch.equal(pred[:, k], context[:, -1]) for k in range(3))


def test_per_position_summary():
    values = torch.tensor([[1.0, 3.0], [3.0, float("nan")]])
    summary = per_position_summary(values)
    assert summary["position_mean"] == pytest.approx(2.5) and summary["position_std"] == pytest.approx(0.5)
    assert math.isclose(summary["mean"], 7 / 3)
