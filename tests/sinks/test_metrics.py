"""The sink's own metrics (sinks.metrics) as Prometheus reads them; a live archive sink's are
checked in tests/sinks/test_archive_sink.py."""

from __future__ import annotations

from prometheus_client import generate_latest

from pipeline.metrics import parse_exposition
from sinks.metrics import SinkMetrics


def _samples(metrics: SinkMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse_exposition(generate_latest(metrics.registry).decode())


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_a_new_sink_exports_no_write_yet_and_zero_counts() -> None:
    samples = _samples(SinkMetrics("archive"))
    assert samples[_key("loopline_sink_last_write_timestamp_seconds", sink="archive")] == 0
    assert samples[_key("loopline_sink_batches_total", sink="archive")] == 0
    assert samples[_key("loopline_sink_backpressure_total", sink="archive")] == 0
    assert not [name for name, _ in samples if name == "loopline_sink_consumer_lag_messages"]


def test_the_lag_is_of_the_partitions_held_as_last_measured() -> None:
    metrics = SinkMetrics("archive")
    metrics.measure({("loopline.inputs", 0): 5, ("loopline.inputs", 1): 0}, 7)
    lag = "loopline_sink_consumer_lag_messages"
    samples = _samples(metrics)
    assert samples[_key(lag, sink="archive", topic="loopline.inputs", partition="0")] == 5
    assert samples[_key(lag, sink="archive", topic="loopline.inputs", partition="1")] == 0
    assert samples[_key("loopline_sink_rows_buffered", sink="archive")] == 7
    metrics.measure({("loopline.inputs", 1): 2}, 0)  # partition 0 went to another sink
    samples = _samples(metrics)
    assert [labels for name, labels in samples if name == lag] == [
        _key(lag, sink="archive", topic="loopline.inputs", partition="1")[1]
    ]
