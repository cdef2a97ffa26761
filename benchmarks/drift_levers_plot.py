"""Consistency by position of several `m2m drift` results on one plot (README, "The training-side levers").

    python benchmarks/drift_levers_plot.py --out docs/img/results/self_drift_levers \\
        "make demo=runs/drift/self:window-4" "make demo, default=runs/drift/self:anchors-4" \\
        "context noise t_c=100=runs/issue15/test/ctxnoise200-tc100:window-4" \\
        "rollout fine-tune=runs/issue15/test/rollout:window-4" "fine-tune control=runs/issue15/test/finetune:window-4"

Each argument is LABEL=DRIFT_DIR:POLICY; writes OUT_colour.png and OUT_background.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2m_pipeline.evaluation.figures import line_plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", nargs="+", help="LABEL=DRIFT_DIR:POLICY")
    parser.add_argument("--out", type=Path, required=True, help="path prefix of the PNGs")
    parser.add_argument("--title", default="M2M-Self")
    args = parser.parse_args()
    results = []
    for item in args.series:
        label, _, where = item.rpartition("=")  # a label may hold "=" (t_c=100), a folder not
        folder, _, policy = where.rpartition(":")
        if not label or not folder or not policy:
            raise SystemExit(f"bad series {item!r}: want LABEL=DRIFT_DIR:POLICY")
        data = json.loads((Path(folder) / "drift.json").read_text())
        if policy not in data["policies"]:
            raise SystemExit(f"{folder}/drift.json has no policy {policy!r} (has {sorted(data['policies'])})")
        results.append((f"{label} ({policy})", data["policies"][policy], data["chance"]))
    for attribute in ("colour", "background"):
        series = {label: (range(1, len(p["consistency"][attribute]) + 1), p["consistency"][attribute])
                  for label, p, _ in results}
        out = line_plot(series, Path(f"{args.out}_{attribute}.png"), title=f"{args.title}: {attribute} by position",
                        xlabel="generated image n", ylabel="consistency with the set", ylim=(0, 1.02),
                        hlines={"chance": results[0][2][attribute]})
        print(out)


if __name__ == "__main__":
    main()
