"""m2m-pipeline: Many-to-many image generation with auto-regressive diffusion models (M2M).

The library (network, objective, sampling, training, data) never imports dagster; the Dagster code
location in `m2m_pipeline.definitions` adapts it.
"""

__all__ = ["M2MConfig", "M2MUNet", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import m2m_pipeline.<submodule>` must not pay for diffusers (seconds per Dagster step process).
    if name in ("M2MConfig", "M2MUNet"):
        from m2m_pipeline import network

        return getattr(network, name)
    if name == "generate":
        from m2m_pipeline.sampling import generate

        return generate
    raise AttributeError(f"module 'm2m_pipeline' has no attribute {name!r}")
