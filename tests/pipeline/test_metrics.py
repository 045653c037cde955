"""The worker's registry (pipeline.metrics): stage 1's state per partition read at scrape
time, and the process's own metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.metrics import LATENCY_BUCKETS, PartitionState, PipelineMetrics, parse_exposition


def by_partition(metrics: PipelineMetrics, name: str) -> dict[str, float]:
    samples = parse_exposition(metrics.exposition().decode())
    return {dict(labels)["partition"]: v for (n, labels), v in samples.items() if n == name}


def test_stage_ones_state_is_read_per_partition_at_each_scrape() -> None:
    metrics = PipelineMetrics.create()
    assert by_partition(metrics, "loopline_held_cases") == {}  # nothing watched yet
    assert b"# TYPE loopline_held_cases gauge" in metrics.exposition()
    assert b"# TYPE loopline_watermark_seconds gauge" in metrics.exposition()
    states = {0: PartitionState(3, 1_795_597_200_500), 2: PartitionState(5, 0)}
    metrics.partitions.watch(lambda: states)
    assert by_partition(metrics, "loopline_held_cases") == {"0": 3.0, "2": 5.0}
    # Epoch seconds; a partition without events yet has no watermark to show.
    assert by_partition(metrics, "loopline_watermark_seconds") == {"0": 1_795_597_200.5}
    states[1] = PartitionState(7, 1_795_597_260_000)  # assigned since
    del states[0]  # revoked
    assert by_partition(metrics, "loopline_held_cases") == {"1": 7.0, "2": 5.0}
    assert by_partition(metrics, "loopline_watermark_seconds") == {"1": 1_795_597_260.0}


def test_the_process_metrics_are_on_the_workers_registry() -> None:
    samples = parse_exposition(PipelineMetrics.create().exposition().decode())
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert samples[("process_resident_memory_bytes", frozenset())] > 0


def test_the_latency_histogram_exposes_what_prometheus_clients_histogram_would() -> None:
    """The lock-free histogram against the library's own (the reference), values on the
    bucket bounds included: a value equal to a bound counts in that bound's bucket."""
    seconds = [0.0, 0.5, 0.50001, 1.0, 2.0, 59.9, 60.0, 86_400.0, 86_400.5, 3.25e6, 7.5]
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "loopline_resolution_latency_seconds",
        "Seconds from a case's first input to its resolution.",
        ["loop"],
        buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )
    metrics = PipelineMetrics.create()
    for n, value in enumerate(seconds):
        loop = "refunds" if n % 3 else "triage"
        reference.labels(loop).observe(value)
        metrics.latency.observe(loop, value)
    ours = parse_exposition(metrics.exposition().decode())
    expected = parse_exposition(generate_latest(reference_registry).decode())
    histogram = {
        k: v for k, v in ours.items() if k[0].startswith("loopline_resolution_latency_seconds")
    }
    assert histogram == {k: v for k, v in expected.items() if not k[0].endswith("_created")}
    # Hand-checked: triage has 0.0, 1.0, 60.0 and 3.25e6 (n = 0, 3, 6, 9), three up to 60 s.
    triage = frozenset({("loop", "triage"), ("le", "60.0")})
    assert ours[("loopline_resolution_latency_seconds_bucket", triage)] == 3
    assert ours[("loopline_resolution_latency_seconds_count", frozenset({("loop", "triage")}))] == 4
