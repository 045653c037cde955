"""JSON Lines files read for replay and the eval-set import: a bad line is a reason, not an
exception, so one damaged line never stops the lines after it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) for each line that is not blank, or (line number, None,
    reason) for one that is not UTF-8 text or not JSON."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode()
            except UnicodeDecodeError as exc:
                yield number, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, None, f"not JSON ({exc.msg})"
