"""The procedural shapes world: grammar, determinism, per-image variation, known ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m_pipeline.data import ShapesSetGenerator, VOCABULARIES, attributes_of, filter_captions
from m2m_pipeline.data.captions import read_caption_table
from m2m_pipeline.data.shapes import BACKGROUND_COLOURS, COLOURS, TEMPLATES, caption_of, write_shapes_caption_tsv


def test_vocabularies_match_design_notes():
    sizes = {name: len(v) for name, v in VOCABULARIES.items()}
    assert sizes == {"shape": 4, "colour": 8, "background": 4, "background_colour": 4}
    words = [w for vocab in VOCABULARIES.values() for w in vocab]
    assert len(words) == len(set(words)), "vocabularies must be disjoint for the caption parser"


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_grammar_round_trip(template):
    ids = {"shape": 2, "colour": 0, "background": 1, "background_colour": 3}
    caption = caption_of(ids, template)
    assert attributes_of(caption) == ids
    if template == 0:
        assert caption == "a red triangle on a striped purple background"


def test_unparseable_caption_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the shapes grammar: no shape"):
        attributes_of("a red blob on a striped purple background")


def test_sets_are_deterministic_varied_and_labelled(shapes_captions):
    generator = ShapesSetGenerator(resolution=32)
    first = generator.generate(shapes_captions[:2])
    again = generator.generate(shapes_captions[:2])
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images)
    image_set = first[0]
    assert image_set.images.shape == (25, 3, 32, 32)
    assert image_set.images.min() >= -1 and image_set.images.max() <= 1
    flat = image_set.images.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 25  # 25 distinct images
    assert image_set.attributes["names"] == {"shape": "triangle", "colour": "red", "background": "striped",
                                             "background_colour": "purple"}
    assert [p["index"] for p in image_set.attributes["images"]] == list(range(25))
    assert len({p["rotation"] for p in image_set.attributes["images"]}) == 25


def test_single_image_equals_batched(shapes_captions):
    generator = ShapesSetGenerator(resolution=24)
    batched = generator.generate(shapes_captions)
    alone = generator.generate([shapes_captions[3]], indices=[17])[0]
    assert torch.equal(alone.images[0], batched[3].images[17])
    assert alone.attributes["images"][0] == batched[3].attributes["images"][17]


@pytest.mark.parametrize("resolution", [16, 32, 48])
def test_ground_truth_colours_are_visible(resolution, shapes_captions):
    """The pixel at the shape's centre has the (jittered) shape colour; a far corner the background's."""
    image_set = ShapesSetGenerator(resolution=resolution).generate([shapes_captions[1]])[0]  # blue circle, plain black
    pixels = ((image_set.images + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    for image, placement in zip(pixels, image_set.attributes["images"]):
        cx, cy = (int(c * resolution) for c in placement["center"])
        assert np.abs(image[cy, cx] - np.array(placement["colour_rgb"])).max() <= 1
        assert np.abs(np.array(placement["colour_rgb"]) - np.array(COLOURS["blue"])).max() <= 14
    corners = pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    background = np.median(corners.reshape(-1, 3), axis=0)
    assert np.abs(background - np.array(BACKGROUND_COLOURS["black"])).max() <= 2


def test_caption_source_runs_through_the_filter(tiny_cfg, tmp_path):
    write_shapes_caption_tsv(tmp_path / "shapes.tsv", 50, seed=3)
    stats = filter_captions(tmp_path / "shapes.tsv", tmp_path / "c.jsonl", tiny_cfg, progress=False)
    assert stats.kept == 50 and stats.malformed == 0
    records = list(read_caption_table(tmp_path / "c.jsonl"))
    generator = ShapesSetGenerator(resolution=16, images_per_set=3)
    sets = generator.generate([r.as_caption() for r in records[:4]])
    assert all(s.attributes["ids"] == attributes_of(r.caption) for s, r in zip(sets, records))
    assert (tmp_path / "shapes.tsv").read_bytes() == write_shapes_caption_tsv(tmp_path / "again.tsv", 50, 3).read_bytes()
