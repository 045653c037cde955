"""The review page's /metrics: its queue as Prometheus sees it, read at each scrape.

The eval set grows from traffic only as fast as reviewers decide: candidates left waiting are
the loop no longer closing, which no worker metric shows. Read from the queue the page holds
(rebuilt from the topics at each start), so nothing here can drift from what reviewers see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.review.queue import ReviewQueue


class ReviewCollector(Collector):
    def __init__(self, queue: ReviewQueue, now: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.now = now

    def collect(self) -> Iterator[Metric]:
        open_now = GaugeMetricFamily(
            "loopline_review_open_candidates",
            "Eval candidates not decided yet (claimed or not), by loop",
            labels=["loop"],
        )
        waited = GaugeMetricFamily(
            "loopline_review_oldest_open_age_seconds",
            "How long the oldest open candidate has waited since Kafka got it (0: none open)",
            labels=["loop"],
        )
        now_ms = self.now() * 1000
        for loop, (count, oldest_ms) in sorted(self.queue.backlog().items()):
            open_now.add_metric([loop], count)
            waited.add_metric([loop], 0.0 if oldest_ms is None else (now_ms - oldest_ms) / 1000)
        decided = CounterMetricFamily(
            "loopline_review_decisions",
            "Candidates decided, by loop and decision (counted from the reviews topic)",
            labels=["loop", "decision"],
        )
        for (loop, decision), count in sorted(self.queue.decision_counts.items()):
            decided.add_metric([loop, decision], count)
        yield from (open_now, waited, decided)


def review_registry(queue: ReviewQueue) -> CollectorRegistry:
    """A registry of the page's own: the queue's metrics and the process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReviewCollector(queue))
    ProcessCollector(registry=registry)
    return registry
