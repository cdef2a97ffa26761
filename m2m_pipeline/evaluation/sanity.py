"""Metric sanity on the shapes world (docs/evaluation.md "Metric sanity"): FID self ~ 0, same-distribution << different attributes.

`python -m m2m_pipeline.evaluation.sanity --oracle runs/oracle32 --size 32` prints the numbers the docs quote.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch

from m2m_pipeline.cli_types import int_at_least
from m2m_pipeline.data.shapes import VOCABULARIES, render_image, uint8_to_images

WARM = (0, 3, 6)   # red, yellow, orange
COLD = (1, 2, 5)   # green, blue, cyan


def draw_shapes(n: int, seed: int, colours: Sequence[int], resolution: int = 16,
                fixed: dict[str, int] | None = None) -> torch.Tensor:
    """n images (n, 3, S, S) in [-1, 1]: colours drawn from `colours`, other attributes uniform (or `fixed`)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        ids = {name: int(rng.integers(len(v))) for name, v in VOCABULARIES.items()}
        ids["colour"] = int(rng.choice(list(colours)))
        ids.update(fixed or {})
        images.append(render_image(ids, int(rng.integers(2**62)), resolution)[0])
    return uint8_to_images(np.stack(images))


def sanity_numbers(oracle, n: int = 500, resolution: int | None = None) -> dict[str, float]:
    from m2m_pipeline.evaluation.fid import (
        extract_features,
        fid_from_features,
        inception_score,
        oracle_feature_network,
    )

    s = resolution or oracle.config.image_size
    net = oracle_feature_network(oracle)
    warm_a, warm_b, cold = draw_shapes(n, 1, WARM, s), draw_shapes(n, 2, WARM, s), draw_shapes(n, 3, COLD, s)
    fa, fb, fc = (extract_features(x, net) for x in (warm_a, warm_b, cold))
    one_class = draw_shapes(n, 4, (0,), s, fixed={"shape": 0, "background": 0, "background_colour": 0})
    return {
        "images_per_side": n, "resolution": s,
        "fid_self": fid_from_features(fa, fa),
        "fid_same_distribution": fid_from_features(fa, fb),
        "fid_different_colours": fid_from_features(fa, fc),
        "is_one_combination": inception_score(one_class, net),
        "is_all_attributes": inception_score(draw_shapes(n, 5, range(8), s), net),
    }


def main(argv: Sequence[str] | None = None) -> None:
    from m2m_pipeline.evaluation.oracle import load_or_train_oracle

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--oracle", required=True, help="oracle folder (trained there if empty)")
    parser.add_argument("--size", type=int_at_least(8), default=32, help="oracle / image resolution")
    parser.add_argument("--n", type=int_at_least(2), default=500, help="images per side")
    args = parser.parse_args(argv)
    print(json.dumps(sanity_numbers(load_or_train_oracle(args.oracle, args.size), args.n), indent=1))


if __name__ == "__main__":
    main()
