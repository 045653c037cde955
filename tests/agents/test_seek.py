"""The end-of-rebalance seek (agents.seek) on the real broker: every stream partition goes back
to where its group's processing stands, also one committed at 0 or never committed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from agents.seek import seek_to_committed
from pipeline.settings import Settings
from tests.conftest import create_topics

pytestmark = pytest.mark.broker
RECORDS = 10  # in every partition


async def _positions_after_seek(settings: Settings, patched: bool) -> Mapping[str, int]:
    """A consumer of the group that read every record of ``stream`` (committed at 4 in
    partition 0, at 0 in partition 1, never in partition 2) and of ``changelog`` (never
    committed), then seeks to committed: its positions, by "topic[partition]"."""
    stream, changelog = settings.topic("stream"), settings.topic("changelog")
    await create_topics(settings, {"stream": 3, "changelog": 1})
    tps = [TopicPartition(stream, p) for p in range(3)] + [TopicPartition(changelog, 0)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for tp in tps:
            for i in range(RECORDS):
                await producer.send(tp.topic, b"%d" % i, partition=tp.partition)
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.app_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.commit({tps[0]: OffsetAndMetadata(4, ""), tps[1]: OffsetAndMetadata(0, "")})
        async with asyncio.timeout(30):
            while [await consumer.position(tp) for tp in tps] != [RECORDS] * len(tps):
                await consumer.getmany(timeout_ms=200)
        if patched:
            await seek_to_committed(consumer, lambda topic: topic == stream)
        else:
            await consumer.seek_to_committed()
        names = {stream: "stream", changelog: "changelog"}
        return {f"{names[tp.topic]}[{tp.partition}]": await consumer.position(tp) for tp in tps}
    finally:
        await consumer.stop()


def test_every_stream_partition_goes_back_to_its_committed_offset_or_its_beginning(
    make_settings: Callable[..., Settings],
) -> None:
    positions = asyncio.run(_positions_after_seek(make_settings(), patched=True))
    assert positions == {"stream[0]": 4, "stream[1]": 0, "stream[2]": 0, "changelog[0]": RECORDS}


def test_aiokafka_alone_leaves_partitions_committed_at_0_or_never_where_they_were(
    make_settings: Callable[..., Settings],
) -> None:
    # aio-libs/aiokafka#1003: what agents.seek mends (should aiokafka mend it, this says so).
    positions = asyncio.run(_positions_after_seek(make_settings(), patched=False))
    assert positions == {
        "stream[0]": 4,
        "stream[1]": RECORDS,
        "stream[2]": RECORDS,
        "changelog[0]": RECORDS,
    }
