"""The worker's registry (pipeline.metrics): held state per partition read at scrape time, and
the process's own metrics."""

from __future__ import annotations

from pipeline.metrics import PipelineMetrics, parse_exposition


def held_samples(metrics: PipelineMetrics) -> dict[str, float]:
    samples = parse_exposition(metrics.exposition().decode())
    return {
        dict(labels)["partition"]: value
        for (name, labels), value in samples.items()
        if name == "loopline_held_cases"
    }


def test_held_cases_are_read_per_partition_at_each_scrape() -> None:
    metrics = PipelineMetrics.create()
    assert held_samples(metrics) == {}  # nothing watched yet: the family, without samples
    assert b"# TYPE loopline_held_cases gauge" in metrics.exposition()
    cases = {0: 3, 2: 5}
    metrics.held.watch(lambda: cases)
    assert held_samples(metrics) == {"0": 3.0, "2": 5.0}
    cases[1] = 7  # a partition assigned since; one revoked goes from the mapping
    del cases[0]
    assert held_samples(metrics) == {"1": 7.0, "2": 5.0}


def test_the_process_metrics_are_on_the_workers_registry() -> None:
    samples = parse_exposition(PipelineMetrics.create().exposition().decode())
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert samples[("process_resident_memory_bytes", frozenset())] > 0
