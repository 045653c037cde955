"""Every stream partition seeked at the end of a rebalance, also one its group never committed.

Records the worker fetched but did not process before a rebalance ended (its buffers are
cleared, a fetch of a partition still paused is dropped, a slice of the old generation is
left unprocessed: agents.fetch, agents.batches) are fetched again only because Faust seeks
every stream partition to its committed offset once its recovery is done
(``Consumer.perform_seek``). aiokafka's ``seek_to_committed`` seeks only partitions whose
committed offset is above 0 (aio-libs/aiokafka#1003): one its group had not committed yet
kept the client's position past the dropped records, and they were counted nowhere. Seen in
tests/agents/test_distributed.py, a worker joining within the first's commit interval: 74
resolutions, or 9 eval verdicts, of a partition the first worker kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiokafka.structs import TopicPartition


async def seek_to_committed(
    client: Any, is_stream: Callable[[str], bool]
) -> Mapping[TopicPartition, int | None]:
    """aiokafka's ``seek_to_committed``, and then each assigned partition of a stream topic
    (``is_stream``) that it left where it was: one committed at 0 to 0, one never committed to
    its beginning (the worker's consumer resets to "earliest", pipeline.app, so that is where
    its group began). The changelogs' partitions are left to Faust's recovery."""
    committed: Mapping[TopicPartition, int | None] = await client.seek_to_committed()
    never = []
    for tp, offset in committed.items():
        if not is_stream(tp.topic):
            continue
        if offset == 0:
            client.seek(tp, 0)
        elif offset is None:
            never.append(tp)
    if never:
        await client.seek_to_beginning(*never)
    return committed


def install(consumer: Any) -> None:
    """Give Faust's ``consumer`` (before it starts) the seek above, in its client's thread."""
    thread, tables = consumer._thread, consumer.app.tables

    async def seek() -> Mapping[TopicPartition, int | None]:
        changelogs = tables.changelog_topics  # a set made anew at each call

        def is_stream(topic: str) -> bool:
            return topic not in changelogs

        client = thread._ensure_consumer()
        seeked: Mapping[TopicPartition, int | None]
        seeked = await thread.call_thread(seek_to_committed, client, is_stream)
        return seeked

    thread.seek_to_committed = seek
