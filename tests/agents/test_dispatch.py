"""The fast hand-over of fetched messages (agents.dispatch), on a real mode Service called the
way Faust's fetch loop calls it: ``wait_first(callback(message), suspend_flow.wait())``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust
import mode
import pytest

from agents import dispatch


class Consumer(mode.Service):
    """What the fast path needs of Faust's consumer: a mode Service with ``suspend_flow``."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = asyncio.Event()


@pytest.fixture
async def tasks_created() -> AsyncIterator[list[Any]]:
    """The coroutines of the tasks created on the running loop from the test's first line."""
    loop = asyncio.get_running_loop()
    created: list[Any] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    yield created
    loop.set_task_factory(None)


async def test_a_callback_that_does_not_block_runs_without_tasks(tasks_created: list[Any]) -> None:
    tasks_created.clear()  # the test's own task
    delivered: list[str] = []

    async def callback(message: str) -> str:
        delivered.append(message)
        return message.upper()

    faust_path = Consumer()
    await faust_path.wait_first(callback("a"), faust_path.suspend_flow.wait())
    assert len(tasks_created) == 4  # Faust's: callback, suspend wait, stopped, crashed

    tasks_created.clear()
    consumer = Consumer()
    dispatch.install(consumer)
    result = await consumer.wait_first(callback("b"), consumer.suspend_flow.wait())
    assert tasks_created == []
    assert delivered == ["a", "b"]
    assert (result.results, result.stopped) == (["B"], False)


async def test_a_callback_that_blocks_finishes_when_unblocked() -> None:
    consumer = Consumer()
    dispatch.install(consumer)
    space = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def callback(message: str) -> str:
        steps.append("decoded")
        await asyncio.sleep(0)  # a bare yield first, then a real wait
        steps.append(f"queue full at {await space}")
        return message

    waiting = asyncio.ensure_future(
        consumer.wait_first(callback("m"), consumer.suspend_flow.wait())
    )
    await asyncio.sleep(0.01)
    assert steps == ["decoded"] and not waiting.done()
    space.set_result(1)
    result = await waiting
    assert steps == ["decoded", "queue full at 1"]
    assert (result.results, result.stopped) == (["m"], False)


async def test_a_blocked_callback_is_abandoned_when_the_flow_is_suspended() -> None:
    consumer = Consumer()
    dispatch.install(consumer)
    never = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def callback(message: str) -> None:
        try:
            await never
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    waiting = asyncio.ensure_future(
        consumer.wait_first(callback("m"), consumer.suspend_flow.wait())
    )
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()  # a rebalance
    result = await asyncio.wait_for(waiting, 5)
    await asyncio.sleep(0)  # the cancellation reaches the callback
    assert result.results == [True]  # the suspend wait won, as in Faust's own path
    assert outcome == ["cancelled"]


async def test_a_suspended_flow_takes_fausts_path(tasks_created: list[Any]) -> None:
    tasks_created.clear()  # the test's own task
    consumer = Consumer()
    dispatch.install(consumer)
    consumer.suspend_flow.set()

    async def callback(message: str) -> str:
        return message

    await consumer.wait_first(callback("m"), consumer.suspend_flow.wait())
    assert len(tasks_created) == 4


async def test_errors_reach_the_fetch_loop_before_and_after_a_suspension() -> None:
    consumer = Consumer()
    dispatch.install(consumer)

    async def fails_at_once(message: str) -> None:
        raise ValueError(f"bad {message}")

    async def fails_later(message: str) -> None:
        await asyncio.sleep(0.001)
        raise KeyError(message)

    with pytest.raises(ValueError, match="bad m"):
        await consumer.wait_first(fails_at_once("m"), consumer.suspend_flow.wait())
    with pytest.raises(KeyError, match="n"):
        await consumer.wait_first(fails_later("n"), consumer.suspend_flow.wait())


async def test_other_waits_take_fausts_path() -> None:
    consumer = Consumer()
    dispatch.install(consumer)
    other = asyncio.Event()
    other.set()

    async def callback() -> str:
        await asyncio.sleep(0.01)
        return "late"

    # Not the suspend wait: wait_first races them as Faust does, and the set event wins.
    result = await consumer.wait_first(callback(), other.wait())
    assert result.results == [True]


async def test_the_producer_buffer_check_waits_only_above_its_limit() -> None:
    app = faust.App("dispatch-ebb", broker="kafka://127.0.0.1:1")  # never connects
    buffer = app.producer.buffer
    waited: list[int] = []

    async def fausts_wait() -> None:  # stands for Faust's own, which flushes the buffer
        waited.append(buffer.pending.qsize())

    buffer.wait_until_ebb = fausts_wait
    dispatch.install_ebb(buffer)
    for n in range(buffer.max_messages):
        buffer.pending.put_nowait(n)
    assert await buffer.wait_until_ebb() is None
    assert waited == []  # at the limit: nothing to wait for
    buffer.pending.put_nowait("one too many")
    await buffer.wait_until_ebb()
    assert waited == [buffer.max_messages + 1]
