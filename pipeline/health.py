"""What a worker's /healthz and /readyz answer, as plain functions of its state.

/healthz is liveness: it is served by the worker's event loop, so an answer means the loop
runs, and a loop that hangs leaves it unanswered (one that stalled and woke up to find its
partitions gone stops the worker itself: agents/fence.py).
/readyz is readiness: 200 once the worker has joined its consumer group and restored its
tables, 503 before that and during each rebalance and restore after it. An orchestrator that
rolls workers one at a time waits for it, so that two workers are never restoring their state
at once; it is not a liveness check, as a large restore takes minutes (README, "Recovery after a
crash").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerState:
    rebalances: int  # rebalances begun since the worker started (0: it has not joined yet)
    rebalancing: bool  # a rebalance, or the restore that follows it, is under way
    restoring: bool  # the tables' changelogs are being read
    records_to_restore: int  # changelog records still to read (0 when not restoring)
    partitions: int  # partitions of the source topics this worker holds


def readiness(state: WorkerState) -> tuple[bool, dict[str, Any]]:
    """Whether the worker counts events now, and a body saying why not."""
    if state.rebalances == 0:
        return False, {"status": "joining", "detail": "joining its consumer group"}
    if state.restoring:
        return False, {
            "status": "restoring",
            "detail": f"restoring its tables: {state.records_to_restore:,} changelog records to go",
            "records_to_restore": state.records_to_restore,
        }
    if state.rebalancing:
        return False, {"status": "rebalancing", "detail": "its consumer group is rebalancing"}
    # No partitions is ready too: a group with more workers than partitions has idle ones.
    return True, {"status": "ready", "source_partitions": state.partitions}
