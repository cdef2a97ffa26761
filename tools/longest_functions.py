"""The N longest functions of a source tree by line span (ast), for the design reviews' before/after figures.

    python tools/longest_functions.py m2m_pipeline --most 10
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def longest(root: Path, most: int) -> list[tuple[int, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.name}"))
    return sorted(rows, reverse=True)[:most]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--most", type=int, default=10)
    args = parser.parse_args()
    for lines, name in longest(args.root.resolve(), args.most):
        print(lines, name)
