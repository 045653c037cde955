"""The worker's consumer lag (loopline_consumer_lag_messages), from end offsets asked of the broker.

A partition's high watermark in the client is only as new as its last fetch, and a stage that
stops taking records (stuck, or behind its topics once its buffer is full) stops its fetches:
measured from it alone, the lag stood still while records piled up, so
LooplineConsumerLagGrowing could not fire for a worker alive but stuck. The broker's end offset
is asked at each measure; for a read_committed consumer that is the last stable offset, which a
transaction left open holds back while records pile up behind it, which the client's fetches
still see (they bring the log's end): the lag is counted to the later of the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.exceptions import ConsumerNotStarted

from agents.batches import client_highwater, client_position

#: (topic, partition as a label) -> messages past the consumer's position.
Lags = dict[tuple[str, str], int]


def lags_of(
    ends: Mapping[TopicPartition, int],
    positions: Mapping[Any, int | None],
    fetched_ends: Mapping[Any, int | None],
) -> Lags:
    """Each partition's end (the later of the broker's answer and the log end the last fetch
    saw) minus its position; a partition without a position or an answer is left out."""
    lags: Lags = {}
    for tp, position in positions.items():
        if position is not None and tp in ends:
            end = max(ends[tp], fetched_ends.get(tp) or 0)
            lags[(tp.topic, str(tp.partition))] = max(end - position, 0)
    return lags


async def measure(consumer: Any, topics: Collection[str]) -> Lags:
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
    return lags_of(
        ends,
        {tp: client_position(consumer, tp) for tp in held},
        {tp: client_highwater(consumer, tp) for tp in held},
    )
