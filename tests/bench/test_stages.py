"""bench/stages.py measures the real thing: its batches over partitions give replay's numbers."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice

from bench.stages import Stages, batches, encoded_events
from pipeline.core import CoreConfig
from pipeline.generator import TrafficGenerator
from pipeline.processor import Processor


def test_the_stages_over_partitions_give_replays_snapshot() -> None:
    count = 3_000
    by_partition = encoded_events(count, 4)
    assert sum(len(m) for m in by_partition.values()) == count
    assert all(by_partition.values())  # every partition has events
    stages = Stages(CoreConfig(), 4)
    for offset, (partition, messages) in enumerate(batches(by_partition, 250)):
        stages.apply(partition, messages, offset)
    assert (stages.applied, stages.failed) == (count, 0)

    replay = Processor(CoreConfig())  # the same events, in one stream, in order
    generated = TrafficGenerator(1, datetime(2026, 11, 25, tzinfo=UTC), cases_per_second=200.0)
    newest = 0
    for topic, record in islice(generated, count):
        assert replay.process(topic, record) == "ok"
        newest = max(newest, record["ts"])
    as_of = newest
    expected = replay.snapshot(as_of)
    assert len(expected["loops"]) >= 2, "the events must give numbers for several loops"
    assert stages.view.snapshot(as_of) == expected


def test_batches_take_each_partition_in_turn_in_order() -> None:
    by_partition = {0: [("inputs", b"a"), ("inputs", b"b"), ("inputs", b"c")], 1: [("x", b"d")]}
    assert list(batches(by_partition, 2)) == [
        (0, [("inputs", b"a"), ("inputs", b"b")]),
        (1, [("x", b"d")]),
        (0, [("inputs", b"c")]),
    ]
