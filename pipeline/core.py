"""The rules both stages of the pure core share: configuration, event time, verdicts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.codec import CodecError
from pipeline.rules import AlertRules
from pipeline.windows import HOUR

OTHER_LOOP = "other"


@dataclass(frozen=True)
class CoreConfig:
    bucket_ms: int = 10_000
    dedupe_horizon_ms: int = HOUR
    allowed_lateness_ms: int = HOUR
    # How far an event's ts may be ahead of its Kafka message's own time (check_not_ahead).
    max_ahead_ms: int = HOUR
    default_sla_ms: int = HOUR
    sla_ms: Mapping[str, int] = field(default_factory=dict)
    hourly_rates: Mapping[str, float] = field(default_factory=dict)
    # When set, events of any other loop count under "other" (bounded label values). A fixed
    # list rather than "the first N seen" so every partition and worker folds the same loops.
    loops: frozenset[str] = frozenset()
    # Alert rules, drift settings and the evaluation interval (pipeline.rules): all defaults
    # unless a rules file is configured.
    rules: AlertRules = field(default_factory=AlertRules.default)
    # The most cases (joins in progress) one partition holds; past it, the least recently
    # touched are evicted (pipeline.partition). 0 = no cap: the horizon alone bounds the state.
    max_cases_per_partition: int = 0

    def sla(self, loop: str) -> int:
        return self.sla_ms.get(loop, self.default_sla_ms)

    def loop_label(self, loop: str) -> str:
        return loop if not self.loops or loop in self.loops else OTHER_LOOP

    @property
    def case_horizon_ms(self) -> int:
        """How long after its last event a case (and a partial bucket) is kept: twice the
        longest of allowed lateness and SLA, so late events and overdue cases are still seen."""
        return 2 * max(self.allowed_lateness_ms, self.default_sla_ms, *self.sla_ms.values())


def verdicts_of(topic: str, record: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The (suite, passed) verdicts an event carries: an eval result's own, or a resolution's
    online verdict, which counts in the CURRENT suite."""
    if topic == "eval-results":
        return [(str(record["suite"]), bool(record["passed"]))]
    if topic == "resolutions" and record.get("eval_passed") is not None:
        return [("CURRENT", bool(record["eval_passed"]))]
    return []


def resolution_amounts(record: Mapping[str, Any]) -> tuple[int, int]:
    """A resolution's cost (model + other) in nano-USD and its human time in micro-minutes,
    as the aggregates sum them; a missing amount is zero. A non-finite amount makes the record
    invalid: callers check it before changing any state, so the record is dead-lettered and
    counted nowhere else."""
    cost = _scaled(record, "model_cost_usd", 1e9) + _scaled(record, "other_cost_usd", 1e9)
    return cost, _scaled(record, "human_minutes", 1e6)


def check_not_ahead(ts_ms: int, sent_ms: int | None, max_ahead_ms: int) -> None:
    """Refuse an event stamped further ahead of its Kafka message's own time (the producer's
    clock, or the broker's) than ``max_ahead_ms``: its partition's watermark would follow it,
    and every event after it would be too late, for as long as the clock is wrong. Replay has
    no message times (``sent_ms`` None) and does not check."""
    if sent_ms is None or sent_ms < 0 or ts_ms - sent_ms <= max_ahead_ms:
        return
    raise CodecError(
        "future_ts",
        f"ts {iso(ts_ms)} is {(ts_ms - sent_ms) / 1000:,.0f} s ahead of its message's time "
        f"{iso(sent_ms)}; at most {max_ahead_ms / 1000:,.0f} s is allowed "
        "(LOOPLINE_MAX_AHEAD_SECONDS)",
        "ts",
    )


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 in UTC, as snapshots and error texts show event time."""
    text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")


def _scaled(record: Mapping[str, Any], name: str, scale: float) -> int:
    value = record.get(name)
    scaled = float(value or 0.0) * scale
    if not math.isfinite(scaled):
        raise CodecError("invalid", f"Resolution.{name}: {value!r} is not a finite amount", name)
    return round(scaled)


#: The event times loopline counts: from the epoch up to the year 9999, whose last days are left
#: for the bucket ends and windows computed from a time (a datetime stops at the year 9999). An
#: Avro timestamp-millis is any long; one outside these could not be shown as a time at all.
END_MS = 253_370_764_800_000  # 9999-01-01T00:00:00Z, not included


def record_ts_ms(value: Any) -> int:
    """``to_ms`` of a record's ts, its error naming the field (the range's names it already)."""
    try:
        return to_ms(value)
    except CodecError:
        raise
    except ValueError as exc:
        raise ValueError(f"ts: {exc}") from None


def to_ms(value: Any) -> int:
    """Event time in epoch milliseconds from an aware datetime, epoch ms or ISO-8601 text;
    a time before 1970 or from the year 9999 on is refused (``invalid``)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: event times must carry a timezone")
        return to_ms(round(value.timestamp() * 1000))
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < END_MS:
            return value
        raise CodecError(
            "invalid", f"ts: {value} ms is not between 1970-01-01 and 9999-01-01", "ts"
        )
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass  # said below, with what a timestamp may be
        else:
            return to_ms(parsed)  # a naive one is refused there
    raise ValueError(
        f"not a timestamp: {value!r} (epoch milliseconds or ISO-8601 text with its offset)"
    )
