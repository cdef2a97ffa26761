"""m2m-pipeline: Many-to-many image generation with auto-regressive diffusion models (M2M).

The library (network, objective, sampling, training, data) never imports dagster; the Dagster code
location in `m2m_pipeline.definitions` adapts it.
"""

from m2m_pipeline.network import M2MConfig, M2MUNet

__all__ = ["M2MConfig", "M2MUNet", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import m2m_pipeline` stays light for code that only needs the network.
    if name == "generate":
        from m2m_pipeline.sampling import generate

        return generate
    raise AttributeError(name)
