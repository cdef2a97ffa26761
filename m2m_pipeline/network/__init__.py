"""The M2M network: architecture only (no objective, no sampler).

Names load lazily: `m2m_pipeline.network.config` (the presets a CLI offers) does not import diffusers.
"""

from m2m_pipeline.lazy import lazy_getattr

_EXPORTS = {"M2MConfig": "config", "PRESETS": "config", "ContextKV": "context",
            "ImageSetAttnProcessor": "image_set_attention", "M2MUNet": "unet"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
