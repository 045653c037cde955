"""A sink's own metrics, for Prometheus: whether it keeps up with its topics and writes.

The sink runner (sinks.runner) counts into them; ``serve`` puts them on /metrics of a port of
their own (the archive's: LOOPLINE_ARCHIVE_METRICS_PORT), so that an archive that stopped, fell
behind or cannot write pages someone (deploy/prometheus/rules.yml, LooplineArchive*). Every
series carries ``sink``, the sink's name, so that one dashboard serves any sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: (topic, partition) -> messages not yet read (the partition's end minus the next offset).
Lags = Mapping[tuple[str, int], int]


class LagCollector(Collector):
    """loopline_sink_consumer_lag_messages of the partitions the sink holds now: ``lags`` is
    replaced whole by the runner (a partition it no longer holds is not its lag), and read
    whole by the scrape, in the server's thread."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.lags: Lags = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "loopline_sink_consumer_lag_messages",
            "Messages of each partition the sink holds that it has not read yet",
            labels=["sink", "topic", "partition"],
        )
        for (topic, partition), lag in sorted(self.lags.items()):
            family.add_metric([self.sink, topic, str(partition)], lag)
        yield family


@dataclass
class SinkMetrics:
    """The counters and gauges of one sink, in a registry of their own."""

    sink: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["sink"]
        self.records = Counter(
            "loopline_sink_records",
            "Records read from Kafka, by topic",
            [*labels, "topic"],
            registry=self.registry,
        )
        self.batches = Counter(
            "loopline_sink_batches", "Batches written durably", labels, registry=self.registry
        )
        self.dead_letters = Counter(
            "loopline_sink_dead_letters",
            "Records the sink could not decode or write, by topic and reason",
            [*labels, "topic", "reason"],
            registry=self.registry,
        )
        self.backpressure = Counter(
            "loopline_sink_backpressure",
            "Writes the destination refused for now (locked, full): retried later",
            labels,
            registry=self.registry,
        )
        self.deleted_unread = Counter(
            "loopline_sink_records_deleted_unread",
            "Records Kafka deleted (retention) before the sink read them",
            [*labels, "topic"],
            registry=self.registry,
        )
        self.last_write = Gauge(
            "loopline_sink_last_write_timestamp_seconds",
            "When the sink last wrote a batch durably (0: not yet since it started)",
            labels,
            registry=self.registry,
        )
        self.buffered = Gauge(
            "loopline_sink_rows_buffered",
            "Rows read and not yet written",
            labels,
            registry=self.registry,
        )
        self.lag = LagCollector(self.sink)
        self.registry.register(self.lag)
        self.last_write.labels(self.sink).set(0)
        self.batches.labels(self.sink)  # exported at 0 from the start
        self.backpressure.labels(self.sink)

    def measure(self, lags: Lags, buffered: int) -> None:
        """The runner's lag and buffered rows as of now (set in its event loop, not read from
        it by the scrape's thread)."""
        self.lag.lags = lags
        self.buffered.labels(self.sink).set(buffered)


def serve(metrics: SinkMetrics, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics on ``host:port`` in a thread; returns what stops it."""
    server: Any
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
