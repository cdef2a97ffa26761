"""Parameter counts of a preset, built on the meta device (no weights, no memory): `python -m
m2m_pipeline.network.inspect --preset paper` prints SD's U-Net, its text cross-attention, the Image-Set
Attention that replaces it, and the M2M total, for both variants."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from m2m_pipeline.network.config import PRESETS, M2MConfig
from m2m_pipeline.network.unet import M2MUNet


@dataclass(frozen=True)
class ParameterCount:
    sd_unet: int                      # the SD U-Net of the preset (text cross-attention included)
    text_cross_attention: int         # its attn2 layers, which M2M drops
    image_set_attention: int          # the attn2 layers M2M puts there (K/V, null token, task projections)
    other_new: int                    # task embedder etc. outside the U-Net (0 without a task condition)
    m2m: int                          # total of M2MUNet

    @property
    def balance_ok(self) -> bool:
        return self.m2m == self.sd_unet - self.text_cross_attention + self.image_set_attention + self.other_new


def count_parameters(config: M2MConfig) -> ParameterCount:
    with torch.device("meta"):
        sd = UNet2DConditionModel(**config.unet_kwargs())
        net = M2MUNet(config)
    sd_total = sum(p.numel() for p in sd.parameters())
    text = sum(p.numel() for k, p in sd.named_parameters() if ".attn2." in k)
    isa = sum(p.numel() for k, p in net.unet.named_parameters() if ".attn2." in k)
    other = sum(p.numel() for k, p in net.named_parameters() if not k.startswith("unet."))
    return ParameterCount(sd_total, text, isa, other, sum(p.numel() for p in net.parameters()))


def report(preset: str) -> str:
    lines = [f"preset {preset} (meta device: no weights loaded)"]
    for variant in ("self", "dino"):
        c = count_parameters(M2MConfig.preset(preset, variant))
        if variant == "self":
            lines.append(f"  SD U-Net                          {c.sd_unet:>14,}")
            lines.append(f"  - text cross-attention            {c.text_cross_attention:>14,}")
        lines.append(f"  M2M-{variant.capitalize():<5} + Image-Set Attention  {c.image_set_attention:>14,}"
                     f"  = {c.m2m:>14,}" + (f" (+{c.other_new:,} task)" if c.other_new else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    print(report(parser.parse_args(argv).preset))


if __name__ == "__main__":
    main()
