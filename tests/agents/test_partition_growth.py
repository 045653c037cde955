"""An operator adds partitions to the source topics of a running deployment: the worker goes
on with them (before, every batch of a new partition failed, a crash loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import (
    LOOP_STATE,
    PARTITION_STATE,
    SOURCE_TOPICS,
    changelog_topic,
    ensure_topics,
    key_of,
)
from tests.agents.test_distributed import Events, _traffic, _wait_exact
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, wait_for

pytestmark = pytest.mark.broker


async def _add_partitions(settings: Settings, topics: list[str], total: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total) for topic in topics})
    finally:
        await admin.close()


async def _partition_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(topics)}
    finally:
        await admin.close()


def _by_first_appearance(events: Events, cut: int) -> tuple[Events, Events]:
    """The events of the keys (cases) first seen before ``cut``, and those of the others: no
    case is split between the two (the cases open when partitions are added are split, by
    design of Kafka's partitioning, README)."""
    early = {key_of(t, r) for t, r in events[:cut]}
    first = [(t, r) for t, r in events if key_of(t, r) in early]
    return first, [(t, r) for t, r in events if key_of(t, r) not in early]


def test_a_worker_goes_on_after_partitions_are_added_to_the_source_topics(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    settings = make_settings()  # LOOPLINE_PARTITIONS 4
    first, second = _by_first_appearance(_traffic(47, 10_000), 5000)
    asyncio.run(_publish(settings, first))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs") >= 1000, 120, "the worker to be midway")
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
    sources = [settings.topic(t) for t in SOURCE_TOPICS]
    asyncio.run(_add_partitions(settings, sources, 6))
    changelogs = [changelog_topic(settings, t) for t in (PARTITION_STATE, LOOP_STATE)]
    ensured = asyncio.run(ensure_topics(settings))  # as `loopline topics` or a worker does
    assert (ensured.grown, ensured.partitions) == ([changelogs[0]], 6)
    assert ensured.describe() == f"all exist; partitions added to {changelogs[0]}"
    asyncio.run(_publish(settings, second))  # cases new to the deployment: in all 6
    assert {p for p in range(6)} <= _written(settings, settings.topic("inputs"))

    restarted = start_worker(settings)  # still LOOPLINE_PARTITIONS 4: it goes by the topics
    _wait_exact(settings, first + second, [restarted])
    assert asyncio.run(_partition_counts(settings, changelogs)) == {
        changelogs[0]: 6,  # stage 1 checkpoints each source partition's state in its own
        changelogs[1]: 4,  # stage 2 reads partials, which kept its 4
    }
    assert "the source topics have 6 partitions, LOOPLINE_PARTITIONS says 4" in restarted.log()


def test_a_running_worker_takes_the_partitions_added_to_the_source_topics(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    """Partitions added while the worker runs, and nothing else done: the worker used to
    notice them after Faust's 5-minute metadata refresh and then stop at its first batch of a
    new partition (its changelog had none); now it takes them within half a minute, gives
    its changelog the partitions, and goes on, the same process."""
    settings = make_settings()  # LOOPLINE_PARTITIONS 4
    first, second = _by_first_appearance(_traffic(59, 10_000), 5000)
    asyncio.run(_publish(settings, first))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs") >= 1000, 120, "the worker to be midway")
    sources = [settings.topic(t) for t in SOURCE_TOPICS]
    asyncio.run(_add_partitions(settings, sources, 6))
    asyncio.run(_publish_only(settings, second))  # no `loopline topics` in between
    assert {p for p in range(6)} <= _written(settings, settings.topic("inputs"))

    _wait_exact(settings, first + second, [worker])  # it asserts the worker never exited
    changelogs = [changelog_topic(settings, t) for t in (PARTITION_STATE, LOOP_STATE)]
    assert asyncio.run(_partition_counts(settings, changelogs)) == {
        changelogs[0]: 6,
        changelogs[1]: 4,
    }
    grown = f"{changelogs[0]} has no partition [45] yet; topics: all exist; partitions added to "
    assert re.search(grown + re.escape(changelogs[0]), worker.log())


async def _publish_only(settings: Settings, events: Events) -> None:
    async with Publisher(settings) as publisher:
        for topic, record in events:
            await publisher.publish(topic, record)


def _written(settings: Settings, topic: str) -> set[int]:
    async def ends() -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
        await consumer.start()
        try:
            return await consumer.end_offsets([TopicPartition(topic, p) for p in range(6)])
        finally:
            await consumer.stop()

    return {tp.partition for tp, end in asyncio.run(ends()).items() if end > 0}


def test_a_worker_goes_by_the_topics_partition_count_over_its_setting(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    """Topics made with 6 partitions (by hand, or `loopline topics` with another setting) and
    a worker left at LOOPLINE_PARTITIONS 4: Faust would make the state changelogs it lacks
    with 4 partitions, and the batches of partitions 4 and 5 would fail."""
    made = make_settings(partitions=6)
    asyncio.run(_publish(made, _traffic(53, 4000)))  # creates the topics, with 6 partitions
    settings = dataclasses.replace(made, partitions=4)
    worker = start_worker(settings)
    _wait_exact(settings, _traffic(53, 4000), [worker])
    changelogs = [changelog_topic(settings, t) for t in (PARTITION_STATE, LOOP_STATE)]
    assert asyncio.run(_partition_counts(settings, changelogs)) == dict.fromkeys(changelogs, 6)
