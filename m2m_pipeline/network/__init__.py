"""The M2M network: architecture only (no objective, no sampler).

Names load lazily: `m2m_pipeline.network.config` (the presets a CLI offers) does not import diffusers.
"""

_EXPORTS = {"M2MConfig": "config", "PRESETS": "config", "ContextKV": "context",
            "ImageSetAttnProcessor": "image_set_attention", "M2MUNet": "unet"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"m2m_pipeline.network.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'm2m_pipeline.network' has no attribute {name!r}")
