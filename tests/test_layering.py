"""Import layering (issue 13): the network stands alone; the data package loads its parts lazily."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("statement, banned", [
    ("import m2m_pipeline.network", ("open_clip", "webdataset", "m2m_pipeline.data", "dagster", "mlflow")),
    ("import m2m_pipeline.sampling", ("open_clip", "webdataset", "m2m_pipeline.data", "dagster")),
    ("import m2m_pipeline.data.config", ("open_clip", "webdataset", "torch")),
    ("from m2m_pipeline.data import get_preset", ("open_clip", "webdataset", "torch")),
    ("import m2m_pipeline.network.config", ("diffusers", "torch")),
    ("import m2m_pipeline.cli", ("diffusers", "open_clip", "webdataset", "dagster")),  # `m2m --help` stays quick
])
def test_import_pulls_only_what_it_needs(statement, banned):
    loaded = _modules_after(statement)
    assert not [m for m in banned if m in loaded], f"{statement!r} loads {[m for m in banned if m in loaded]}"
