"""The version of what the workers write for each other: stage 1's messages to stage 2 (the
partials topic) and the checkpointed state (the changelogs).

A worker reads every older format, but one that reads a newer one as its own version
understood it computes wrong numbers without a sign (README, "Upgrading": the mixed rollouts of
2026-11-26 and 2026-11-28). So each message and checkpoint marker carries the version it was
written in, and a worker refuses anything newer than it knows: it stops, and its partitions go
to the workers that can read them, instead of counting on wrongly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Raise it with any change that the workers of the version before would misread (a field
#: they would take for something else, or leave out where it matters); not for additions they
#: may ignore. Messages and markers written before versions were written count as version 1.
FORMAT_VERSION = 1


class NewerFormat(RuntimeError):
    """Written by a newer loopline than this worker reads: not to be skipped or dead-lettered
    (its counts would be lost), so the worker stops."""


def check_format(data: Mapping[str, Any], what: str) -> None:
    version = int(data.get("v", 1))
    if version > FORMAT_VERSION:
        raise NewerFormat(
            f"{what} written in format {version} by a newer loopline; this worker reads format "
            f"{FORMAT_VERSION} at most: stop every worker and start the newer version (README, "
            "Upgrading)"
        )
