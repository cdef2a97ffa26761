"""`m2m drift`: consistency and FID by position per context policy, on the tiny preset; policies never look ahead."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from m2m_pipeline.cli import main
from m2m_pipeline.evaluation.drift import CONTEXT_POLICIES, policies_named
from m2m_pipeline.sampling import window_indices


@pytest.mark.parametrize("name", sorted(CONTEXT_POLICIES))
def test_policies_attend_only_to_earlier_images_and_keep_their_anchors(name):
    policy = CONTEXT_POLICIES[name]
    for position in range(1, 40):  # position p: 4 real images then p - 4 generated ones before it
        idx = window_indices(position, policy.window, policy.anchors)
        assert idx == sorted(set(idx)) and all(0 <= i < position for i in idx)  # no future, no repeats
        assert len(idx) == (position if policy.window is None else min(position, policy.window))
        assert set(range(min(policy.anchors, position))) <= set(idx)  # the real anchors are always there


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match=r"unknown context policies \['nope'\]"):
        policies_named(["window-4", "nope"])


def test_drift_cli_on_the_tiny_preset(tiny_checkpoint, tiny_test_split, quick_oracle_dir, tmp_path):
    out = tmp_path / "drift"
    result = CliRunner().invoke(main, [
        "drift", "--checkpoint", str(tiny_checkpoint), "--test-shards", str(tiny_test_split), "--oracle",
        str(quick_oracle_dir), "--policy", "window-4", "--policy", "all", "--policy", "anchors-1", "--images", "6",
        "--sets", "2", "--steps", "2", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| window-4 |" in result.output and "real images (ceiling)" in result.output
    report = json.loads((out / "drift.json").read_text())
    p = report["policies"]
    assert set(p) == {"window-4", "all", "anchors-1"} and report["sets"] == 2
    assert all(len(v["fid"]) == 6 and len(v["consistency"]["colour"]) == 6 for v in p.values())
    # image 1 sees the same 4 real images under every policy, with the same seeds: same numbers
    for name in ("all", "anchors-1"):
        assert p[name]["fid"][0] == pytest.approx(p["window-4"]["fid"][0], rel=1e-6)
        assert p[name]["consistency"]["colour"][0] == p["window-4"]["consistency"]["colour"][0]
    assert all(v["seconds_per_image"] > 0 for v in p.values())
    assert 0 <= report["ceiling"]["colour"] <= 1 and report["chance"]["shape"] == 0.25
    for name in ("drift_colour", "drift_background", "drift_shape", "drift_fid"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_drift_cli_refuses_an_unknown_policy(tiny_checkpoint, tiny_test_split, quick_oracle_dir, tmp_path):
    result = CliRunner().invoke(main, ["drift", "--checkpoint", str(tiny_checkpoint), "--test-shards",
                                       str(tiny_test_split), "--oracle", str(quick_oracle_dir), "--policy", "x",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--policy" in result.output and "unknown context policies" in result.output
