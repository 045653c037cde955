"""Progress of long work, said on stderr at most every few seconds (generate, replay)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

Progress = Callable[[str], None]


class Meter:
    """Counts events by topic and says ``<label>: N events (R/s) topic=n ...`` through
    ``progress`` at most every ``every`` seconds."""

    def __init__(self, label: str, progress: Progress | None, every: float = 2.0) -> None:
        self.label = label
        self.by_topic: Counter[str] = Counter()
        self.total = 0
        self._progress = progress
        self._every = every
        self._start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def add(self, topic: str) -> None:
        self.by_topic[topic] += 1
        self.total += 1
        now = time.monotonic()
        if self._progress and now - self._last >= self._every:
            self._last = now
            rate = self.total / max(self.elapsed, 1e-9)
            topics = " ".join(f"{t}={n:,}" for t, n in sorted(self.by_topic.items()))
            self._progress(f"{self.label}: {self.total:,} events ({rate:,.0f}/s) {topics}")
