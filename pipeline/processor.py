"""The pure core of the five numbers: dedupe, the input/resolution join, bucketed aggregates.

No Kafka here: replay feeds it from a file, the worker's agent feeds it from topics, and both
get the same numbers from the same code. Event time only; "now" is the watermark, the largest
event time seen.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.aggregates import delta
from pipeline.windows import HOUR, WEEK, WINDOWS, BucketSeries, align_up, default_tiers


@dataclass(frozen=True)
class CoreConfig:
    bucket_ms: int = 10_000
    dedupe_horizon_ms: int = HOUR
    allowed_lateness_ms: int = HOUR
    default_sla_ms: int = HOUR
    sla_ms: Mapping[str, int] = field(default_factory=dict)
    hourly_rates: Mapping[str, float] = field(default_factory=dict)
    max_loops: int = 50  # loops beyond this many fold into "other" (bounded label values)

    def sla(self, loop: str) -> int:
        return self.sla_ms.get(loop, self.default_sla_ms)


def verdicts_of(topic: str, record: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The (suite, passed) verdicts an event carries: an eval result's own, or a resolution's
    online verdict, which counts in the CURRENT suite."""
    if topic == "eval-results":
        return [(str(record["suite"]), bool(record["passed"]))]
    if topic == "resolutions" and record.get("eval_passed") is not None:
        return [("CURRENT", bool(record["eval_passed"]))]
    return []


def to_ms(value: Any) -> int:
    """Event time in epoch milliseconds from an aware datetime, epoch ms or ISO-8601 text."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: event times must carry a timezone")
        return round(value.timestamp() * 1000)
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return to_ms(datetime.fromisoformat(value.replace("Z", "+00:00")))
    raise ValueError(f"not a timestamp: {value!r}")


@dataclass
class _Case:
    loop: str
    input_ms: int | None = None
    pending: list[int] = field(default_factory=list)  # resolution times awaiting the input
    resolved: bool = False
    touched_ms: int = 0


class Processor:
    """Feed records with ``process``; read numbers with ``snapshot``."""

    def __init__(
        self,
        config: CoreConfig | None = None,
        on_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config or CoreConfig()
        self._on_latency = on_latency
        self.tiers = default_tiers(self.config.bucket_ms)
        self.watermark_ms = 0
        self._next_sweep_ms = 0
        self.series: dict[str, BucketSeries] = {}
        self._seen: dict[str, int] = {}
        self._seen_order: list[tuple[int, str]] = []
        self._cases: dict[str, _Case] = {}
        self._eval_cases: dict[str, tuple[str, str | None]] = {}
        self._covered: Counter[tuple[str, str]] = Counter()
        self._case_horizon_ms = 2 * max(
            self.config.allowed_lateness_ms,
            self.config.default_sla_ms,
            *self.config.sla_ms.values(),
        )

    # -- input ------------------------------------------------------------------------------

    def process(self, topic: str, record: Mapping[str, Any]) -> str:
        """Apply one record; returns its status: ok, duplicate or too_late."""
        ts = to_ms(record["ts"])
        if topic == "eval-cases":
            self._eval_case(record)
            return "ok"
        event_id = str(record["event_id"])
        if event_id in self._seen:
            return "duplicate"
        loop = self.loop_label(str(record["loop"]))
        series = self.series.get(loop)
        if series is None:
            series = self.series[loop] = BucketSeries(self.tiers)
        bucket = series.bucket(ts)
        if bucket is None:
            return "too_late"
        self._seen[event_id] = ts
        heapq.heappush(self._seen_order, (ts, event_id))
        if topic == "inputs":
            bucket.inputs[record.get("category") or ""] += 1
            self._input(loop, str(record["case_id"]), ts)
        elif topic == "resolutions":
            bucket.resolutions[(str(record["resolver"]), str(record["outcome"]))] += 1
            bucket.cost_usd += float(record.get("model_cost_usd") or 0.0)
            bucket.cost_usd += float(record.get("other_cost_usd") or 0.0)
            bucket.human_minutes += float(record.get("human_minutes") or 0.0)
            self._resolution(loop, str(record["case_id"]), ts)
        elif topic != "eval-results":
            raise ValueError(f"topic {topic!r} carries nothing the five numbers use")
        bucket.verdicts.update(verdicts_of(topic, record))
        if ts > self.watermark_ms:
            self.watermark_ms = ts
            if ts >= self._next_sweep_ms:  # expire state once per bucket of event time
                self.advance(ts)
        return "ok"

    def loop_label(self, loop: str) -> str:
        """The loop's own name, or "other" once max_loops distinct loops have been seen."""
        if loop in self.series or len(self.series) < self.config.max_loops:
            return loop
        return "other"

    def _input(self, loop: str, case_id: str, ts: int) -> None:
        case = self._cases.get(case_id)
        if case is None:
            case = self._cases[case_id] = _Case(loop)
        case.touched_ms = max(case.touched_ms, ts)
        if case.input_ms is not None:
            return  # latency is measured against the case's first input
        case.input_ms = ts
        for resolved_ms in case.pending:
            self._latency(loop, resolved_ms, resolved_ms - ts)
        case.pending.clear()

    def _resolution(self, loop: str, case_id: str, ts: int) -> None:
        case = self._cases.get(case_id)
        if case is None:
            case = self._cases[case_id] = _Case(loop)
        case.resolved = True
        case.touched_ms = max(case.touched_ms, ts)
        if case.input_ms is None:
            case.pending.append(ts)
        else:
            self._latency(loop, ts, ts - case.input_ms)

    def _latency(self, loop: str, resolved_ms: int, latency_ms: int) -> None:
        bucket = self.series[loop].bucket(resolved_ms)
        if bucket is not None:
            # A resolution stamped before its input (clock skew) counts as zero latency.
            seconds = max(latency_ms, 0) / 1000.0
            bucket.latency.add(seconds)
            if self._on_latency is not None:
                self._on_latency(loop, seconds)

    def _eval_case(self, record: Mapping[str, Any]) -> None:
        eval_case_id = str(record["eval_case_id"])
        old = self._eval_cases.pop(eval_case_id, None)
        if old is not None and old[1]:
            self._covered[(old[0], old[1])] -= 1
        category = record.get("category")
        loop = self.loop_label(str(record["loop"]))
        self._eval_cases[eval_case_id] = (loop, category)
        if category:
            self._covered[(loop, category)] += 1

    # -- time -------------------------------------------------------------------------------

    def advance(self, watermark_ms: int) -> None:
        """Move event time forward: expire dedupe ids, unjoined resolutions and old buckets."""
        self.watermark_ms = max(self.watermark_ms, watermark_ms)
        self._next_sweep_ms = align_up(self.watermark_ms + 1, self.config.bucket_ms)
        horizon = self.watermark_ms - self.config.dedupe_horizon_ms
        while self._seen_order and self._seen_order[0][0] < horizon:
            _, event_id = heapq.heappop(self._seen_order)
            self._seen.pop(event_id, None)
        lateness = self.watermark_ms - self.config.allowed_lateness_ms
        case_horizon = self.watermark_ms - self._case_horizon_ms
        for case_id in [c for c, case in self._cases.items() if case.touched_ms < lateness]:
            case = self._cases[case_id]
            case.pending = [t for t in case.pending if t >= lateness]
            if case.touched_ms < case_horizon:
                del self._cases[case_id]
        for series in self.series.values():
            series.advance(self.watermark_ms)

    # -- output -----------------------------------------------------------------------------

    def covered(self, loop: str) -> set[str]:
        return {cat for (owner, cat), n in self._covered.items() if owner == loop and n > 0}

    def unresolved(self, as_of_ms: int | None = None) -> dict[str, int]:
        """Cases with an input and no resolution, past their loop's SLA, per loop."""
        now = self.watermark_ms if as_of_ms is None else as_of_ms
        counts: Counter[str] = Counter({loop: 0 for loop in self.series})
        for case in self._cases.values():
            if (
                not case.resolved
                and case.input_ms is not None
                and now - case.input_ms > self.config.sla(case.loop)
            ):
                counts[case.loop] += 1
        return dict(counts)

    def default_as_of(self) -> int:
        return align_up(self.watermark_ms, self.config.bucket_ms)

    def snapshot(self, as_of_ms: int | None = None) -> dict[str, Any]:
        """DESIGN.md's snapshot JSON (plus week-over-week deltas per window)."""
        as_of = align_up(
            self.default_as_of() if as_of_ms is None else as_of_ms, self.config.bucket_ms
        )
        loops: dict[str, Any] = {}
        for loop, series in sorted(self.series.items()):
            rate = self.config.hourly_rates.get(loop, 0.0)
            covered = self.covered(loop)
            windows: dict[str, Any] = {}
            week_ago = series.align(as_of - WEEK)
            for name, length in WINDOWS.items():
                now = series.window(as_of, length).numbers(rate, covered)
                before = series.window(week_ago, length).numbers(rate, covered)
                windows[name] = {**now, "wow_delta": delta(now, before)}
            loops[loop] = {"windows": windows}
        return {"as_of": _iso(as_of), "loops": loops}


def _iso(ms: int) -> str:
    text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")
