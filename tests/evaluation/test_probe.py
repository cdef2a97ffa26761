"""Linear probes of frozen representations (m2m probe-features)."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from m2m_pipeline.cli import main
from m2m_pipeline.evaluation.probe import chance_levels, format_probe_table, linear_probe, probe_representations


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] > 0).long()
    assert linear_probe(x[:500], y[:500], x[500:], y[500:]) > 0.95
    noise = torch.randint(0, 2, (600,), generator=g)
    assert linear_probe(x[:500], noise[:500], x[500:], noise[500:]) < 0.7


def test_pixels_carry_colour_and_the_table_has_chance():
    results = probe_representations({"pixels": lambda x: x}, image_size=16, train_images=300, heldout_images=100)
    chance = chance_levels()
    assert results["pixels"]["colour"] > chance["colour"] + 0.3  # colour is linear in the pixels
    table = format_probe_table(results)
    assert "| chance |" in table and "| pixels |" in table


def test_cli_probes_pixels_and_the_dino_stand_in():
    result = CliRunner().invoke(main, ["probe-features", "--preset", "tiny", "--train-images", "100",
                                       "--heldout-images", "50", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| DINO tokens (random stand-in) |" in result.output and "| pixels |" in result.output
