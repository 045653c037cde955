"""Many records sent as record batches, one per partition, instead of a send per record.

aiokafka's ``send`` costs a future, a partitioner call and an accumulator lookup per record; a
``BatchBuilder`` takes the records of one partition and goes out with one future. Both stages'
checkpoint records go this way, and stage 1's partials (a few per hundred events), whose sends
were ~4 % of the worker in bench/throughput. Records of one partition keep their order, within a
batch and across batches, as with ``send``."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

Record = tuple[bytes, bytes | None]  # key, value


class Sent(NamedTuple):
    """What ``send_to_partition`` sent: one delivery per record batch, done when the batch is
    durable, and the number of records in the last batch."""

    deliveries: list[asyncio.Future[Any]]
    last_records: int

    def last_offset(self) -> int | None:
        """The offset of the last record sent, once it is durable (None before, or if it
        failed): a batch's delivery gives the offset of its first record."""
        if not self.deliveries:
            return None
        last = self.deliveries[-1]
        if not last.done() or last.cancelled() or last.exception() is not None:
            return None
        return int(last.result().offset) + self.last_records - 1


async def send_to_partition(
    producer: Any, topic: str, partition: int, records: Iterable[Record]
) -> Sent:
    """Send ``records`` to ``partition`` of ``topic`` with aiokafka's ``producer``."""
    deliveries = []
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:  # full
            deliveries.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any
    last_records = batch.record_count()
    if last_records:
        deliveries.append(await producer.send_batch(batch, topic, partition=partition))
    return Sent(deliveries, last_records)


async def send_keyed(
    producer: Any, topic: str, records: Iterable[Record]
) -> list[asyncio.Future[Any]]:
    """Send ``records`` to the partitions ``send`` would pick for their keys (the producer's
    own partitioner), so a key's records land where they always did."""
    await producer.partitions_for(topic)  # the topic's metadata, for the partitioner
    by_partition: dict[int, list[Record]] = defaultdict(list)
    partition_of: dict[bytes, int] = {}  # the partitioner hashes in Python; keys repeat
    for key, value in records:
        partition = partition_of.get(key)
        if partition is None:
            partition = partition_of[key] = producer._partition(topic, None, key, value, key, value)
        by_partition[partition].append((key, value))
    deliveries = []
    for partition, grouped in by_partition.items():
        deliveries += (await send_to_partition(producer, topic, partition, grouped)).deliveries
    return deliveries
