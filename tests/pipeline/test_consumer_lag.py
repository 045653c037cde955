"""The consumers' lag (pipeline.status.partition_lags: the worker's, agents.lag, and the
archive sink's) against a real consumer: it grows while the consumer takes nothing, which the
client's high watermark alone does not show; the records behind a transaction still open count,
a committed transaction's marker does not. (The worker's wiring of it:
tests/agents/test_ingest.py, the lag of the stages' topics.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.settings import Settings
from pipeline.status import partition_lags
from tests.conftest import create_topics

pytestmark = pytest.mark.broker


Lags = dict[tuple[str, int], int]


async def _lags(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> tuple[Lags, Lags]:
    """(the lag as partition_lags counts it, and from the broker's last stable offsets alone)"""
    ends = await consumer.end_offsets(tps)
    positions = {tp: await consumer.position(tp) for tp in tps}
    return (
        partition_lags(ends, positions, {tp: consumer.highwater(tp) for tp in tps}),
        partition_lags(ends, positions, {}),
    )


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


async def _scenario(settings: Settings) -> dict[str, object]:
    stream, txn, open_ = (settings.topic(t) for t in ("stream", "txn", "open"))
    await create_topics(settings, {"stream": 1, "txn": 1, "open": 1})
    tps = [TopicPartition(t, 0) for t in (stream, txn, open_)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    committing, pending = (
        AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            transactional_id=f"{settings.app_id}-{name}",
        )
        for name in ("committing", "pending")
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the worker reads
    )
    for client in (producer, committing, pending, consumer):
        await client.start()
    try:
        for i in range(10):
            await producer.send(stream, b"%d" % i)
        await producer.flush()
        async with committing.transaction():
            for i in range(10):
                await committing.send(txn, b"%d" % i)
        await pending.begin_transaction()  # left open for the rest of the test
        for i in range(5):
            await pending.send(open_, b"%d" % i)
        await pending.flush()
        consumer.assign(tps)
        async with asyncio.timeout(30):  # past the marker (offset 10); nothing of the open one
            while [await consumer.position(tp) for tp in tps] != [10, 11, 0]:
                await consumer.getmany(timeout_ms=200)
        await _until(lambda: consumer.highwater(tps[2]) == 5)  # what its fetches see
        caught_up = await _lags(consumer, tps)
        # The consumer now takes nothing (a stuck stage) while five more records come, and
        # five more once the client has fetched those into its buffer (it fetches a partition
        # again only when what it holds of it is taken).
        for burst in range(2):
            for i in range(5):
                await producer.send(stream, b"%d.%d" % (burst, i))
            await producer.flush()
            if burst == 0:
                await _until(lambda: consumer.highwater(tps[0]) == 15)
        await asyncio.sleep(1)  # time enough for a fetch, were one made
        return {
            "caught up": caught_up,
            "stuck": await _lags(consumer, tps),
            "high watermark, stuck": consumer.highwater(tps[0]),
        }
    finally:
        await pending.abort_transaction()
        for client in (consumer, pending, committing, producer):
            await client.stop()


def test_the_lag_grows_while_nothing_is_taken_and_counts_an_open_transaction(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    stream, txn, open_ = (settings.topic(t) for t in ("stream", "txn", "open"))
    seen = asyncio.run(_scenario(settings))
    # The committed transaction's marker is no lag; the five records of the one still open
    # are (the consumer waits on them), though the broker's last stable offset is before them.
    assert seen["caught up"] == (
        {(stream, 0): 0, (txn, 0): 0, (open_, 0): 5},
        {(stream, 0): 0, (txn, 0): 0, (open_, 0): 0},
    )
    lag, from_the_broker_alone = seen["stuck"]  # type: ignore[misc]
    assert lag == {(stream, 0): 10, (txn, 0): 0, (open_, 0): 5}
    assert from_the_broker_alone[(stream, 0)] == 10
    # What the metric was measured from before: the client's watermark of its last fetch,
    # which stands still while nothing is taken (15 - 10: half the lag).
    assert seen["high watermark, stuck"] == 15
