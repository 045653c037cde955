"""Both stages of the five numbers in one process: how replay and the tests run the core.

The worker runs the same two stages distributed (agents/): stage 1 (pipeline.partition) per
source partition, stage 2 (pipeline.loopview) per loop, joined by a repartition topic. Here the
partials go straight from one to the other, so a file replayed here gives the numbers the
workers give for the same events. Event time only; "now" is the watermark, the largest event
time seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.core import CoreConfig, to_ms
from pipeline.loopview import LoopView
from pipeline.partition import PartitionCore

SYNC_EVERY = 10_000  # events between hand-overs from stage 1 to stage 2 (bounds memory)


def partition_key(topic: str, record: Mapping[str, Any]) -> str:
    """The key a source topic is partitioned by (DESIGN.md): the case, or the eval case."""
    if topic in ("inputs", "resolutions"):
        return str(record["case_id"])
    if topic == "eval-results":
        return str(record.get("case_id") or record["eval_case_id"])
    return str(record["eval_case_id"])


class Processor:
    """Feed records with ``process``; read numbers with ``snapshot`` and ``unresolved``, and
    the Alert records raised so far in ``alerts``. Alert rules are evaluated whenever event time
    crosses an evaluation_interval boundary, with every earlier event applied."""

    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.stage1 = PartitionCore(self.config)
        self.stage2 = LoopView(self.config)
        self._unsynced = 0
        self.alerts: list[dict[str, Any]] = []
        self.candidates: list[dict[str, Any]] = []  # EvalCandidate records, in order
        self.evaluations = 0
        self._evaluated_ms = 0

    @classmethod
    def resumed(cls, stage1: PartitionCore, stage2: LoopView) -> Processor:
        """A processor that goes on from restored state, as a restarted worker does."""
        processor = cls(stage1.config)
        processor.stage1, processor.stage2 = stage1, stage2
        evaluated = [state.evaluated_ms for state in stage2.loops.values()]
        processor._evaluated_ms = max(evaluated, default=0)
        return processor

    def process(self, topic: str, record: Mapping[str, Any]) -> str:
        """Apply one record; returns its status: ok, duplicate or too_late."""
        interval = self.config.rules.evaluation_interval_ms
        boundary = to_ms(record["ts"]) // interval * interval
        if boundary > self._evaluated_ms and topic != "eval-cases":
            if self._evaluated_ms:  # nothing to evaluate before the first event
                self._sync()
                self.alerts.extend(self.stage2.evaluate(boundary))
                self.evaluations += 1
            self._evaluated_ms = boundary
        status = self.stage1.process(topic, partition_key(topic, record), record)
        self._unsynced += 1
        if self._unsynced >= SYNC_EVERY:
            self._sync()
        return status

    def delete_eval_case(self, eval_case_id: str) -> str:
        """Apply a tombstone of the eval-cases topic: the case leaves its loop's baseline."""
        return self.stage1.delete_eval_case(eval_case_id)

    def _sync(self) -> None:
        for message in self.stage1.drain():
            self.stage2.apply(message)
        self.candidates.extend(self.stage2.candidates)
        self.stage2.candidates = []
        self.stage1.discard_changes()  # nothing persists here; keep the change sets small
        self._unsynced = 0

    def snapshot(self, as_of_ms: int | None = None) -> dict[str, Any]:
        """DESIGN.md's snapshot JSON (plus week-over-week deltas per window)."""
        self._sync()
        return self.stage2.snapshot(as_of_ms)

    def dead_letter(self, loop: str | None, ts_ms: int) -> None:
        """Count a rejected record (replay's dead letter) for the dead-letter rate."""
        self.stage1.dead_letter(loop, ts_ms)

    def unresolved(self, as_of_ms: int | None = None) -> dict[str, int]:
        """Cases with an input and no resolution, past their loop's SLA, per loop."""
        self._sync()
        return self.stage2.unresolved(as_of_ms)
