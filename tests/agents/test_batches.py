"""Batches straight from Faust's consumer (agents.batches), on a real Faust app without a
broker: the hand-over, batching, rebalance rules and acks."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from agents.batches import BatchConsumer, BatchTopic, MessageBuffer, batch_topic


def run(app: faust.App, coro: Any) -> Any:
    return app.loop.run_until_complete(coro)


def message(partition: int, offset: int, generation: int = 0, topic: str = "t") -> ConsumerMessage:
    return ConsumerMessage(
        topic, partition, offset, 0.0, 0, [], b"k", b"v", None, tp=TP(topic, partition),
        generation_id=generation,
    )  # fmt: skip


def put(buffer: MessageBuffer, *messages: ConsumerMessage) -> None:
    for m in messages:  # as the conductor hands them over
        buffer.put_nowait_enhanced(m, on_pressure_high=lambda: None, on_pressure_drop=lambda: None)


def buffer(app: faust.App, size: int, within: float) -> MessageBuffer:
    return MessageBuffer(100, flow_control=app.flow_control, size=size, within=within)


def test_a_full_batch_is_taken_without_waiting(app: faust.App) -> None:
    taken = buffer(app, size=3, within=60.0)
    put(taken, *(message(0, n) for n in range(5)))
    first = run(app, asyncio.wait_for(taken.take(), 1.0))  # a wait of `within` would time out
    assert [m.offset for m in first] == [0, 1, 2]
    assert taken.qsize() == 2


def test_a_batch_is_what_arrived_within_the_window_of_its_first_message(app: faust.App) -> None:
    taken = buffer(app, size=100, within=0.2)

    async def scenario() -> list[int]:
        put(taken, message(0, 0), message(0, 1))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, put, taken, message(0, 2))  # within the window
        loop.call_later(0.5, put, taken, message(0, 3))  # after it: the next batch
        batch = await taken.take()
        return [m.offset for m in batch]

    assert run(app, scenario()) == [0, 1, 2]


def test_after_a_full_batch_the_next_one_waits_for_its_window_again(app: faust.App) -> None:
    taken = buffer(app, size=2, within=0.2)

    async def scenario() -> list[list[int]]:
        put(taken, message(0, 0), message(0, 1), message(0, 2))
        full = await taken.take()
        asyncio.get_running_loop().call_later(0.05, put, taken, message(0, 3))
        rest = await taken.take()
        return [[m.offset for m in full], [m.offset for m in rest]]

    assert run(app, scenario()) == [[0, 1], [2, 3]]


def test_a_batch_ends_early_once_it_is_full(app: faust.App) -> None:
    taken = buffer(app, size=3, within=60.0)

    async def scenario() -> list[int]:
        put(taken, message(0, 0))
        asyncio.get_running_loop().call_later(0.05, put, taken, message(0, 1), message(0, 2))
        return [m.offset for m in await asyncio.wait_for(taken.take(), 1.0)]

    assert run(app, scenario()) == [0, 1, 2]


def test_the_subscription_hands_the_message_through_and_is_cleared_at_a_rebalance(
    app: faust.App,
) -> None:
    topic = batch_topic(app, "a", "b")
    channel: Any = aiter(topic)
    assert channel in app.topics and tuple(channel.topics) == ("a", "b")
    delivered = message(1, 7)
    assert run(app, channel.decode(delivered, propagate=True)) is delivered
    assert isinstance(channel.queue, MessageBuffer)
    put(channel.queue, delivered)
    app.flow_control.clear()  # as Faust does when partitions are revoked
    assert channel.queue.empty()


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[dict[int, list[tuple[int, bool]]]] = []
        self.fail = fail

    async def __call__(self, by_partition: dict[int, list[Any]]) -> None:
        # each message with whether it was acked already: it must not be
        self.batches.append(
            {p: [(m.offset, m.acked) for m in ms] for p, ms in by_partition.items()}
        )
        if self.fail:
            raise RuntimeError("the broker refused the writes")


def consumer_of(app: faust.App, handle: Recorder) -> BatchConsumer:
    batches = BatchConsumer(app, BatchTopic(app, topics=["t"]), handle, "test")
    conductor: Any = app.topics
    run(app, conductor._update_indices())  # as the worker does when it subscribes
    assert conductor.acks_enabled_for("t")
    return batches


def test_batches_are_grouped_by_partition_and_acked_after_handling(app: faust.App) -> None:
    handle = Recorder()
    batches = consumer_of(app, handle)
    app.flow_control.resume()
    messages = [message(0, 10), message(1, 4), message(0, 11), message(1, 5)]
    put(batches.channel.queue, *messages)

    async def scenario() -> None:
        task = asyncio.ensure_future(batches.run())
        await asyncio.sleep(0.5)  # > the batch window
        task.cancel()

    run(app, scenario())
    assert handle.batches == [{0: [(10, False), (11, False)], 1: [(4, False), (5, False)]}]
    assert all(m.acked for m in messages)
    consumer: Any = app.consumer
    assert not consumer._unacked_messages  # nothing left for a rebalance to wait for
    assert sorted(consumer._acked[TP("t", 0)]) == [10, 11]


def test_messages_of_an_earlier_generation_or_during_a_rebalance_are_not_handled(
    app: faust.App,
) -> None:
    handle = Recorder()
    batches = consumer_of(app, handle)
    cast_app: Any = app
    cast_app.consumer_generation_id = 3
    stale, current = message(0, 1, generation=2), message(0, 2, generation=3)
    app.flow_control.resume()
    assert batches.fresh([stale, current]) == {0: [current]}
    app.flow_control.suspend()  # a rebalance under way
    assert batches.fresh([message(0, 3, generation=3)]) == {}
    assert not stale.acked and not stale.tracked


def test_a_failing_batch_stops_the_worker_and_acks_nothing(app: faust.App) -> None:
    handle = Recorder(fail=True)
    batches = consumer_of(app, handle)
    crashes: list[BaseException] = []

    async def crash(reason: BaseException) -> None:
        crashes.append(reason)

    app.crash = crash  # type: ignore[method-assign]
    app.flow_control.resume()
    messages = [message(0, 1), message(0, 2)]
    put(batches.channel.queue, *messages)
    run(app, asyncio.wait_for(batches.run(), 5.0))  # returns after the crash
    assert [str(exc) for exc in crashes] == ["the broker refused the writes"]
    assert handle.batches == [{0: [(1, False), (2, False)]}]
    assert not any(m.acked for m in messages)


def test_what_is_still_buffered_of_a_partition_is_unread(app: faust.App) -> None:
    batches = consumer_of(app, Recorder())
    queue = batches.channel.queue
    put(queue, message(0, 10), message(1, 4), message(0, 11))
    assert queue.newest == {TP("t", 0): 11, TP("t", 1): 4}
    assert batches.unread(TP("t", 0), 11)  # offset 11 is still to be handled
    assert not batches.unread(TP("t", 0), 12)
    assert not batches.unread(TP("t", 1), 5)
    assert not batches.unread(TP("t", 2), 0)  # nothing known: the client is not started
    app.flow_control.clear()  # a rebalance: what was buffered is fetched again
    assert queue.newest == {} and not batches.unread(TP("t", 0), 11)
