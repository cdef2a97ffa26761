"""Evaluation (Sec. 8.4): FID, IS, CLIP scores, the procedural attribute oracle and the protocol. No dagster here."""

from m2m_pipeline.evaluation.oracle import (
    AttributeOracle,
    OracleConfig,
    attribute_targets,
    load_or_train_oracle,
    train_oracle,
)

__all__ = ["AttributeOracle", "OracleConfig", "attribute_targets", "load_or_train_oracle", "train_oracle"]
