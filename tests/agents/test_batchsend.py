"""Record batches per partition (agents.batchsend) against the real broker: every record
once, in order, and a keyed record where ``send`` would have put it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from agents.batchsend import send_keyed, send_to_partition
from pipeline.settings import Settings
from pipeline.topics import ensure_topics


async def read_partitions(settings: Settings, topic: str, partitions: int) -> list[list[bytes]]:
    """Each partition's ``key=value`` records, in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    end = await consumer.end_offsets(tps)
    out: list[list[bytes]] = [[] for _ in tps]
    try:
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                for messages in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    out[tp.partition] += [m.key + b"=" + m.value for m in messages]
    finally:
        await consumer.stop()
    return out


def test_batches_deliver_each_record_once_in_order_where_send_puts_it(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(partitions=4)

    async def scenario() -> tuple[list[list[bytes]], list[list[bytes]]]:
        await ensure_topics(settings)
        # ~1 KB batches, so the records of a partition take several of them
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, max_batch_size=1024
        )
        await producer.start()
        try:
            keyed = [(f"loop-{i % 7}".encode(), b"%03d" % i + b"." * 60) for i in range(120)]
            await asyncio.gather(*await send_keyed(producer, settings.topic("partials"), keyed))
            placed = [(b"k%d" % i, b"%03d" % i + b"." * 60) for i in range(50)]
            sent = await send_to_partition(producer, settings.topic("alerts"), 2, placed)
            assert len(sent.deliveries) > 1  # split into batches
            await asyncio.gather(*sent.deliveries)
            assert sent.last_offset() == 49  # the 50th record of a new partition
        finally:
            await producer.stop()
        return (
            await read_partitions(settings, settings.topic("partials"), 4),
            await read_partitions(settings, settings.topic("alerts"), 4),
        )

    partials, alerts = asyncio.run(scenario())
    # Kafka's default partitioner (Java's): murmur2 of the key, positive, modulo partitions.
    expected: list[list[bytes]] = [[], [], [], []]
    for i in range(120):
        key = f"loop-{i % 7}".encode()
        expected[(murmur2(key) & 0x7FFFFFFF) % 4].append(key + b"=" + b"%03d" % i + b"." * 60)
    assert partials == expected
    assert alerts == [[], [], [b"k%d=%03d" % (i, i) + b"." * 60 for i in range(50)], []]
