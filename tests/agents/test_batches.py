"""Batches of fetched slices (agents.batches), on a real Faust app without a broker: the
buffer, batching, rebalance rules and acks."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from agents.batches import BatchConsumer, BatchTopic, FetchBuffer, Fetched, batch_topic
from agents.fence import Fence, Fenced, StallWatch


def run(app: faust.App, coro: Any) -> Any:
    return app.loop.run_until_complete(coro)


def record(partition: int, offset: int, topic: str = "t") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


def fetched(
    partition: int, *offsets: int, generation: int = 0, first: int | None = None
) -> Fetched:
    """A slice of a fetch, as agents.fetch hands it over: from ``first`` (its first offset
    unless said) to its last record's offset."""
    return Fetched(
        TP("t", partition),
        [record(partition, offset) for offset in offsets],
        offsets[0] if first is None else first,
        generation,
    )


def put(buffer: FetchBuffer, *slices: Fetched) -> None:
    for one in slices:
        buffer.put_fetched(one)


def offsets(batch: list[Fetched]) -> list[int]:
    return [r.offset for one in batch for r in one.records]


def buffer(app: faust.App, size: int, within: float, limit: int = 100) -> FetchBuffer:
    return FetchBuffer(limit, flow_control=app.flow_control, size=size, within=within)


def test_a_full_batch_is_taken_without_waiting(app: faust.App) -> None:
    taken = buffer(app, size=3, within=60.0)
    put(taken, *(fetched(0, n) for n in range(5)))
    first = run(app, asyncio.wait_for(taken.take(), 1.0))  # a wait of `within` would time out
    assert offsets(first) == [0, 1, 2]
    assert taken.qsize() == 2 and taken.records == 2


def test_a_batch_takes_whole_slices_up_to_its_size(app: faust.App) -> None:
    taken = buffer(app, size=4, within=0.2)
    put(taken, fetched(0, 0, 1, 2), fetched(1, 5, 6), fetched(0, 3))
    first = run(app, taken.take())
    assert offsets(first) == [0, 1, 2]  # the next slice would make it 5 records
    assert offsets(run(app, taken.take())) == [5, 6, 3]  # 3 of 4 after the window


def test_a_batch_is_what_arrived_within_the_window_of_its_first_slice(app: faust.App) -> None:
    taken = buffer(app, size=100, within=0.2)

    async def scenario() -> list[int]:
        taken.put_fetched(fetched(0, 0, 1))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, put, taken, fetched(0, 2))  # within the window
        loop.call_later(0.5, put, taken, fetched(0, 3))  # after it: the next batch
        return offsets(await taken.take())

    assert run(app, scenario()) == [0, 1, 2]


def test_after_a_full_batch_the_next_one_waits_for_its_window_again(app: faust.App) -> None:
    taken = buffer(app, size=2, within=0.2)

    async def scenario() -> list[list[int]]:
        for n in range(3):
            taken.put_fetched(fetched(0, n))
        full = await taken.take()
        asyncio.get_running_loop().call_later(0.05, put, taken, fetched(0, 3))
        rest = await taken.take()
        return [offsets(full), offsets(rest)]

    assert run(app, scenario()) == [[0, 1], [2, 3]]


def test_a_batch_ends_early_once_it_is_full(app: faust.App) -> None:
    taken = buffer(app, size=3, within=60.0)

    async def scenario() -> list[int]:
        taken.put_fetched(fetched(0, 0))
        asyncio.get_running_loop().call_later(0.05, put, taken, fetched(0, 1, 2))
        return offsets(await asyncio.wait_for(taken.take(), 1.0))

    assert run(app, scenario()) == [0, 1, 2]


def test_a_buffer_beyond_its_limit_has_room_again_once_a_batch_is_taken(app: faust.App) -> None:
    taken = buffer(app, size=2, within=0.0, limit=3)

    async def scenario() -> tuple[bool, bool, int]:
        taken.put_fetched(fetched(0, 0, 1, 2))
        taken.put_fetched(fetched(0, 3))  # a fetch is put whole, beyond the limit too
        waiting = asyncio.ensure_future(taken.room())
        await asyncio.sleep(0.05)
        held = not waiting.done()
        await taken.take()  # takes the first slice: 1 record left
        await asyncio.wait_for(waiting, 1.0)
        return held, waiting.done(), taken.records

    assert run(app, scenario()) == (True, True, 1)


def test_the_subscription_is_fed_by_the_fetch_loop_and_cleared_at_a_rebalance(
    app: faust.App,
) -> None:
    topic = batch_topic(app, "a", "b")
    channel: Any = aiter(topic)
    assert channel in app.topics and tuple(channel.topics) == ("a", "b")
    assert isinstance(channel.queue, FetchBuffer)
    with pytest.raises(RuntimeError, match=r"agents\.fetch"):  # not Faust's conductor
        channel.queue.put_nowait_enhanced(record(1, 7), on_pressure_high=None)
    put(channel.queue, fetched(1, 7))
    app.flow_control.clear()  # as Faust does when partitions are revoked
    assert channel.queue.empty() and channel.queue.records == 0 and not channel.queue.newest


class Recorder:
    """A batch handler that records each batch's offsets by partition, and how many offsets
    Faust's consumer had acked while it was handled (none may be before it returns)."""

    def __init__(self, app: faust.App, fail: bool = False) -> None:
        self.consumer: Any = app.consumer
        self.batches: list[dict[int, list[int]]] = []
        self.acked_while_handled: list[int] = []
        self.fail = fail

    async def __call__(self, by_partition: dict[int, list[Any]]) -> None:
        self.batches.append({p: [r.offset for r in rs] for p, rs in by_partition.items()})
        self.acked_while_handled.append(sum(map(len, self.consumer._acked.values())))
        if self.fail:
            raise RuntimeError("the broker refused the writes")


def consumer_of(app: faust.App, handle: Any) -> BatchConsumer:
    topic = BatchTopic(app, topics=["t"])
    batches = BatchConsumer(app, topic, handle, "test", Fence(app, StallWatch(5.0)))
    conductor: Any = app.topics
    run(app, conductor._update_indices())  # as the worker does when it subscribes
    assert conductor.acks_enabled_for("t")
    return batches


def run_for_a_while(app: faust.App, batches: BatchConsumer) -> None:
    async def scenario() -> None:
        task = asyncio.ensure_future(batches.run())
        await asyncio.sleep(0.5)  # > the batch window
        task.cancel()

    run(app, scenario())


def test_batches_are_grouped_by_partition_and_acked_after_handling(app: faust.App) -> None:
    handle = Recorder(app)
    batches = consumer_of(app, handle)
    app.flow_control.resume()
    slices = [fetched(0, 10, 11), fetched(1, 4, 5), fetched(0, 12)]
    put(batches.channel.queue, *slices)
    run_for_a_while(app, batches)
    assert handle.batches == [{0: [10, 11, 12], 1: [4, 5]}]
    assert handle.acked_while_handled == [0]
    assert all(one.acked for one in slices)
    consumer: Any = app.consumer
    assert not consumer._unacked_messages  # nothing left for a rebalance to wait for
    assert sorted(consumer._acked[TP("t", 0)]) == [10, 11, 12]
    assert consumer._new_offset(TP("t", 0)) == 13 and consumer._new_offset(TP("t", 1)) == 6


def test_a_slice_acks_the_offsets_kafka_skipped_before_its_records_once(app: faust.App) -> None:
    consumer: Any = app.consumer
    consumer_of(app, Recorder(app))
    tp = TP("t", 0)
    consumer._committed_offset[tp] = 11  # the next offset to read
    # Read from offset 9 (before the commit) on; offsets 13 and 14 were compacted away.
    fetched(0, 12, 15, first=9).ack(consumer)
    assert consumer._acked[tp] == [11, 12, 13, 14, 15]  # none below the committed offset
    fetched(0, 15, 16, first=15).ack(consumer)  # 15 was acked already: only 16 is new
    assert consumer._acked[tp] == [11, 12, 13, 14, 15, 16] and consumer._n_acked == 6
    assert consumer._new_offset(tp) == 17  # Faust commits past the skipped ones


def test_slices_of_an_earlier_generation_or_during_a_rebalance_are_not_handled(
    app: faust.App,
) -> None:
    batches = consumer_of(app, Recorder(app))
    cast_app: Any = app
    cast_app.consumer_generation_id = 3
    stale, current = fetched(0, 1, generation=2), fetched(0, 2, generation=3)
    app.flow_control.resume()
    assert batches.fresh([stale, current]) == [current]
    in_hand = cast_app.consumer._unacked_messages
    assert current in in_hand and stale not in in_hand  # what a rebalance waits for
    app.flow_control.suspend()  # a rebalance under way
    assert batches.fresh([fetched(0, 3, generation=3)]) == []


def test_a_failing_batch_stops_the_worker_and_acks_nothing(app: faust.App) -> None:
    handle = Recorder(app, fail=True)
    batches = consumer_of(app, handle)
    crashes: list[BaseException] = []

    async def crash(reason: BaseException) -> None:
        crashes.append(reason)

    app.crash = crash  # type: ignore[method-assign]
    app.flow_control.resume()
    slices = [fetched(0, 1), fetched(0, 2)]
    put(batches.channel.queue, *slices)
    run(app, asyncio.wait_for(batches.run(), 5.0))  # returns after the crash
    assert [str(exc) for exc in crashes] == ["the broker refused the writes"]
    assert handle.batches == [{0: [1, 2]}]
    consumer: Any = app.consumer
    assert not any(one.acked for one in slices) and not consumer._acked
    assert set(consumer._unacked_messages) == set(slices)  # still in hand


def test_a_batch_taken_before_a_rebalance_may_write_nothing(app: faust.App) -> None:
    """Taken in generation 3; a rebalance while it is in hand (Faust's wait for it timed out)
    makes ensure_member refuse, before any write; in the same generation it lets it write."""
    batches = consumer_of(app, Recorder(app))
    cast_app: Any = app
    cast_app.consumer_generation_id = 3
    app.flow_control.resume()
    assert batches.fresh([fetched(0, 1, generation=3)])
    batch = {0: [record(0, 1)]}
    run(app, batches.ensure_member(batch))  # no stall, no rebalance: at once
    cast_app.consumer_generation_id = 4
    with pytest.raises(Fenced, match=r"a rebalance \(generation 3 -> 4\) came while"):
        run(app, batches.ensure_member(batch))


def test_what_is_still_buffered_of_a_partition_is_unread(app: faust.App) -> None:
    batches = consumer_of(app, Recorder(app))
    queue = batches.channel.queue
    put(queue, fetched(0, 10), fetched(1, 4), fetched(0, 11))
    assert queue.newest == {TP("t", 0): 11, TP("t", 1): 4}
    assert batches.unread(TP("t", 0), 11)  # offset 11 is still to be handled
    assert not batches.unread(TP("t", 0), 12)
    assert not batches.unread(TP("t", 1), 5)
    assert not batches.unread(TP("t", 2), 0)  # nothing known: the client is not started
    app.flow_control.clear()  # a rebalance: what was buffered is fetched again
    assert queue.newest == {} and not batches.unread(TP("t", 0), 11)
