"""Task metrics (docs/tasks.md): PSNR / SSIM / optional LPIPS against true images, and the baselines to beat.

Images are float tensors in [-1, 1], (B, 3, H, W) or (B, K, 3, H, W); every metric returns one value
per image (B,) or (B, K), so callers can report per-position mean ± std (docs/evaluation.md "Protocol").
PSNR and SSIM are torchmetrics' (Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, as Wang
et al. 2004), computed on images mapped to [0, 1] with data range 1: SSIM's constants assume a data
range starting at 0, and [0, 1] is the scale other NVS papers report. SSIM averages the SSIM map over
the pixels whose window lies inside the image, as Wang's reference code and scikit-image do;
torchmetrics' own mean also counts the reflect-padded border, which at 32 px is half the image.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from m2m_pipeline.tasks.errors import MetricWeightsNotFoundError

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE = 0) is +inf; capped so means and stds stay finite
SSIM_BORDER = 5      # half the 11 x 11 window: pixels nearer the edge see reflected padding, not the image
LpipsNet = Literal["alex", "vgg", "squeeze"]
_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _flatten_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(..., 3, H, W) pairs -> (M, 3, H, W) in [0, 1] float32, plus the leading shape to restore."""
    if pred.shape != target.shape or pred.ndim < 4 or pred.shape[-3] != 3:
        raise ValueError(f"pred and target must both be (..., 3, H, W) with equal shapes, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    lead = tuple(pred.shape[:-3])
    return _to_unit_range(pred), _to_unit_range(target), lead


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().reshape(-1, *x.shape[-3:]) + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (images in [-1, 1]); identical images give PSNR_CAP_DB."""
    p, t, lead = _flatten_pair(pred, target)
    values = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB).reshape(lead)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (images in [-1, 1], more than 10 px a side); 1 for identical images."""
    p, t, lead = _flatten_pair(pred, target)
    if min(p.shape[-2:]) <= 2 * SSIM_BORDER:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_BORDER} px a side, got {tuple(p.shape[-2:])}")
    _, ssim_map = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none",
                                                      return_full_image=True)  # (M, 3, H, W)
    inner = ssim_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
    return inner.mean(dim=(1, 2, 3)).reshape(lead)


def lpips_weights_path(net: LpipsNet = "alex") -> Path:
    """Where torchvision keeps the ImageNet backbone LPIPS needs ($TORCH_HOME/hub/checkpoints/...).
    The LPIPS linear heads ship inside torchmetrics; only this file can be missing."""
    import torchvision  # deferred: only LPIPS needs it

    weights = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def lpips_available(net: LpipsNet = "alex") -> bool:
    return lpips_weights_path(net).is_file()


@lru_cache(maxsize=3)
def _lpips_net(net: LpipsNet) -> torch.nn.Module:
    from torchmetrics.functional.image.lpips import _NoTrainLpips  # the module torchmetrics' own function builds

    return _NoTrainLpips(net=net).eval()


def lpips(pred: torch.Tensor, target: torch.Tensor, net: LpipsNet = "alex") -> torch.Tensor:
    """Per-image LPIPS (lower is closer). Runs only with local weights: nothing is downloaded.

    Raises MetricWeightsNotFoundError naming the file to place when the backbone is missing.
    """
    path = lpips_weights_path(net)
    if not path.is_file():
        raise MetricWeightsNotFoundError(
            f"LPIPS ({net}) needs the torchvision ImageNet backbone at {path}; nothing is downloaded here. "
            f"Copy that file there (or set TORCH_HOME), or report PSNR and SSIM only.")
    p, t, lead = _flatten_pair(pred, target)
    module = _lpips_net(net).to(p.device)
    with torch.no_grad():
        values = module(p, t, normalize=True)  # normalize=True: inputs are in [0, 1]
    return values.reshape(lead)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, with_lpips: bool = False) -> dict[str, torch.Tensor]:
    """{"psnr", "ssim"[, "lpips"]}, each per image with the leading shape of the inputs."""
    metrics = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if with_lpips:
        metrics["lpips"] = lpips(pred, target)
    return metrics


def per_position_summary(values: torch.Tensor) -> dict[str, float]:
    """(B, K) values for K generated positions -> mean ± std over the K per-position means
    (docs/evaluation.md "Protocol"), plus the plain mean over all images. NaNs (failed checks) are ignored."""
    position_means = values.double().nanmean(dim=0)  # (K,)
    return {"mean": float(values.double().nanmean()),
            "position_mean": float(position_means.mean()),
            "position_std": float(position_means.std(correction=0)) if len(position_means) > 1 else 0.0}


# Baselines: produce predictions in the shape of the targets, so they go through the same metrics.

def copy_input_view(context: torch.Tensor, num_targets: int, context_cond: torch.Tensor | None = None,
                    target_cond: torch.Tensor | None = None) -> torch.Tensor:
    """NVS baseline: for each target, a copy of an input view.

    context (B, n_c, 3, H, W) -> (B, K, 3, H, W). With camera conditions (B, n_c, 12) and (B, K, 12)
    (relative extrinsics), each target copies the context view whose camera is nearest (Euclidean on
    the flattened 3x4 pose): the strongest copy baseline. Without them, the first (reference) view.
    """
    b, n_c = context.shape[:2]
    if context_cond is None or target_cond is None:
        index = torch.zeros(b, num_targets, dtype=torch.long, device=context.device)
    else:
        if context_cond.shape[:2] != (b, n_c) or target_cond.shape[:2] != (b, num_targets):
            raise ValueError(f"conditions {tuple(context_cond.shape)} / {tuple(target_cond.shape)} do not match "
                             f"{n_c} context views and {num_targets} targets")
        index = torch.cdist(target_cond.double(), context_cond.double()).argmin(dim=-1)  # (B, K)
    return context[torch.arange(b, device=context.device)[:, None], index]


def repeat_last_step(context: torch.Tensor, num_targets: int) -> torch.Tensor:
    """Procedure baseline: every future step is predicted as the last seen step. (B, n_c, ...) -> (B, K, ...)."""
    return context[:, -1:].expand(-1, num_targets, *context.shape[2:]).clone()
