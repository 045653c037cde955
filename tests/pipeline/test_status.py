"""`loopline status` (pipeline.status): its rules and its text; a live one is read in
tests/pipeline/test_redrive.py."""

from __future__ import annotations

from aiokafka import TopicPartition

from pipeline.status import (
    GroupStatus,
    Status,
    TopicStatus,
    describe,
    lag_by_topic,
    partition_lags,
    role_of,
)


def test_the_groups_of_this_deployment_are_named_by_their_role() -> None:
    assert role_of("loopline", "loopline") == "workers"
    assert role_of("loopline-archive-3f2a", "loopline") == "archive sink"
    assert role_of("loopline-archive", "loopline") == "archive sink"
    assert role_of("loopline-dlq-redrive", "loopline") == "dlq redrive"
    assert role_of("loopline-other", "loopline") is None
    assert role_of("someone-else", "loopline") is None


def test_lag_counts_past_the_committed_offset_and_a_partition_without_one_whole() -> None:
    a0, a1, b0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)
    ends = {a0: 100, a1: 50, b0: 7}
    starts = {a0: 10, a1: 20, b0: 0}
    # a0: 100 - 90; a1: nothing committed, 50 - 20 from its start; b: not a topic asked for
    assert lag_by_topic(ends, starts, {a0: 90}) == {"a": 40}
    assert lag_by_topic(ends, starts, {a0: 100, a1: 50, b0: 9}) == {"a": 0, "b": 0}


def test_a_partition_without_a_position_or_an_end_is_left_out() -> None:
    a, b, c = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    assert partition_lags({a: 7, b: 3}, {a: 2, b: None, c: 1}, {}) == {("t", 0): 5}
    assert partition_lags({a: 7}, {a: 9}, {a: None}) == {("t", 0): 0}  # an end before a position
    assert partition_lags({a: 7}, {a: 2}, {a: 12}) == {("t", 0): 10}  # the later end counts


def test_the_text_lists_topics_and_groups_with_their_lag() -> None:
    status = Status(
        "kafka:9092",
        [TopicStatus("loopline.inputs", 4, 1234), TopicStatus("loopline.dlq", 4, 2)],
        [
            GroupStatus("loopline", "workers", "Stable", 2, {"loopline.inputs": 15}),
            GroupStatus("loopline-dlq-redrive", "dlq redrive", "Empty", 0, {"loopline.dlq": 0}),
        ],
    )
    assert describe(status).splitlines() == [
        "kafka kafka:9092: 2 loopline topics",
        "  topic            partitions       records",
        "  loopline.inputs           4         1,234",
        "  loopline.dlq              4             2",
        "consumer groups:",
        "  loopline (workers): Stable, 2 members",
        "    loopline.inputs  lag           15",
        "  loopline-dlq-redrive (dlq redrive): Empty, 0 members",
        "    loopline.dlq     lag            0",
    ]
    empty = Status("kafka:9092", [], [])
    assert describe(empty).splitlines()[-1].startswith("no consumer group of this deployment")
