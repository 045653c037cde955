"""How loopline's Kafka clients behave while no broker answers: a pause between tries, and
one log line for many.

aiokafka (0.14) starts a metadata refresh as soon as anyone asks for one, and its producer's
sender asks again the moment a refresh ends while a partition's leader is unknown. With the
broker down and its port refusing connections at once (a restart, an upgrade), that was a
loop without a pause: a worker spun a core and logged about 4,500 errors a second
("Unable connect to node", "Unable to update metadata"; aio-libs/aiokafka#496), over 100,000
lines in a 20 s restart. With ``install()``:

- a refresh that reached no broker waits before it reports back, doubling from the client's
  ``retry_backoff_ms`` (100 ms) to MAX_BACKOFF_SECONDS, as the Java client's
  ``reconnect.backoff.ms`` and ``reconnect.backoff.max.ms`` do; every caller that asked waits
  on that one refresh, so each client refreshes about once a second while the broker is away,
  and at most a second after it is back;
- an aiokafka warning or error that repeats word for word (its fetcher and coordinator retry
  every 100 ms) is logged once per REPEAT_WINDOW_SECONDS, with how many times it repeated meanwhile.

And ``stop_consumer`` stops a consumer whose fetches could not reach the broker;
``give_up_sends`` lets a producer stop that holds sends the broker never took.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaTimeoutError

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 1.0
REPEAT_WINDOW_SECONDS = 10.0

#: Consecutive refreshes of each client that reached no broker.
_failures: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

Refresh = Callable[[Any, Any, Any], Awaitable[bool]]


def backoff_seconds(base_seconds: float, failures: int) -> float:
    """The wait after the ``failures``-th refresh in a row that reached no broker."""
    return float(min(MAX_BACKOFF_SECONDS, base_seconds * 2 ** (failures - 1)))


def with_backoff(refresh: Refresh) -> Refresh:
    """``AIOKafkaClient._metadata_update`` that waits out a failure before it returns."""

    @functools.wraps(refresh)
    async def refresh_with_backoff(client: Any, cluster_metadata: Any, topics: Any) -> bool:
        updated = await refresh(client, cluster_metadata, topics)
        if updated:
            _failures.pop(client, None)
        else:
            failures = _failures[client] = _failures.get(client, 0) + 1
            await asyncio.sleep(backoff_seconds(client._retry_backoff, failures))
        return updated

    refresh_with_backoff.loopline_backoff = True  # type: ignore[attr-defined]
    return refresh_with_backoff


class RepeatFilter(logging.Filter):
    """Lets a warning or error through once per ``window`` seconds for each distinct text
    (per logger); the next one through says how many times it repeated meanwhile."""

    def __init__(
        self, window: float = REPEAT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (passed at, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        key, now = (record.name, record.levelno, text), self._clock()
        passed_at, left_out = self._last.get(key, (-float("inf"), 0))
        if now - passed_at < self._window:
            self._last[key] = (passed_at, left_out + 1)
            return False
        if len(self._last) >= 1000:  # texts that vary (offsets, ids): keep only recent ones
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._window}
        self._last[key] = (now, 0)
        if left_out:
            record.msg, record.args = f"{text} (repeated {left_out} times since last logged)", ()
        return True


def install() -> None:
    """Give every aiokafka client and logger of this process the above (once; again is a
    no-op). Called where loopline's processes start (the CLI, the worker, ``Publisher.start``),
    not at import."""
    refresh = AIOKafkaClient._metadata_update
    if getattr(refresh, "loopline_backoff", False):
        return
    AIOKafkaClient._metadata_update = with_backoff(refresh)
    repeats = RepeatFilter()
    for name in list(logging.root.manager.loggerDict):
        if name == "aiokafka" or name.startswith("aiokafka."):
            logging.getLogger(name).addFilter(repeats)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, but for the CancelledError of aiokafka's own fetch tasks: its fetcher
    cancels the fetch requests in flight or waiting to retry (the broker away) and awaits them
    without catching it, so a clean stop ended in a traceback, skipping what came after it. A
    cancellation of the caller's own task still goes through."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("the Kafka consumer stopped with fetches to the broker unfinished")


async def give_up_sends(producer: AIOKafkaProducer, reason: str) -> None:
    """Fail every send ``producer`` holds with KafkaTimeoutError(reason). While the broker is
    away with its leaders known, aiokafka retries a send without end, and its ``stop`` waits for
    them all (aio-libs/aiokafka#1101): without this, a process stopping then hangs. aiokafka has
    no public way to drop them. Its sender is stopped first (it ends the requests in flight,
    which put their batches back), so that none is sent or put back after; then its
    accumulator's ``fail_all`` fails them, once every batch is marked in flight, as the callback
    of a batch sent before removes it from there (a KeyError otherwise)."""
    await producer._sender.close()
    accumulator = producer._message_accumulator
    for batches in accumulator._batches.values():
        accumulator._pending_batches.update(batches)
    accumulator.fail_all(KafkaTimeoutError(reason))
