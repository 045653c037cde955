"""The fetch loop's hand-over (agents.fetch), on a real Faust app without a broker: fetched
records of a batch topic go to its buffer in slices, with Faust's read-offset, gap and
generation rules; records of other topics take Faust's own per-message path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.types import TP

from agents import dispatch
from agents.batches import BatchConsumer, batch_topic
from agents.fence import Fence, StallWatch
from agents.fetch import FetchLoop, announce_in_thread, install
from agents.raw import raw_topic
from agents.state import state_table
from pipeline.offsetresets import RESET_MESSAGE, OffsetResets

T0, T1, OTHER = TP("t", 0), TP("t", 1), TP("other", 0)


def run(app: faust.App, coro: Any) -> Any:
    return app.loop.run_until_complete(coro)


def records(tp: TP, *offsets: int) -> list[ConsumerRecord[bytes, bytes]]:
    return [
        ConsumerRecord(tp.topic, tp.partition, o, 1_000 + o, 0, b"k", b"v", None, 1, 1, [])
        for o in offsets
    ]


class Subscribed:
    """The app with a batch subscription of "t" (batches of 2) and a plain one of "other",
    its consumer's per-message callback recorded instead of Faust's conductor."""

    def __init__(self, app: faust.App) -> None:
        self.app: Any = cast(Any, app)
        topic = batch_topic(app, "t")
        self.batches = BatchConsumer(app, topic, self.handle, "test", Fence(app, StallWatch(5.0)))
        self.batches.channel.queue.size = 2
        aiter(raw_topic(app, "other"))
        run(app, self.app.topics._update_indices())
        self.consumer: Any = self.app.consumer
        self.consumer.highwater = lambda tp: 100  # the Kafka client's: it is not started
        self.each: list[tuple[TP, int]] = []

        async def callback(message: Any) -> None:
            self.each.append((message.tp, message.offset))

        self.consumer.callback = callback
        app.flow_control.resume()
        self.loop = FetchLoop(self.consumer)

    async def handle(self, by_partition: dict[int, list[Any]]) -> None:
        raise AssertionError("not taken in these tests")

    def deliver(self, fetched: dict[TP, list[Any]], active: set[TP] | None = None) -> None:
        run(self.app, self.loop.deliver(fetched, active))

    def slices(self) -> list[tuple[TP, list[int], int, int]]:
        """What the buffer holds: each slice's partition, offsets, first offset, generation."""
        queue: Any = self.batches.channel.queue
        return [
            (s.tp, [r.offset for r in s.records], s.first, s.generation_id) for s in queue._queue
        ]


def test_a_fetch_goes_to_the_buffer_in_slices_of_a_batch_at_most(app: faust.App) -> None:
    subscribed = Subscribed(app)
    subscribed.app.consumer_generation_id = 4
    subscribed.deliver({T0: records(T0, 0, 1, 2, 3, 4), T1: records(T1, 7)})
    assert subscribed.slices() == [
        (T0, [0, 1], 0, 4),
        (T0, [2, 3], 2, 4),
        (T0, [4], 4, 4),
        (T1, [7], 7, 4),
    ]
    assert subscribed.loop.read_offset[T0] == 4 and subscribed.loop.read_offset[T1] == 7
    assert subscribed.batches.channel.queue.records == 6
    assert subscribed.each == []  # none went the per-message way


def test_records_before_the_read_offset_are_dropped_and_skipped_ones_covered(
    app: faust.App,
) -> None:
    subscribed = Subscribed(app)
    subscribed.loop.read_offset[T0] = 5  # after a seek: the next offset to read
    subscribed.deliver({T0: records(T0, 3, 4, 5, 6)})
    # Offset 7 was compacted away: the next slice covers it.
    subscribed.deliver({T0: records(T0, 8)})
    assert subscribed.slices() == [(T0, [5, 6], 5, 0), (T0, [8], 7, 0)]
    subscribed.deliver({T0: records(T0, 6, 7)})  # before the read offset: nothing
    assert len(subscribed.slices()) == 2


def test_nothing_is_handed_over_for_inactive_partitions_or_after_a_rebalance(
    app: faust.App,
) -> None:
    subscribed = Subscribed(app)
    subscribed.deliver({T0: records(T0, 0), T1: records(T1, 0)}, active={T1})
    assert [s[0] for s in subscribed.slices()] == [T1]  # T0 is paused or revoked

    subscribed.consumer.flow_active = False  # the consumer stopped its flow: a rebalance
    subscribed.deliver({T0: records(T0, 1)})
    assert len(subscribed.slices()) == 1 and T0 not in subscribed.loop.read_offset


def test_other_topics_take_fausts_per_message_path_in_order(app: faust.App) -> None:
    subscribed = Subscribed(app)
    subscribed.deliver({OTHER: records(OTHER, 0, 1, 2), T0: records(T0, 0)})
    assert subscribed.each == [(OTHER, 0), (OTHER, 1), (OTHER, 2)]
    assert [s[0] for s in subscribed.slices()] == [T0]
    assert subscribed.loop.read_offset[OTHER] == 2


def test_the_worker_installs_it_on_fausts_consumer(app: faust.App) -> None:
    install(app.consumer)
    drain: Any = app.consumer._drain_messages  # type: ignore[attr-defined]
    assert isinstance(drain.__self__, FetchLoop) and drain.__self__.consumer is app.consumer
    fetch_records = cast(Any, app.consumer)._thread._fetch_records
    assert fetch_records.__qualname__ == "announce_in_thread.<locals>.announced"


def test_a_fetch_is_put_whole_and_the_next_waits_for_room(app: faust.App) -> None:
    subscribed = Subscribed(app)
    queue = subscribed.batches.channel.queue
    queue.limit = 3

    async def scenario() -> tuple[bool, int, int]:
        delivering = asyncio.ensure_future(
            subscribed.loop.deliver({T0: records(T0, 0, 1, 2, 3)}, None)
        )
        await asyncio.sleep(0.05)
        held = not delivering.done()  # all 4 records put, beyond the limit of 3
        put = queue.records
        await queue.take()  # a batch of 2: room again
        await asyncio.wait_for(delivering, 1.0)
        return held, put, queue.records

    assert run(app, scenario()) == (True, 4, 2)


def test_a_fetch_is_announced_in_the_consumer_thread_as_the_client_hands_it_over(
    app: faust.App,
) -> None:
    subscribed = Subscribed(app)
    queue = subscribed.batches.channel.queue
    handed = {T0: records(T0, 0, 1), T1: records(T1, 5), OTHER: records(OTHER, 3)}
    client = {T0: 2, T1: 6, OTHER: 4}  # the Kafka client's positions after handing them over
    subscribed.loop.position_of = client.get  # type: ignore[method-assign]

    async def fetch_records(*args: Any, **kwargs: Any) -> dict[TP, list[Any]]:
        return handed  # what Faust's thread gets from the Kafka client

    thread = SimpleNamespace(_fetch_records=fetch_records)
    announce_in_thread(thread, subscribed.loop.fetched)
    assert run(app, thread._fetch_records()) is handed
    # Nothing is in the buffer yet, but no record of the fetch is out of sight of `unread`
    # while it crosses to the fetch loop; the other topic has no buffer.
    assert (queue.newest, queue.records) == ({T0: 1, T1: 5}, 0)
    assert subscribed.batches.unread(T1, 5) and not subscribed.batches.unread(T1, 6)
    assert subscribed.loop.fetched_to == {T0: 2, T1: 6}


def test_messages_handed_over_one_by_one_let_other_tasks_run(app: faust.App) -> None:
    subscribed = Subscribed(app)
    dispatch.install(subscribed.consumer)  # as the worker: a hand-over that need not suspend
    seen: list[int] = []  # how many messages were handed over each time another task ran

    async def scenario() -> None:
        async def watch() -> None:
            while True:
                seen.append(len(subscribed.each))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        await subscribed.loop.deliver({OTHER: records(OTHER, *range(250))}, None)
        watcher.cancel()

    run(app, scenario())
    assert subscribed.each == [(OTHER, n) for n in range(250)]
    assert sorted({n for n in seen if 0 < n < 250}) == [100, 201]  # Faust's: every 100 or so


def test_a_state_tables_changelog_goes_to_its_store_and_its_last_record_faust_s_way(
    app: faust.App,
) -> None:
    table: Any = state_table(app, "partition-state", 4)
    changelog = TP(table.changelog_topic.get_topic_name(), 0)
    recovery: Any = cast(Any, app.tables).recovery
    recovery.add_active(table, changelog)
    recovery.active_offsets[changelog] = -1
    subscribed = Subscribed(app)
    subscribed.loop.read_offset[changelog] = 1  # after a seek: the next offset to read

    subscribed.consumer.flow_active = False  # a rebalance: Faust's path drops them all
    subscribed.deliver({changelog: records(changelog, 0, 1, 2)})
    assert table.data.data == {} and subscribed.each == []

    subscribed.consumer.flow_active = True
    subscribed.deliver({changelog: records(changelog, 0, 1, 2), OTHER: records(OTHER, 5)})
    assert table.data.data == {b"k": b"v"} and recovery.active_offsets[changelog] == 2
    assert subscribed.each == [(changelog, 2), (OTHER, 5)]  # the last one, read already
    assert subscribed.loop.restore.applied[changelog] == 2  # offsets 1 and 2, from the read one


def test_a_fetch_at_the_end_of_a_rebalance_is_put_after_faust_clears_the_buffers(
    app: faust.App,
) -> None:
    subscribed = Subscribed(app)
    queue = subscribed.batches.channel.queue
    subscribed.app.rebalancing = True  # recovery done, stream partitions resumed and seeked

    async def scenario() -> tuple[int, int]:
        delivering = asyncio.ensure_future(subscribed.loop.deliver({T0: records(T0, 0, 1)}, None))
        await asyncio.sleep(0.05)
        held = queue.records  # not put yet: Faust's flow resume would clear it
        app.flow_control.resume()  # what Faust does next: clears the buffers
        subscribed.app.rebalancing = False  # then the rebalance ends
        await asyncio.wait_for(delivering, 1.0)
        return held, queue.records

    assert run(app, scenario()) == (0, 2)
    assert subscribed.slices() == [(T0, [0, 1], 0, 0)]


def test_a_fetch_waiting_for_a_rebalance_to_end_is_dropped_if_another_begins(
    app: faust.App,
) -> None:
    subscribed = Subscribed(app)
    subscribed.app.rebalancing = True

    async def scenario() -> None:
        delivering = asyncio.ensure_future(subscribed.loop.deliver({T0: records(T0, 0)}, None))
        await asyncio.sleep(0.05)
        subscribed.app.consumer_generation_id += 1  # fetched again from the committed offset
        await asyncio.wait_for(delivering, 1.0)

    run(app, scenario())
    assert subscribed.slices() == []


class Client:
    """The Kafka client's positions, as the fetch loop reads them (``FetchLoop.position_of``),
    and its fetches, noted as Faust's consumer thread notes them (``announce_in_thread``)."""

    def __init__(self, subscribed: Subscribed) -> None:
        self.app = subscribed.app
        self.loop = subscribed.loop
        self.positions: dict[TP, int] = {}
        self.loop.position_of = self.positions.get  # type: ignore[method-assign]

    def fetch(self, tp: TP, *offsets: int) -> dict[TP, list[Any]]:
        handed = records(tp, *offsets)
        self.positions[tp] = offsets[-1] + 1
        self.loop.fetched(tp, handed)
        return {tp: handed}

    async def deliver_at_recovery_end(
        self, fetched: dict[TP, list[Any]], meanwhile: Callable[[], None]
    ) -> None:
        """Deliver ``fetched`` at the end of a rebalance's recovery: ``meanwhile`` happens
        while it waits, then Faust resumes its flow (clearing the buffers) and the rebalance
        ends."""
        self.app.rebalancing = True
        delivering = asyncio.ensure_future(self.loop.deliver(fetched, None))
        await asyncio.sleep(0.05)
        meanwhile()
        self.app.flow_control.resume()
        self.app.rebalancing = False
        await asyncio.wait_for(delivering, 1.0)


def test_a_fetch_waiting_for_a_rebalance_to_end_is_dropped_if_its_partition_was_seeked(
    app: faust.App,
) -> None:
    # Fetched from the position the assignment gave, before Faust's recovery seeks the
    # stream partitions to their committed offsets (here 3): the client fetches from there
    # again, and this fetch, put, would have let its last record through once more.
    subscribed = Subscribed(app)
    client = Client(subscribed)

    def perform_seek() -> None:
        client.positions[T0] = 3  # the client's seek, then
        subscribed.consumer._read_offset[T0] = 3  # Faust's read offset

    async def scenario() -> None:
        await client.deliver_at_recovery_end(client.fetch(T0, 3, 4), perform_seek)
        await subscribed.loop.deliver(client.fetch(T0, 3, 4, 5), None)  # fetched again

    run(app, scenario())
    assert subscribed.batches.channel.queue.records == 3
    assert subscribed.slices() == [(T0, [3, 4], 3, 0), (T0, [5], 5, 0)]


def test_a_fetch_after_the_clients_seek_is_kept_when_faust_sets_its_read_offset_later(
    app: faust.App,
) -> None:
    # Faust's recovery seeks the client's partitions one by one, a round trip each, and sets
    # their read offsets once all are done: the client fetched this partition from its new
    # position in between. Nothing fetches those records again; dropped, they were lost
    # (the distributed test's joining worker: 25 partials, a loop's numbers short for good).
    subscribed = Subscribed(app)
    client = Client(subscribed)
    client.positions[T0] = 3  # seeked to the committed offset

    def perform_seek_returns() -> None:
        subscribed.consumer._read_offset[T0] = 3

    async def scenario() -> None:
        await client.deliver_at_recovery_end(client.fetch(T0, 3, 4), perform_seek_returns)
        await subscribed.loop.deliver(client.fetch(T0, 5, 6), None)

    run(app, scenario())
    assert subscribed.slices() == [(T0, [3, 4], 3, 0), (T0, [5, 6], 5, 0)]


def reset_logged(resets: OffsetResets, offset: int, tp: TopicPartition) -> bool:
    """What aiokafka's fetcher logs as it resets ``tp`` (its own format and arguments)."""
    record = logging.LogRecord(
        "aiokafka.consumer.fetcher", logging.INFO, "fetcher.py", 898, RESET_MESSAGE, None, None
    )
    record.args = (offset, tp)  # a tuple of two is read as a mapping by LogRecord's init
    return resets.filter(record)


def test_an_offset_reset_past_deleted_records_is_said_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deleted: list[tuple[str, int]] = []
    resets = OffsetResets(lambda topic, n: deleted.append((topic, n)))
    other = logging.LogRecord("aiokafka", logging.INFO, "x.py", 1, "anything %s", ("x",), None)
    assert resets.filter(other)  # any other line passes
    assert not reset_logged(resets, 100, TopicPartition("t", 0))  # said below instead
    assert not reset_logged(resets, 70, TopicPartition("t", 1))
    resets.fetched(OTHER, 5)  # another partition: nothing to say
    with caplog.at_level(logging.WARNING, logger="pipeline.offsetresets"):
        resets.fetched(T0, 150)  # offsets 100-149 were deleted unread
        resets.fetched(T0, 151)  # said once: the next fetch is no reset
        resets.fetched(T1, 40)  # 70 was past the end: 40-69 are read again
    assert deleted == [("t", 50)]
    assert [r.getMessage() for r in caplog.records] == [
        "t[0]: 50 records (offsets 100-149) were deleted by Kafka before this process read them "
        "(retention, or records deleted): their events are counted nowhere; reading on from "
        "offset 150",
        "t[1]: offset 70 is past the partition's end (the topic made anew, or its log cut "
        "back): reading again from offset 40; copies within the dedupe horizon count once",
    ]
    assert resets.reset_from == {}
    assert not reset_logged(resets, 7, TopicPartition("t", 0))
    resets.fetched(T0, 7)  # reset to where it was: nothing skipped, nothing said
    assert not reset_logged(resets, 9, TopicPartition("t", 0))
    resets.forget({T0})  # revoked before its next record: back later, it is read from a commit
    resets.fetched(T0, 500)
    assert deleted == [("t", 50)] and len(caplog.records) == 2


def test_records_deleted_after_a_lagging_commit_count_from_what_the_state_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The committed offset (where the reset starts) was behind the checkpoint: the records
    between were counted, so only those past the checkpoint were lost."""
    deleted: list[tuple[str, int]] = []
    checkpoints = {("t", 0): 130, ("t", 1): 180}  # next offset not yet in the state
    resets = OffsetResets(
        lambda topic, n: deleted.append((topic, n)),
        lambda topic, partition: checkpoints.get((topic, partition)),
    )
    for partition, committed in ((0, 100), (1, 100), (2, 100)):
        assert not reset_logged(resets, committed, TopicPartition("t", partition))
    with caplog.at_level(logging.INFO, logger="pipeline.offsetresets"):
        resets.fetched(T0, 150)  # 100-129 applied, 130-149 lost
        resets.fetched(T1, 150)  # 100-149 applied already: none lost
        resets.fetched(TopicPartition("t", 2), 150)  # no checkpoint: 100-149 lost
    assert deleted == [("t", 20), ("t", 50)]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "t[0]: 20 records (offsets 130-149) were deleted by Kafka before this process read "
            "them (retention, or records deleted): their events are counted nowhere; reading "
            "on from offset 150",
        ),
        (
            logging.INFO,
            "t[1]: the records Kafka deleted up to offset 149 had all been applied (the "
            "committed offset 100 was behind the checkpoint); reading on",
        ),
        (
            logging.WARNING,
            "t[2]: 50 records (offsets 100-149) were deleted by Kafka before this process read "
            "them (retention, or records deleted): their events are counted nowhere; reading "
            "on from offset 150",
        ),
    ]


def test_a_checkpoint_that_cannot_be_read_counts_the_loss_from_the_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lookup runs in the Kafka client's fetch: its error is logged, never raised."""
    deleted: list[tuple[str, int]] = []

    def unreadable(topic: str, partition: int) -> int | None:
        raise ValueError("a marker of a newer format")

    resets = OffsetResets(lambda topic, n: deleted.append((topic, n)), unreadable)
    assert not reset_logged(resets, 100, TopicPartition("t", 0))
    with caplog.at_level(logging.WARNING, logger="pipeline.offsetresets"):
        resets.fetched(T0, 150)
    assert deleted == [("t", 50)]
    assert [r.getMessage() for r in caplog.records] == [
        "t[0]: the state's checkpointed offset is unreadable",
        "t[0]: 50 records (offsets 100-149) were deleted by Kafka before this process read them "
        "(retention, or records deleted): their events are counted nowhere; reading on from "
        "offset 150",
    ]
