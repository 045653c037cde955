"""The type of the command line's output file options (``-o``, ``--jsonl``, ``--alerts``).

Outside pipeline.cli so that the archive's commands (sinks.archive.cli, which pipeline.cli
imports) can use it without a circular import.
"""

from __future__ import annotations

import os
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
