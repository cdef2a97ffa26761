"""MIS (Sec. 4 of the paper): caption filtering, image-set generation, shards, feature caches, loader.

Plain functions and classes, callable from the CLI or from orchestration assets; see docs/data.md.
Names load lazily (as in `m2m_pipeline.evaluation`): importing one module of the package does not pull
open_clip (caption tokens) or webdataset (shards) in with it.
"""

from m2m_pipeline.lazy import lazy_getattr

_EXPORTS = {
    "Caption": "captions", "CaptionRecord": "captions", "CaptionStats": "captions",
    "batched_captions": "captions", "filter_captions": "captions", "read_caption_table": "captions",
    "write_caption_tsv": "captions", "MIS_PRESETS": "config", "MISConfig": "config", "get_preset": "config",
    "CaptionFileError": "errors", "MISDataError": "errors", "ShardError": "errors",
    "build_feature_shard": "features", "build_feature_shards": "features", "load_feature_encoders": "features",
    "generate_mis": "generate", "generate_shard": "generate", "make_generator": "generate",
    "ImageSet": "generators", "SetGenerator": "generators", "image_seed": "generators", "MISExamples": "loader",
    "collate_examples": "loader", "make_loader": "loader", "VOCABULARIES": "shapes",
    "ShapesSetGenerator": "shapes", "attributes_of": "shapes", "write_shapes_caption_tsv": "shapes",
    "MISSample": "shards", "decode_mis_sample": "shards", "read_manifest": "shards", "read_samples": "shards",
    "clip_token_count": "tokens", "normalise_caption": "tokens", "ValidationResult": "validators",
    "validate_caption_table": "validators", "validate_feature_shard": "validators",
    "validate_mis_shard": "validators", "build_procedural_mis": "procedural",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
