"""The M2M network: architecture only (no objective, no sampler)."""

from m2m_pipeline.network.config import PRESETS, M2MConfig
from m2m_pipeline.network.context import ContextKV
from m2m_pipeline.network.image_set_attention import ImageSetAttnProcessor
from m2m_pipeline.network.unet import M2MUNet

__all__ = ["M2MConfig", "M2MUNet", "ContextKV", "ImageSetAttnProcessor", "PRESETS"]
