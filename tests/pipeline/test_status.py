"""`loopline status` (pipeline.status): its rules and its text; on the broker, the lag past a
transactional producer's markers (and a live one in tests/pipeline/test_redrive.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.settings import Settings
from pipeline.status import (
    GroupStatus,
    Status,
    TopicStatus,
    describe,
    lag_by_topic,
    partition_lags,
    read_status,
    role_of,
)
from pipeline.topics import ensure_topics
from tests.conftest import commit_offsets


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


def test_records_fetched_and_not_processed_count_from_the_first_of_them() -> None:
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    # a: fetched up to 90, its oldest slice still waiting begins at 60: 100 - 60
    # b: nothing waiting there; a slice of a partition not held is left out
    lags = partition_lags({a: 100, b: 50}, {a: 90, b: 50}, {}, {a: 60, TopicPartition("u", 0): 1})
    assert lags == {("t", 0): 40, ("t", 1): 0}


def test_the_text_lists_topics_and_groups_with_their_lag() -> None:
    status = Status(
        "kafka:9092",
        [TopicStatus("loopline.inputs", 4, 1234), TopicStatus("loopline.dlq", 4, 2, 4096)],
        [
            GroupStatus("loopline", "workers", "Stable", 2, {"loopline.inputs": 15}),
            GroupStatus("loopline-dlq-redrive", "dlq redrive", "Empty", 0, {"loopline.dlq": 0}),
        ],
    )
    assert describe(status).splitlines() == [
        "kafka kafka:9092: 2 loopline topics",
        "  topic            partitions       records       deleted",
        "  loopline.inputs           4         1,234             0",
        "  loopline.dlq              4             2         4,096",
        "consumer groups:",
        "  loopline (workers): Stable, 2 members",
        "    loopline.inputs  lag           15",
        "  loopline-dlq-redrive (dlq redrive): Empty, 0 members",
        "    loopline.dlq     lag            0",
    ]
    empty = Status("kafka:9092", [], [])
    assert describe(empty).splitlines()[-1].startswith("no consumer group of this deployment")


@pytest.mark.broker
async def test_the_lag_of_a_group_that_read_every_transaction_is_zero(
    make_settings: Callable[..., Settings],
) -> None:
    """Partition 0 of the inputs, as a transactional producer leaves it: records 0-2 committed
    (marker 3), 4-5 aborted (marker 6), 7-9 committed (marker 10); end 11. A group that read
    it all commits 10 (the last record + 1, as Faust does): lag 0, where counting from the
    committed offset said 1 for good. One that committed 3 reads 7 next: lag 11 - 7 = 4 (the
    marker after its records counts), not 8. Then 11-12 in a transaction still open (end 13):
    the first group waits on them, lag 2."""
    settings = make_settings()
    await ensure_topics(settings)
    inputs = settings.topic("inputs")
    tp = TopicPartition(inputs, 0)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{settings.app_id}-svc"
    )
    await producer.start()
    try:
        for records, commit in ((3, True), (2, False), (3, True)):
            await producer.begin_transaction()
            for n in range(records):
                await producer.send_and_wait(inputs, b"x%d" % n, partition=0)
            await (producer.commit_transaction() if commit else producer.abort_transaction())
        workers, archive = settings.app_id, f"{settings.app_id}-archive"
        await commit_offsets(settings, workers, {tp: 10})
        await commit_offsets(settings, archive, {tp: 3})

        async def lags() -> dict[str, int]:
            return {g.name: g.lag[inputs] for g in (await read_status(settings)).groups}

        assert await lags() == {workers: 0, archive: 4}

        await producer.begin_transaction()
        for n in range(2):
            await producer.send_and_wait(inputs, b"y%d" % n, partition=0)
        assert await lags() == {workers: 2, archive: 6}  # 13 - 11, and 13 - 7
        await producer.abort_transaction()
    finally:
        await producer.stop()
