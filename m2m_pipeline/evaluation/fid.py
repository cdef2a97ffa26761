"""FID (clean-fid) and Inception Score (torchmetrics) over a choice of feature network.

Two feature networks, one interface (uint8-range images (B, 3, S, S) -> features (B, D)):
- "inception-v3" in clean-fid's "clean" mode (PIL bicubic resize to 299 px, the StyleGAN2 torchscript
  Inception, pool3 2048-d): the paper-scale setting. Its weights are read from a local file only.
- "oracle": the shapes-world AttributeOracle's pooled features (D = 128 by default), resized with the same
  clean-fid PIL bicubic resizer to the oracle's size: the offline setting. Its numbers are comparable only
  between runs that used the same oracle (its config + weights hash are in every report).

Images go through clean-fid's pipeline either way: tensors are first quantized to uint8 exactly as a PNG
write would, so a tensor and the same images saved to a folder give identical features.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m2m_pipeline.io import sha256_file
from m2m_pipeline.weights import WeightsNotFoundError

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's name for the StyleGAN2-ADA torchscript Inception
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "M2M_INCEPTION_WEIGHTS"       # a file or a folder holding INCEPTION_FILE
CLEANFID_DEFAULT_DIR = Path("/tmp")           # where clean-fid itself looks on Linux (features.feature_extractor)


class FeatureNetwork:
    """A clean-fid feature extractor plus its resizer and a provenance record."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], fn_resize: Callable[[np.ndarray], np.ndarray],
                 info: dict[str, Any], classifier: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.name = name
        self.fn = fn                  # (B, 3, S, S) float in [0, 255] -> (B, D)
        self.fn_resize = fn_resize    # clean-fid resizer: (H, W, 3) uint8 -> (S, S, 3) float32 in [0, 255]
        self.info = info              # what a report records: network, weights hash, resize, dims
        self.classifier = classifier  # (B, 3, S, S) in [0, 255] -> class logits, for the Inception Score

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)



def oracle_feature_network(oracle) -> FeatureNetwork:
    """The offline FID space: AttributeOracle pooled features; IS over its joint attribute distribution."""
    from cleanfid.resize import make_resizer

    s = oracle.config.image_size

    def fn(x: torch.Tensor) -> torch.Tensor:
        return oracle.features(x / 127.5 - 1.0)

    def classifier(x: torch.Tensor) -> torch.Tensor:
        # Joint log-probabilities over all 4 x 8 x 4 x 4 = 512 attribute combinations: the heads are
        # independent softmaxes, so log p(y) is the sum of the heads' log-probabilities.
        logp = [lg.log_softmax(-1) for lg in oracle.logits(x / 127.5 - 1.0).values()]
        joint = logp[0]
        for lp in logp[1:]:
            joint = (joint[:, :, None] + lp[:, None, :]).flatten(1)
        return joint  # (B, 512)

    info = {"network": "attribute-oracle", "mode": "clean-fid pipeline, custom feature extractor",
            "feature_dim": oracle.config.feature_dim, "image_size": s,
            "resize": f"clean-fid PIL bicubic to {s}x{s} (no quantization after resize)",
            "oracle_config": oracle.config.to_dict(), "oracle_weights_sha256": _state_hash(oracle),
            "is_classes": "joint softmax over the 4 attribute heads (512 classes)"}
    return FeatureNetwork("oracle", fn, make_resizer("PIL", False, "bicubic", (s, s)), info, classifier)


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local torchscript Inception file; never downloads (clean-fid would fetch it into /tmp)."""
    candidates = []
    for source in (path, os.environ.get(INCEPTION_ENV), CLEANFID_DEFAULT_DIR):
        if source:
            p = Path(source).expanduser()
            candidates.append(p / INCEPTION_FILE if p.is_dir() or p.suffix != ".pt" else p)
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsNotFoundError(
        f"clean-fid Inception weights not found; looked for {', '.join(str(c) for c in candidates)}. This project "
        f"never downloads weights: fetch {INCEPTION_URL} yourself and pass its path (or set {INCEPTION_ENV}), "
        f"or use the oracle feature network offline."
    )


def inception_feature_network(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
                              ) -> FeatureNetwork:
    """clean-fid's "clean" mode: PIL bicubic resize to 299, torchscript Inception pool3 (2048-d)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    file = resolve_inception_weights(weights)
    if file.name != INCEPTION_FILE:
        raise WeightsNotFoundError(f"{file}: clean-fid loads the Inception file by its name; rename it to {INCEPTION_FILE}")
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).cpu()

    @torch.no_grad()
    def classifier(x: torch.Tensor) -> torch.Tensor:
        # The StyleGAN2-ADA torchscript returns softmax probabilities over 1008 classes (no output bias, as
        # its IS metric does); their log is a valid logit vector for torchmetrics' InceptionScore.
        probs = model.base(x.to(device), no_output_bias=True)
        return probs.clamp_min(1e-12).log().cpu()

    info = {"network": "inception-v3 (clean-fid torchscript, pool3)", "feature_dim": 2048, "mode": "clean",
            "resize": "clean-fid PIL bicubic to 299x299", "weights": str(file), "weights_sha256": sha256_file(file),
            "is_classes": "Inception 1008-way softmax, no output bias"}
    return FeatureNetwork("inception", fn, build_resizer("clean"), info, classifier)


# ---------------------------------------------------------------------- features
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as a PNG write would."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _resized_batch(images: np.ndarray, network: FeatureNetwork) -> torch.Tensor:
    """clean-fid's per-image path (utils.ResizeDataset.__getitem__) on in-memory uint8 images."""
    out = []
    for img in images:
        r = network.fn_resize(img)
        out.append(torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(out)  # (B, 3, S, S) in [0, 255]


def _batches(images: torch.Tensor | np.ndarray, network: FeatureNetwork, batch_size: int):
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    for i in range(0, len(arr), batch_size):
        yield _resized_batch(arr[i : i + batch_size], network)


@torch.no_grad()
def extract_features(images: torch.Tensor | str | os.PathLike, network: FeatureNetwork, batch_size: int = 64,
                     progress: bool = False) -> np.ndarray:
    """Features (N, D) of a tensor (N, 3, H, W) in [-1, 1] or of a folder of image files (via clean-fid)."""
    if isinstance(images, (str, os.PathLike)):
        from cleanfid.fid import get_folder_features

        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"FID input folder {folder} does not exist")
        feats = get_folder_features(str(folder), model=network, num_workers=0, batch_size=batch_size,
                                    device=torch.device("cpu"), mode="clean", custom_fn_resize=network.fn_resize,
                                    description=f"FID features {folder.name}: ", verbose=progress)
        if len(feats) == 0:
            raise ValueError(f"FID input folder {folder} holds no images")
        return feats
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return torch.cat([network(b) for b in _batches(images, network, batch_size)]).numpy()


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """clean-fid's Frechet distance of the two feature sets' Gaussians (needs >= 2 samples each).

    With fewer images than feature dimensions the covariances are singular and scipy warns on every call;
    the warning is silenced because reports carry the real-vs-real FID at the same N as the floor to read
    such values against.
    """
    import warnings

    from cleanfid.fid import fid_from_feats
    from scipy.linalg import LinAlgWarning

    for name, f in (("first", feats1), ("second", feats2)):
        if len(f) < 2:
            raise ValueError(f"FID needs at least 2 images per side; the {name} has {len(f)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(fid_from_feats(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)))


def compute_fid(images1: torch.Tensor | str | os.PathLike, images2: torch.Tensor | str | os.PathLike,
                network: FeatureNetwork, batch_size: int = 64) -> float:
    return fid_from_features(extract_features(images1, network, batch_size), extract_features(images2, network, batch_size))


# ---------------------------------------------------------------------- Inception Score
@torch.no_grad()
def extract_logits(images: torch.Tensor, network: FeatureNetwork, batch_size: int = 64) -> np.ndarray:
    """Class logits (N, classes) of the feature network's classifier, through the same resizer as the features."""
    if network.classifier is None:
        raise ValueError(f"feature network {network.name!r} has no classifier for the Inception Score")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"IS images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return torch.cat([network.classifier(b).float().cpu() for b in _batches(images, network, batch_size)]).numpy()


@torch.no_grad()
def extract_features_and_logits(images: torch.Tensor, network: FeatureNetwork, batch_size: int = 64
                                ) -> tuple[np.ndarray, np.ndarray]:
    """`extract_features` and `extract_logits` of the same images with one resize per image: the paper protocol
    needs both for every generated image, and the PIL resize to 299 px is a large share of the cost on a CPU."""
    if network.classifier is None:
        raise ValueError(f"feature network {network.name!r} has no classifier for the Inception Score")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID / IS images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    feats, logits = [], []
    for b in _batches(images, network, batch_size):
        feats.append(network(b))
        logits.append(network.classifier(b).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@torch.no_grad()
def inception_score_from_logits(logits: np.ndarray | torch.Tensor, splits: int = 1, seed: int = 0) -> float:
    """torchmetrics' InceptionScore over precomputed class logits (N, classes); mean over `splits`.

    torchmetrics shuffles before splitting; the shuffle runs under a fixed seed so the score is reproducible.
    The paper protocol computes the logits batch by batch while it generates (protocol.run_paper_protocol),
    so IS is computed here from them rather than from images held in memory.
    """
    import warnings

    from torchmetrics.image.inception import InceptionScore

    x = torch.as_tensor(logits, dtype=torch.float32)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"IS logits must be (N >= 1, classes), got {tuple(x.shape)}")
    with warnings.catch_warnings():
        # "will save all extracted features in buffer"; std over a single split is undefined (unused here).
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=nn.Identity(), splits=splits)
        metric.update(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, _ = metric.compute()
    return float(mean)


def inception_score(images: torch.Tensor, network: FeatureNetwork, splits: int = 1, batch_size: int = 64,
                    seed: int = 0) -> float:
    """torchmetrics' InceptionScore with the feature network's classifier; mean over `splits`."""
    return inception_score_from_logits(extract_logits(images, network, batch_size), splits, seed)
