"""The shapes-world attribute oracle: API, persistence, ground-truth index space, held-out accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from m2m_pipeline.data import Caption, ShapesSetGenerator
from m2m_pipeline.data.shapes import VOCABULARIES
from m2m_pipeline.evaluation.oracle import (
    CONFIG_FILE,
    AttributeOracle,
    OracleAccuracyError,
    attribute_targets,
    evaluate_accuracy,
    load_or_train_oracle,
    render_dataset,
    train_oracle,
)


def test_quick_oracle_learns_every_attribute(quick_oracle):
    # The quick recipe is far above chance on every attribute; the >= 99 % bar is the slow test below.
    x, y = render_dataset(400, 16, seed=1234)
    accuracy = evaluate_accuracy(quick_oracle, x, y)
    for name, acc in accuracy.items():
        assert acc > 1.5 / len(VOCABULARIES[name]), (name, acc)  # shape learns last
    assert accuracy["colour"] > 0.9 and accuracy["background_colour"] > 0.9


def test_save_load_roundtrip_predicts_identically(quick_oracle, quick_oracle_dir):
    x, _ = render_dataset(64, 16, seed=7)
    again = AttributeOracle.load(quick_oracle_dir)
    assert again.config == quick_oracle.config
    for name, pred in quick_oracle.predict(x).items():
        assert torch.equal(pred, again.predict(x)[name])
    assert torch.equal(quick_oracle.features(x), again.features(x))
    assert set(again.heldout_accuracy) == set(VOCABULARIES)
    assert json.loads((quick_oracle_dir / CONFIG_FILE).read_text())["image_size"] == 16


def test_predict_and_features_keep_leading_dims_and_resize(quick_oracle):
    x = torch.rand(2, 5, 3, 40, 40) * 2 - 1  # other size: resized inside
    pred = quick_oracle.predict(x)
    assert set(pred) == set(VOCABULARIES)
    assert all(p.shape == (2, 5) and p.dtype == torch.long for p in pred.values())
    assert quick_oracle.features(x).shape == (2, 5, quick_oracle.config.feature_dim)
    probs = quick_oracle.probabilities(x)
    assert torch.allclose(probs["colour"].sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="3, H, W"):
        quick_oracle.predict(torch.zeros(2, 1, 16, 16))


def test_attribute_targets_match_shard_ids_and_captions():
    sets = ShapesSetGenerator(resolution=16, images_per_set=3).generate(
        [Caption("c1", "a cyan cross on a dotted brown background"), Caption("c2", "a red circle on a plain black background")]
    )
    one = attribute_targets(sets[0].attributes)
    assert int(one["shape"]) == VOCABULARIES["shape"].index("cross")
    assert int(one["colour"]) == VOCABULARIES["colour"].index("cyan")
    batch = attribute_targets([s.attributes for s in sets])
    from_captions = attribute_targets(captions=[s.caption for s in sets])
    for name in VOCABULARIES:
        assert torch.equal(batch[name], from_captions[name])
    with pytest.raises(KeyError, match="set 0 have no 'ids'"):
        attribute_targets([{"names": {}}])


def test_load_or_train_caches_and_rejects_other_size(quick_oracle_dir):
    oracle = load_or_train_oracle(quick_oracle_dir, 16)  # loads, does not retrain
    assert oracle.config.image_size == 16
    with pytest.raises(ValueError, match="trained at 16 px, not 32 px"):
        load_or_train_oracle(quick_oracle_dir, 32)


def test_accuracy_bar_is_enforced(tmp_path):
    with pytest.raises(OracleAccuracyError, match="below 0.99"):
        train_oracle(16, out_dir=tmp_path / "weak", progress=False, train_images=64, heldout_images=64, epochs=1)
    assert not (tmp_path / "weak").exists()  # a failed oracle is never saved


def test_load_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="oracle_config.json"):
        AttributeOracle.load(tmp_path)


@pytest.mark.slow
def test_oracle_full_accuracy(tmp_path):
    """The default recipe reaches >= 99 % held-out accuracy per attribute (~80 s at 16 px on one core)."""
    oracle = train_oracle(16, out_dir=tmp_path / "oracle", progress=False)  # raises OracleAccuracyError below 99 %
    assert min(oracle.heldout_accuracy.values()) >= 0.99
    x, y = render_dataset(1000, 16, seed=4242)  # fresh seeds: not the held-out set the bar was checked on
    assert min(evaluate_accuracy(AttributeOracle.load(tmp_path / "oracle"), x, y).values()) >= 0.99
