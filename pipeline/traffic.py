"""Drive generated traffic into Kafka (through the SDK) or into a JSON Lines replay file."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from pipeline.generator import EVENTS_PER_CASE
from pipeline.progress import Meter, Progress
from pipeline.publisher import Publisher
from pipeline.settings import Settings


@dataclass(frozen=True)
class Limits:
    """Stop after ``count`` events or ``duration`` seconds, whichever comes first."""

    count: int | None = None
    duration: float | None = None
    rate: float | None = None  # events per second of wall time; None = as fast as possible

    def __post_init__(self) -> None:
        if self.count is None and self.duration is None:
            raise ValueError("give a count or a duration")
        for name in ("count", "duration", "rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


async def publish_traffic(
    settings: Settings,
    events: Iterable[tuple[str, dict[str, Any]]],
    limits: Limits,
    progress: Progress | None = None,
) -> Counter[str]:
    """Publish until a limit is reached, paced to ``limits.rate``; returns counts by topic."""
    meter = Meter("generate", progress)
    async with Publisher(settings) as publisher:
        for topic, record in events:
            if limits.count is not None and meter.total >= limits.count:
                break
            if limits.duration is not None and meter.elapsed >= limits.duration:
                break
            await publisher.publish(topic, record)
            meter.add(topic)
            if limits.rate is not None:
                ahead = meter.total / limits.rate - meter.elapsed
                if ahead > 0.005:
                    await asyncio.sleep(ahead)
    return meter.by_topic


def ending_now(now: datetime, count: int, cases_per_second: float) -> datetime:
    """The start from which ``count`` generated events end their event time at about ``now``:
    published unpaced, they would otherwise run far ahead of the clock, and the workers refuse
    events stamped more than LOOPLINE_MAX_AHEAD_SECONDS ahead of their messages."""
    return now - timedelta(seconds=round(count / (cases_per_second * EVENTS_PER_CASE)))


def write_jsonl(
    path: Path | TextIO,
    events: Iterable[tuple[str, dict[str, Any]]],
    limits: Limits,
    start_ms: int,
    progress: Progress | None = None,
) -> Counter[str]:
    """Write the replay format of DESIGN.md; ``duration`` is event time from ``start_ms``."""
    meter = Meter("generate", progress)
    out = path.open("w") if isinstance(path, Path) else path
    try:
        for topic, record in events:
            if limits.count is not None and meter.total >= limits.count:
                break
            if limits.duration is not None and record["ts"] - start_ms >= limits.duration * 1000:
                break
            out.write(json.dumps({"topic": topic, "record": record}, separators=(",", ":")))
            out.write("\n")
            meter.add(topic)
    finally:
        if isinstance(path, Path):
            out.close()
    return meter.by_topic
