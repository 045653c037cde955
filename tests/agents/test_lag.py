"""The worker's consumer lag (agents.lag) on the real broker: it grows while the consumer takes
nothing, which the client's high watermark does not show, and a transaction's marker is no lag.
(The worker's wiring of it: tests/agents/test_ingest.py, the lag of the stages' topics.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents.lag import lags_of
from pipeline.settings import Settings

pytestmark = pytest.mark.broker


async def _read_all(consumer: AIOKafkaConsumer, tps: list[TopicPartition], ends: list[int]) -> None:
    async with asyncio.timeout(30):
        while [await consumer.position(tp) for tp in tps] != ends:
            await consumer.getmany(timeout_ms=200)


async def _stuck_then_more(settings: Settings) -> dict[str, object]:
    stream, txn = settings.topic("stream"), settings.topic("txn")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(stream, 2, 1), NewTopic(txn, 1, 1)])
    finally:
        await admin.close()
    tps = [TopicPartition(stream, 0), TopicPartition(stream, 1), TopicPartition(txn, 0)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    transactional = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{settings.app_id}-txn"
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the worker reads
    )
    await producer.start()
    await transactional.start()
    await consumer.start()
    try:
        for tp in tps[:2]:
            for i in range(10):
                await producer.send(tp.topic, b"%d" % i, partition=tp.partition)
        await producer.flush()
        async with transactional.transaction():
            for i in range(10):
                await transactional.send(txn, b"%d" % i, partition=0)
        consumer.assign(tps)
        await _read_all(consumer, tps, [10, 10, 11])  # the transaction's marker is offset 10
        caught_up = lags_of(await consumer.end_offsets(tps), {tp: 10 for tp in tps})
        caught_up_past_marker = lags_of(
            await consumer.end_offsets(tps), {tp: await consumer.position(tp) for tp in tps}
        )
        # The consumer now takes nothing (a stuck stage) while five more records come, and
        # five more once the client has fetched those into its buffer (it fetches a partition
        # again only when what it holds of it is taken).
        for burst in range(2):
            for i in range(5):
                await producer.send(stream, b"%d.%d" % (burst, i), partition=0)
            await producer.flush()
            for _ in range(100 if burst == 0 else 0):  # the client fetches the first five
                if consumer.highwater(tps[0]) == 15:
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # time enough for a fetch, were one made
        return {
            "last record + 1": caught_up,
            "position": caught_up_past_marker,
            "stuck": lags_of(
                await consumer.end_offsets(tps), {tp: await consumer.position(tp) for tp in tps}
            ),
            "high watermark, stuck": consumer.highwater(tps[0]),
        }
    finally:
        await consumer.stop()
        await transactional.stop()
        await producer.stop()


def test_the_lag_grows_while_nothing_is_taken_and_a_marker_is_no_lag(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    stream, txn = settings.topic("stream"), settings.topic("txn")
    seen = asyncio.run(_stuck_then_more(settings))
    # Counted from the last record read, the transaction's marker would be a lag for good.
    assert seen["last record + 1"] == {(stream, "0"): 0, (stream, "1"): 0, (txn, "0"): 1}
    assert seen["position"] == {(stream, "0"): 0, (stream, "1"): 0, (txn, "0"): 0}
    assert seen["stuck"] == {(stream, "0"): 10, (stream, "1"): 0, (txn, "0"): 0}
    # What the metric was measured from before: the client's watermark of its last fetch,
    # which stands still while nothing is taken (15 - 10: half the lag).
    assert seen["high watermark, stuck"] == 15


def test_a_partition_without_a_position_or_an_end_is_left_out() -> None:
    a, b, c = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    assert lags_of({a: 7, b: 3}, {a: 2, b: None, c: 1}) == {("t", "0"): 5}
    assert lags_of({a: 7}, {a: 9}) == {("t", "0"): 0}  # an end read before a later position
