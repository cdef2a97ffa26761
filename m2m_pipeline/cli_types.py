"""Validation at the edge for every console command: numeric option ranges, and one-line errors for bad input.

Ranges are click's (`IntRange` / `FloatRange`), so `--steps 0` fails at parsing with a usage error naming the
option; floats must also be finite (FloatRange alone lets "nan" through: every comparison with NaN is false).
Failures of the input rather than of the code (bad files, bad values: ValueError, OSError and their subclasses
such as ShardError, CheckpointError, WeightsNotFoundError) print one line naming the file or option; the
traceback is kept for bugs, and shown for everything with `m2m --debug ...` or `M2M_DEBUG=1`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import click

POSITIVE_INT = click.IntRange(min=1)       # counts that must be >= 1: steps, images, batch sizes
NON_NEGATIVE_INT = click.IntRange(min=0)   # counts where 0 means "none" / "off", and seeds


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


POSITIVE_FLOAT = FiniteFloat(min=0.0, min_open=True)   # learning rates
NON_NEGATIVE_FLOAT = FiniteFloat(min=0.0)              # guidance scales, time budgets (0: none)

USER_ERRORS = (ValueError, OSError, FloatingPointError)


def debug_enabled(ctx: click.Context | None) -> bool:
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.meta.get("m2m.debug")) or os.environ.get("M2M_DEBUG", "") not in ("", "0")


class FriendlyGroup(click.Group):
    """A click group whose commands report bad input in one line (`Error: <file>: <what>`, exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exn:
            if debug_enabled(ctx):
                raise
            text = " ".join(str(exn).split()) or type(exn).__name__
            raise click.ClickException(f"{text} (rerun with --debug or M2M_DEBUG=1 for the traceback)") from None


def int_at_least(low: int):
    """argparse `type=` for the standalone argparse scripts: an int >= low, or a one-line usage error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not >= {low}")
        return value

    return parse
