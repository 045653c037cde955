"""Prometheus metrics of a worker, on a registry passed in (never the global one)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "CONTENT_TYPE_LATEST",
    "LatencyHistogram",
    "PartitionState",
    "PartitionStateCollector",
    "PipelineMetrics",
    "SnapshotCollector",
]

#: Histogram buckets for case latency: from sub-second AI answers to a day of human work.
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 86400)


class LatencyHistogram(Collector):
    """``loopline_resolution_latency_seconds{loop}``, exposed as prometheus_client's Histogram
    exposes it (buckets with ``le``, ``_count``, ``_sum``), without its locks: Histogram's
    ``observe`` takes a lock for the bucket and one for the sum, and stage 1 observes every
    resolution it joins (about 2.5 % of a worker's time). Observations and scrapes both run
    in the worker's event loop thread, so nothing here needs one."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = tuple(float(bound) for bound in bounds)
        # ``le`` as the library writes it (untyped there)
        self._labels = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._counts: dict[str, list[int]] = {}  # loop -> observations per bucket, +Inf last
        self._sums: dict[str, float] = {}

    def observe(self, loop: str, seconds: float) -> None:
        """One resolution's latency: into the first bucket whose bound is not below it."""
        counts = self._counts.get(loop)
        if counts is None:
            counts = self._counts[loop] = [0] * len(self._labels)
            self._sums[loop] = 0.0
        counts[bisect_left(self._bounds, seconds)] += 1
        self._sums[loop] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["loop"])
        for loop, counts in sorted(self._counts.items()):
            cumulative = zip(self._labels, accumulate(counts), strict=True)
            family.add_metric([loop], list(cumulative), self._sums[loop])
        yield family


class PartitionState(NamedTuple):
    """What /metrics shows of stage 1's state of one source partition."""

    held_cases: int
    watermark_ms: int


class SnapshotCollector(Collector):
    """Gauges of the five numbers, read from the latest snapshot at scrape time.

    A ratio with no denominator is null in the snapshot and absent here, never 0.
    """

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"loops": {}}
        self.unresolved: dict[str, int] = {}
        self.firing: dict[tuple[str, str, str], int] = {}

    def update(
        self,
        snapshot: dict[str, Any],
        unresolved: dict[str, int],
        firing: dict[tuple[str, str, str], int] | None = None,
    ) -> None:
        self.snapshot, self.unresolved = snapshot, unresolved
        self.firing = firing or {}

    def collect(self) -> Iterator[Metric]:
        lw = ["loop", "window"]
        coverage = GaugeMetricFamily(
            "loopline_coverage_ratio", "Resolved by the system alone / all resolved.", labels=lw
        )
        assisted = GaugeMetricFamily(
            "loopline_assisted_ratio", "Resolved by HYBRID (assisted) / all resolved.", labels=lw
        )
        passes = GaugeMetricFamily(
            "loopline_eval_pass_rate",
            "Eval verdicts passed / all.",
            labels=["loop", "suite", "window"],
        )
        latency = GaugeMetricFamily(
            "loopline_latency_quantile_seconds",
            "Resolution latency quantiles (DDSketch, 1 % relative error).",
            labels=["loop", "window", "quantile"],
        )
        cost = GaugeMetricFamily(
            "loopline_cost_per_resolution_usd",
            "Model, other and priced human cost / resolved cases.",
            labels=lw,
        )
        toil = GaugeMetricFamily("loopline_toil_hours", "Human hours in the window.", labels=lw)
        uncovered = GaugeMetricFamily(
            "loopline_uncovered_input_ratio",
            "Inputs whose category no eval case has / categorised inputs.",
            labels=lw,
        )
        for loop, data in self.snapshot["loops"].items():
            for window, numbers in data["windows"].items():
                _add(coverage, [loop, window], numbers["coverage"])
                _add(assisted, [loop, window], numbers["assisted"])
                for suite, value in numbers["quality"].items():
                    _add(passes, [loop, suite, window], value)
                for name, value in numbers["latency_seconds"].items():
                    _add(latency, [loop, window, QUANTILE_LABELS[name]], value)
                _add(cost, [loop, window], numbers["cost_per_resolution_usd"])
                _add(toil, [loop, window], numbers["toil_hours"])
                _add(uncovered, [loop, window], numbers["uncovered_ratio"])
        unresolved = GaugeMetricFamily(
            "loopline_unresolved_cases",
            "Cases with an input and no resolution past the loop's SLA.",
            labels=["loop"],
        )
        for loop, count in self.unresolved.items():
            unresolved.add_metric([loop], count)
        yield from (coverage, assisted, passes, latency, cost, toil, uncovered, unresolved)
        yield from self._drift()
        firing = GaugeMetricFamily(
            "loopline_alerts_firing",
            "Alert episodes firing now (0 for a rule that is watched and quiet).",
            labels=["rule", "loop", "severity"],
        )
        for labels, n in sorted(self.firing.items()):
            firing.add_metric(list(labels), n)
        yield firing

    def _drift(self) -> Iterator[Metric]:
        score = GaugeMetricFamily(
            "loopline_drift_score",
            "Drift of the drift window's inputs from the eval baseline, per feature and method.",
            labels=["loop", "feature", "method"],
        )
        detected = GaugeMetricFamily(
            "loopline_drift_detected",
            "1 when the drifted share of features passes drift_share, else 0.",
            labels=["loop"],
        )
        for loop, data in self.snapshot["loops"].items():
            drift = data.get("drift")
            if drift is None:
                continue
            detected.add_metric([loop], 1.0 if drift["detected"] else 0.0)
            for feature, scores in drift["features"].items():
                for method, value in scores.items():
                    if method != "drifted":
                        score.add_metric([loop, feature, method], value)
        yield from (score, detected)


QUANTILE_LABELS = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


class PartitionStateCollector(Collector):
    """Stage 1's state per source partition of this worker, read at scrape time:
    ``loopline_held_cases{partition}``, the cases it holds in memory (each until the state
    horizon has passed its last event: most of a worker's memory, so with the process's own
    ``process_resident_memory_bytes`` it shows whether memory follows traffic or leaks), and
    ``loopline_watermark_seconds{partition}``, its event-time watermark (a watermark that stops
    while events flow holds every bucket, alert and expiry back)."""

    def __init__(self) -> None:
        self._read: Callable[[], Mapping[int, PartitionState]] = dict

    def watch(self, read: Callable[[], Mapping[int, PartitionState]]) -> None:
        """Read the partitions' state from ``read`` (partition -> state) at each scrape."""
        self._read = read

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "loopline_held_cases",
            "Cases held in memory by stage 1 (until the state horizon passes their last "
            "event), per source partition of this worker.",
            labels=["partition"],
        )
        watermark = GaugeMetricFamily(
            "loopline_watermark_seconds",
            "Stage 1's event-time watermark per source partition of this worker (epoch "
            "seconds; absent before the partition's first event).",
            labels=["partition"],
        )
        for partition, state in sorted(self._read().items()):
            held.add_metric([str(partition)], state.held_cases)
            if state.watermark_ms:
                watermark.add_metric([str(partition)], state.watermark_ms / 1000)
        yield held
        yield watermark


@dataclass(frozen=True)
class PipelineMetrics:
    registry: CollectorRegistry
    events: Counter
    dead_letters: Counter
    resolutions: Counter
    eval_verdicts: Counter
    latency: LatencyHistogram
    eval_candidates: Counter
    consumer_lag: Gauge
    evicted_cases: Counter
    records_deleted_unread: Counter
    restore_remaining: Gauge
    numbers: SnapshotCollector = field(default_factory=SnapshotCollector)
    partitions: PartitionStateCollector = field(default_factory=PartitionStateCollector)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> PipelineMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        numbers, partitions = SnapshotCollector(), PartitionStateCollector()
        latency = LatencyHistogram(
            "loopline_resolution_latency_seconds",
            "Seconds from a case's first input to its resolution.",
            LATENCY_BUCKETS,
        )
        for collector in (numbers, partitions, latency):
            reg.register(collector)
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, CPU seconds, fds
        return cls(
            registry=reg,
            events=Counter(
                "loopline_events",
                "Records consumed, by topic and status (ok, or dead_letter).",
                ["topic", "status"],
                registry=reg,
            ),
            dead_letters=Counter(
                "loopline_dead_letters",
                "Records sent to the dead-letter topic, by source topic and reason.",
                ["topic", "reason"],
                registry=reg,
            ),
            resolutions=Counter(
                "loopline_resolutions",
                "Resolution events counted (deduplicated), by resolver and outcome.",
                ["loop", "resolver", "outcome"],
                registry=reg,
            ),
            eval_verdicts=Counter(
                "loopline_eval_verdicts",
                "Eval verdicts counted (eval results and online verdicts), by suite.",
                ["loop", "suite", "passed"],
                registry=reg,
            ),
            latency=latency,
            eval_candidates=Counter(
                "loopline_eval_candidates",
                "Resolved cases sampled for review, by reason (a case counts for each reason).",
                ["loop", "reason"],
                registry=reg,
            ),
            consumer_lag=Gauge(
                "loopline_consumer_lag_messages",
                "Messages on the partition past this worker's fetch position (its end offset, "
                "asked of the broker or seen by the last fetch, - position), per assigned "
                "partition of the topics it consumes.",
                ["topic", "partition"],
                registry=reg,
            ),
            evicted_cases=Counter(
                "loopline_evicted_cases",
                "Cases dropped from stage 1's state before their horizon, to keep a partition "
                "under LOOPLINE_MAX_CASES_PER_PARTITION: their later events no longer join.",
                ["loop"],
                registry=reg,
            ),
            records_deleted_unread=Counter(
                "loopline_records_deleted_unread",
                "Records Kafka deleted before this worker read them (retention, or a "
                "delete-records request), found when its fetch offset was reset past them: "
                "their events are counted nowhere.",
                ["topic"],
                registry=reg,
            ),
            restore_remaining=Gauge(
                "loopline_restore_remaining_records",
                "Changelog records this worker still has to read to restore its state, after "
                "a start or a rebalance (0 once restored): a worker restoring counts nothing.",
                registry=reg,
            ),
            numbers=numbers,
            partitions=partitions,
        )

    def count_deleted_unread(self, topic: str, records: int) -> None:
        """Records of ``topic`` Kafka deleted before they were read (pipeline.offsetresets)."""
        self.records_deleted_unread.labels(topic).inc(records)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text exposition, keyed by (sample name, label set)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_sum(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
