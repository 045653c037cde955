"""The worker's consumer lag (loopline_consumer_lag_messages), with its ends asked of the broker.

A partition's high watermark in the client is only as new as its last fetch, and a stage that
stops taking records (stuck, or behind its topics once its buffer is full) stops its fetches:
measured from it alone, the lag stood still while records piled up, so
LooplineConsumerLagGrowing could not fire for a worker alive but stuck. And the records a
stage's buffer holds (up to 20,000) are fetched but not processed: they count as lag too. How
it all combines: ``pipeline.status.partition_lags``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.exceptions import ConsumerNotStarted

from agents.batches import client_highwater, client_position, unprocessed
from agents.fetch import batch_buffers
from pipeline.status import partition_lags


async def measure(consumer: Any, topics: Collection[str]) -> dict[tuple[str, int], int]:
    """The lag of every partition of ``topics`` a Faust consumer holds now. The end offsets are
    requested on its client's own loop (its thread), not through its method queue, whose two
    workers a request waiting on a broker away would hold; cancelling this cancels it there."""
    thread = consumer._thread
    try:
        client = thread._ensure_consumer()
    except ConsumerNotStarted:  # starting: nothing held yet
        return {}
    held = [tp for tp in client.assignment() if tp.topic in topics]
    if not held or thread.thread_loop.is_closed():  # nothing held, or stopping
        return {}
    request = asyncio.run_coroutine_threadsafe(client.end_offsets(held), thread.thread_loop)
    ends: Mapping[TopicPartition, int] = await asyncio.wrap_future(request)
    buffer_of = batch_buffers(consumer.app)
    buffers = {b for tp in held if (b := buffer_of(tp.topic)) is not None}
    return partition_lags(
        ends,
        {tp: client_position(consumer, tp) for tp in held},
        {tp: client_highwater(consumer, tp) for tp in held},
        unprocessed(consumer, buffers),
    )
