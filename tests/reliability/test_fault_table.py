"""docs/reliability.md's fault table recounted from the collected tests: every row's *Faults* is the number of test
cases its "Tried by" entries select, and every reliability test is in one row or among the listed controls."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import COLLECTED

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
HERE = Path(__file__).resolve().parent


def table_rows() -> list[tuple[str, list[str], int]]:
    text = DOC.read_text()
    table = text.split("<!-- fault-table -->")[1].split("<!-- /fault-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("**Total"):
            continue
        rows.append((cells[0], re.findall(r"`([\w.]+::\w+(?:\[[^\]]*\])?)`", cells[1]), int(cells[3])))
    return rows


def matches(entry: str, nodeid: str) -> bool:
    test, _, selector = entry.partition("[")
    name, _, param = nodeid.partition("[")
    return name == test and (not selector or selector.rstrip("]") in param)


def test_the_fault_table_counts_the_collected_tests():
    files = {p.name for p in HERE.glob("test_*.py")}
    if {n.split("::")[0] for n in COLLECTED} != files:
        pytest.skip("only part of tests/reliability was collected")
    rows = table_rows()
    controls = re.findall(r"`(test_\w+\.py::test_\w+)`", DOC.read_text().split("Controls, not faults")[1]
                          .split("\n\n")[0])
    claimed: dict[str, str] = {}
    for fault, entries, count in rows:
        selected = [n for n in COLLECTED if any(matches(e, n) for e in entries)]
        assert len(selected) == count, f"{fault}: the table says {count}, the tests hold {len(selected)}"
        for nodeid in selected:
            assert nodeid not in claimed, f"{nodeid} is in both {claimed[nodeid]!r} and {fault!r}"
            claimed[nodeid] = fault
    rest = [n for n in COLLECTED if n not in claimed and n.split("[")[0] not in controls]
    assert not rest, f"reliability tests in no row of the fault table: {rest}"
    total = re.search(r"\*\*Total\*\* \| \| \| \*\*(\d+)\*\*", DOC.read_text())
    assert total and int(total.group(1)) == sum(count for _, _, count in rows)
