"""Parameter types of the command line that click lacks: output files whose folder exists,
positive finite numbers, and timezone-aware ISO-8601 times.

Outside pipeline.cli so that the archive's commands (sinks.archive.cli, which pipeline.cli
imports) can use them without a circular import.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import click


class OutputFile(click.Path):
    """A file a command writes ('-': stdout): its folder must exist and be writable, checked
    when the arguments are read, so a mistyped path costs no work and shows no traceback."""

    name = "file"

    def __init__(self) -> None:
        super().__init__(dir_okay=False, allow_dash=True, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(str(super().convert(value, param, ctx)))
        if str(path) == "-":
            return path
        folder = path.parent
        if not folder.is_dir():
            self.fail(f"{path}: the folder {folder} does not exist", param, ctx)
        if not os.access(folder, os.W_OK | os.X_OK):
            self.fail(f"{path}: the folder {folder} is not writable", param, ctx)
        return path


class FiniteFloat(click.FloatRange):
    """click's FloatRange, without nan and inf: nan compares false with any bound, so it passed
    every range (a release gate's --min-pass-rate nan passed every release), and a duration or
    rate of either never ends or fails deep inside the work."""

    name = "finite number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = float(super().convert(value, param, ctx))
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def positive_number() -> FiniteFloat:
    """A finite number above 0 (durations, rates)."""
    return FiniteFloat(min=0, min_open=True)


def parse_iso(value: str, flag: str) -> datetime:
    """An ISO-8601 time with its timezone ('Z' too), or a usage error naming ``flag``."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO-8601 time, e.g. 2026-11-25T12:00:00Z", param_hint=flag
        ) from None
    if parsed.tzinfo is None:
        raise click.BadParameter("give a timezone, e.g. 2026-11-25T12:00:00Z", param_hint=flag)
    return parsed
