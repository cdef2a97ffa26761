"""Lazy package exports: `from package import Name` imports the submodule that defines Name on first use, so a
package's __init__ costs nothing (the network without diffusers, the data package without open_clip)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ for `package`: exports maps each public name to its submodule."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
