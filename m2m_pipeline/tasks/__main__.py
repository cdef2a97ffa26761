"""Write the procedural stand-ins: `python -m m2m_pipeline.tasks {polyhedra,procedures} ROOT -n N`.
(Standalone until the project CLI wires these in.)"""

from __future__ import annotations

import argparse
import time

from m2m_pipeline.cli_types import int_at_least
from m2m_pipeline.tasks.polyhedra import RenderSettings, write_polyhedra
from m2m_pipeline.tasks.procedures import write_procedures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m2m_pipeline.tasks", description=__doc__)
    parser.add_argument("kind", choices=["polyhedra", "procedures"])
    parser.add_argument("root", help="output folder (Zero-1-to-3 layout for polyhedra, VGSI folders for procedures)")
    parser.add_argument("-n", "--count", type=int_at_least(1), default=300, help="objects / procedures to write")
    parser.add_argument("--start", type=int_at_least(0), default=0, help="first index (write a range in parallel jobs)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--size", type=int_at_least(8), default=32, help="image side, px")
    parser.add_argument("--overwrite", action="store_true", help="rewrite items that already exist")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.kind == "polyhedra":
        names = write_polyhedra(args.root, args.count, args.seed, RenderSettings(image_size=args.size),
                                overwrite=args.overwrite, start=args.start)
    else:
        names = write_procedures(args.root, args.count, args.seed, image_size=args.size,
                                 overwrite=args.overwrite, start=args.start)
    print(f"{len(names)} {args.kind} under {args.root} in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
