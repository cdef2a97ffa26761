"""MIS (Sec. 4 of the paper): caption filtering, image-set generation, shards, feature caches, loader.

Plain functions and classes, callable from the CLI or from orchestration assets; see docs/data.md.
"""

from m2m_pipeline.data.captions import (
    Caption,
    CaptionRecord,
    CaptionStats,
    batched_captions,
    filter_captions,
    read_caption_table,
    write_caption_tsv,
)
from m2m_pipeline.data.config import MIS_PRESETS, MISConfig, get_preset
from m2m_pipeline.data.errors import CaptionFileError, MISDataError, ShardError
from m2m_pipeline.data.features import build_feature_shard, build_feature_shards, load_feature_encoders
from m2m_pipeline.data.generate import generate_mis, generate_shard, make_generator
from m2m_pipeline.data.generators import ImageSet, SetGenerator, image_seed
from m2m_pipeline.data.loader import MISExamples, collate_examples, make_loader
from m2m_pipeline.data.shapes import VOCABULARIES, ShapesSetGenerator, attributes_of, write_shapes_caption_tsv
from m2m_pipeline.data.shards import MISSample, decode_mis_sample, read_manifest, read_samples
from m2m_pipeline.data.tokens import clip_token_count, normalise_caption
from m2m_pipeline.data.validators import (
    ValidationResult,
    validate_caption_table,
    validate_feature_shard,
    validate_mis_shard,
)

__all__ = [
    "Caption", "CaptionRecord", "CaptionStats", "batched_captions", "filter_captions", "read_caption_table",
    "write_caption_tsv", "MIS_PRESETS", "MISConfig", "get_preset", "CaptionFileError", "MISDataError",
    "ShardError", "build_feature_shard", "build_feature_shards", "load_feature_encoders", "generate_mis",
    "generate_shard", "make_generator", "ImageSet", "SetGenerator", "image_seed", "MISExamples",
    "collate_examples", "make_loader", "VOCABULARIES", "ShapesSetGenerator", "attributes_of",
    "write_shapes_caption_tsv", "MISSample", "decode_mis_sample", "read_manifest", "read_samples",
    "clip_token_count", "normalise_caption", "ValidationResult", "validate_caption_table",
    "validate_feature_shard", "validate_mis_shard",
]
