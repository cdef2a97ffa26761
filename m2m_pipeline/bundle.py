"""A trained checkpoint and the frozen encoders it was trained with, loaded together (docs/orchestration.md).

Every front-end that samples from or fine-tunes a checkpoint (`m2m generate / evaluate / finetune`, the
evaluation and task assets, the ablation) loads it here, so the encoders come from what the checkpoint records
(`M2MUNet.encoder_spec`, written by training from the feature manifests) and never from a guess: a demo cache
built with another MIS seed (`settings.mis.seed`) has another random DINO stand-in, and conditioning on it would be silently wrong.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from m2m_pipeline.encoders import Autoencoder, DinoEncoder, EncoderSpec
from m2m_pipeline.network import M2MUNet


@dataclass
class Bundle:
    net: M2MUNet
    autoencoder: Autoencoder
    dino: DinoEncoder | None           # M2M-DINO only
    spec: EncoderSpec

    @property
    def context_encoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What generate() encodes each context latent with: None (M2M-Self attends to the latents) or, for
        M2M-DINO, the DINO tokens of the decoded image."""
        if self.dino is None:
            return None
        dino, autoencoder = self.dino, self.autoencoder
        return lambda z: dino.encode(autoencoder.decode(z))

    def check_cache(self, shards: Sequence[str | os.PathLike]) -> None:
        """Refuse feature shards built with other encoders than this checkpoint was trained on."""
        from m2m_pipeline.data.features import cache_encoder_spec

        cached = cache_encoder_spec(list(shards))
        problem = None if cached is None else self.spec.mismatch(cached, self.net.config.variant)
        if problem:
            raise ValueError(f"feature shards {os.fspath(shards[0])}...: built with other encoders than the "
                             f"checkpoint ({problem}); rebuild them with the checkpoint's encoders")


def checkpoint_encoder_spec(net: M2MUNet, where: str = "checkpoint", vae: str | os.PathLike | None = None,
                            dino: str | os.PathLike | None = None) -> EncoderSpec:
    """The encoders a network names; networks saved before they recorded them get the old rule, with a warning."""
    if net.encoder_spec is not None:
        return EncoderSpec.from_dict(net.encoder_spec, f"{where}: config.json field 'encoder_spec'")
    return _legacy_spec(net, where, vae, dino)


def _legacy_spec(net: M2MUNet, where: str, vae: str | os.PathLike | None,
                 dino: str | os.PathLike | None) -> EncoderSpec:
    """The rule of before: the CPU preset of the image size (its seed-0 random DINO stand-in), or the folders
    given."""
    from m2m_pipeline.data.config import get_preset
    from m2m_pipeline.data.features import encoder_spec

    cfg = net.config
    preset = get_preset("tiny" if cfg.image_size <= 16 else "demo")
    if cfg.variant == "dino" and dino is None:
        warnings.warn(f"{where} does not record its encoders (written before they were recorded); assuming the "
                      f"{preset.name} preset's random DINO stand-in (seed {preset.seed})", stacklevel=3)
    return encoder_spec(preset.replace(autoencoder=cfg.autoencoder, autoencoder_path=None if vae is None else
                                       os.fspath(vae), dino_path=None if dino is None else os.fspath(dino)))


def context_dino(net: M2MUNet, spec: EncoderSpec, dino: str | os.PathLike | None = None) -> DinoEncoder | None:
    """The DINO encoder an M2M-DINO network attends through (None for M2M-Self); a width mismatch is refused
    here, not as a shape error deep inside attention."""
    if net.config.variant != "dino":
        return None
    encoder = spec.build_dino(dino)
    if encoder.hidden_size != net.config.dino_dim:
        raise ValueError(f"the checkpoint expects DINO width {net.config.dino_dim}, the DINO encoder "
                         f"({dino or spec.describe()}) gives {encoder.hidden_size}; pass a matching DINOv2 (--dino)")
    return encoder


def load_bundle(checkpoint: str | os.PathLike, vae: str | os.PathLike | None = None,
                dino: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Network (inference weights, eval mode), autoencoder and context encoder of a checkpoint.

    vae / dino: where the recorded weights are on this machine (a moved checkout, another cluster); the
    autoencoder's weights must hash to the recorded ones. Without them the recorded locations are used.
    """
    net = M2MUNet.from_pretrained(checkpoint, map_location=device).eval()
    spec = checkpoint_encoder_spec(net, os.fspath(checkpoint), vae, dino)
    autoencoder = spec.build_autoencoder(vae)
    encoder = context_dino(net, spec, dino)
    for module in (autoencoder, encoder):
        if isinstance(module, torch.nn.Module):
            module.to(device)
    return Bundle(net, autoencoder, encoder, spec)
