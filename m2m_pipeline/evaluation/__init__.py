"""Evaluation (Sec. 8.4): FID, IS, CLIP scores, the shapes-world attribute oracle and the protocol.

Library only (no dagster). Names load lazily so `m2m --help` and Dagster step processes do not pay for
torch / clean-fid / open_clip until a metric is used.
"""

from m2m_pipeline.lazy import lazy_getattr

_EXPORTS = {
    "AttributeOracle": "oracle", "OracleConfig": "oracle", "attribute_targets": "oracle",
    "load_or_train_oracle": "oracle", "train_oracle": "oracle",
    "attribute_consistency": "consistency", "caption_agreement": "consistency", "chance_levels": "consistency",
    "compute_fid": "fid", "extract_features": "fid", "fid_from_features": "fid", "inception_score": "fid",
    "oracle_feature_network": "fid", "inception_feature_network": "fid",
    "ClipScorer": "clip_score",
    "ProtocolConfig": "protocol", "EvaluationReport": "protocol", "Scorers": "protocol",
    "load_test_sets": "protocol", "run_protocol": "protocol",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
