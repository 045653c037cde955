"""A cheaper hand-over of each fetched message from Faust's consumer to its streams, for the
topics that take Faust's per-message path (the tables' changelogs while they recover; the
stages' subscriptions get whole fetches, agents.fetch).

Faust's fetch loop hands every message over with
``await consumer.wait_first(callback(message), consumer.suspend_flow.wait())``, so that a
rebalance (which sets ``suspend_flow``) can abandon a callback that is blocked. ``wait_first``
makes four tasks per message for that (the callback, the suspend wait, and the consumer's
stopped and crashed events) and an ``asyncio.wait``: a fifth of the worker's time in
bench/throughput while the stages' records came this way too (the per-message cost noted in
robinhood/faust#563).

Almost always the callback does not block: it decodes the message and puts it on a stream
queue that has room. So the callback is first run here up to its first suspension. If it
finishes there, no other task could have run meanwhile, so nothing could have been suspended,
stopped or crashed, and the result is the one ``wait_first`` would have returned. If it
suspends (a full queue, a producer buffer to drain, flow control), the rest of it goes to
``wait_first`` as before, racing the suspension exactly as Faust intends. When the flow is
already suspended, or the consumer stopped or crashed, Faust's own path is taken untouched.

Before each hand-over (of a message, or of a slice in agents.fetch) the fetch loop also awaits
the producer buffer's ``wait_until_ebb``; ``install_ebb`` gives it a check that costs a ``len``
instead of a settings lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from mode.services import WaitResults

_EVENT_WAIT = asyncio.Event.wait.__code__


class _Resumed:
    """The rest of a coroutine that has already run up to its first suspension, ``pending``
    being what it yielded there (the future it waits for, or None for a bare yield)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation too: the coroutine handles it
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value


def install(consumer: Any) -> None:
    """Give ``consumer`` (a Faust consumer, a mode Service) the fast hand-over above."""
    original: Callable[..., Awaitable[WaitResults]] = consumer.wait_first
    suspend_flow = consumer.suspend_flow
    stopped, crashed = consumer._stopped, consumer._crashed

    def is_suspend_wait(coro: Any) -> bool:
        return (
            getattr(coro, "cr_code", None) is _EVENT_WAIT
            and coro.cr_frame.f_locals.get("self") is suspend_flow
        )

    # Faust's signature, timeout included
    async def wait_first(*coros: Any, timeout: float | None = None) -> WaitResults:  # noqa: ASYNC109
        if (
            len(coros) != 2
            or timeout is not None
            or not asyncio.iscoroutine(coros[0])
            or not is_suspend_wait(coros[1])
            or suspend_flow.is_set()
            or stopped.is_set()
            or crashed.is_set()
        ):
            return await original(*coros, timeout=timeout)
        callback, suspend_wait = coros
        try:
            pending = callback.send(None)
        except StopIteration as done:
            suspend_wait.close()  # never started
            return WaitResults([callback], [done.value], False)
        except BaseException:
            suspend_wait.close()
            raise
        return await original(_Resumed(callback, pending), suspend_wait, timeout=timeout)

    consumer.wait_first = wait_first


class _Ready:
    """An awaitable that is already done: awaiting it does not suspend."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that ends at once


_READY = _Ready()


def install_ebb(buffer: Any) -> None:
    """Give a Faust producer buffer a cheap ``wait_until_ebb`` for the usual case.

    The fetch loop awaits it before every hand-over (above, and agents.fetch), and its size
    check reads ``app.conf.producer_threaded`` through the settings registry's Python
    ``__getattribute__``: ~2 % of the worker in bench/throughput. Below the limit it has nothing
    to wait for and returns at once, as Faust's does; above it Faust's own wait runs. The
    threaded producer's buffer is left as it is."""
    if buffer.app.conf.producer_threaded:
        return
    original: Callable[[], Awaitable[None]] = buffer.wait_until_ebb
    pending = buffer.pending._queue  # asyncio.Queue's deque: what Faust's ``size`` counts
    limit = buffer.max_messages

    def wait_until_ebb() -> Awaitable[None]:
        return _READY if len(pending) <= limit else original()

    buffer.wait_until_ebb = wait_until_ebb
