"""The publisher SDK: services send inputs, resolutions and eval results through it.

Every event is validated against its Avro schema before anything is sent, so an invalid event
raises InvalidEvent and a batch with one invalid event sends nothing. Sends are batched by the
producer (linger) and all of them are confirmed by ``flush`` and ``close``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from pipeline import kafka_outage
from pipeline.codec import Codec, CodecError
from pipeline.events import EvalResult, InputEvent, ResolutionEvent, _Event
from pipeline.kafka_security import client_options
from pipeline.settings import Settings
from pipeline.topics import COMPACTED_TOPICS, RECORD_OF, key_of

Event = Mapping[str, Any] | _Event


class InvalidEvent(ValueError):
    """An event does not match its schema; ``field`` names the culprit, ``index`` its position."""

    def __init__(self, topic: str, error: CodecError, index: int | None = None) -> None:
        where = f" (event #{index} of the batch)" if index is not None else ""
        super().__init__(f"invalid {topic} event{where}: {error}")
        self.topic = topic
        self.field = error.field
        self.index = index


class NotDelivered(RuntimeError):
    """Kafka refused some events, or they waited past the producer's request timeout for a
    partition leader: they were not written and are not retried."""


def not_delivered(failures: list[BaseException]) -> NotDelivered:
    """NotDelivered for these delivery failures (at least one), caused by the first."""
    failed = NotDelivered(f"{len(failures):,} event(s) were not delivered: {failures[0]}")
    failed.__cause__ = failures[0]
    return failed


class TopicMissing(RuntimeError):
    """The topic an event goes to does not exist. loopline's topics are created with their
    partitions and compaction by ``loopline topics``, not on first use."""


class Publisher:
    """Async, batched publisher; use ``async with Publisher(settings) as pub:``. Events Kafka
    refuses (or that wait longer than ``request_timeout_ms`` for a partition leader) are not
    written: the next ``publish``, ``flush`` or ``close`` raises NotDelivered. A broker that is
    down with its leaders still known is waited for (aiokafka retries those sends), except
    when the ``async with`` block is left by an exception (Ctrl-C too): then what Kafka has
    not confirmed within ``GIVE_UP_SECONDS`` is given up and counted in NotDelivered."""

    #: How long a publisher left by an exception waits for Kafka to confirm its sends.
    GIVE_UP_SECONDS = 5.0

    def __init__(
        self,
        settings: Settings,
        codec: Codec | None = None,
        *,
        linger_ms: int = 10,
        max_pending: int = 20_000,
        request_timeout_ms: int = 40_000,
    ) -> None:
        self._settings = settings
        self._codec = codec or Codec.load()
        self._producer = AIOKafkaProducer(
            **client_options(settings),
            linger_ms=linger_ms,
            request_timeout_ms=request_timeout_ms,
            acks="all",
            enable_idempotence=True,
            max_batch_size=256 * 1024,
        )
        self._pending: set[asyncio.Future[Any]] = set()
        self._existing: set[str] = set()  # topics seen to exist
        self._failures: list[BaseException] = []
        self._max_pending = max_pending
        self._started = False
        self.sent = 0

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Left by an exception, the caller is going away: not waiting without end for a
        # broker that is down (`loopline generate` Ctrl-C'd waited for ever).
        await self.close(give_up_seconds=None if exc_type is None else self.GIVE_UP_SECONDS)

    async def start(self) -> None:
        if not self._started:
            kafka_outage.install()  # a broker restart must not spin the caller's process
            try:
                await self._producer.start()
            except BaseException:  # stopped, or its connections are left open
                await self._producer.stop()
                raise
            self._started = True

    async def close(self, give_up_seconds: float | None = None) -> None:
        """Flush every pending send (raising the first delivery error), then stop. With
        ``give_up_seconds``, sends still unconfirmed after that many seconds (a broker away with
        its leaders known, which aiokafka retries without end) are given up: NotDelivered."""
        if not self._started:
            return
        try:
            if give_up_seconds is None:
                await self.flush()
            else:
                try:
                    await asyncio.wait_for(self.flush(), give_up_seconds)
                except TimeoutError:
                    reason = f"not confirmed within {give_up_seconds:g} s of closing"
                    await kafka_outage.give_up_sends(self._producer, reason)
                    await asyncio.sleep(0)  # the futures' callbacks count them
                    failures = self._failures
                    failed = not_delivered(failures) if failures else NotDelivered(reason)
                    self._failures.clear()
                    raise failed from None
        finally:
            await self._producer.stop()
            self._started = False

    def encode(
        self, topic: str, event: Event, index: int | None = None
    ) -> tuple[bytes | None, bytes]:
        """Validate and encode one event for ``topic`` (a logical name such as ``inputs``)."""
        if topic not in RECORD_OF:
            raise ValueError(f"unknown topic {topic!r}; one of {', '.join(RECORD_OF)}")
        record = event.to_record() if isinstance(event, _Event) else event
        try:
            value = self._codec.encode(RECORD_OF[topic], record)
        except CodecError as exc:
            raise InvalidEvent(topic, exc, index) from None
        return key_of(topic, record), value

    async def publish(self, topic: str, event: Event) -> None:
        key, value = self.encode(topic, event)
        await self._send(topic, key, value)

    async def publish_many(self, topic: str, events: Iterable[Event]) -> int:
        """Validate every event first; send them all only when all are valid."""
        encoded = [self.encode(topic, event, i) for i, event in enumerate(events)]
        for key, value in encoded:
            await self._send(topic, key, value)
        return len(encoded)

    async def delete(self, topic: str, key: str) -> None:
        """Publish a tombstone: on a compacted topic it deletes the record with this key."""
        if topic not in COMPACTED_TOPICS:
            raise ValueError(f"{topic!r} is not compacted; records there cannot be deleted")
        await self._send(topic, key.encode(), None)

    async def publish_input(self, event: InputEvent | Mapping[str, Any]) -> None:
        await self.publish("inputs", event)

    async def publish_resolution(self, event: ResolutionEvent | Mapping[str, Any]) -> None:
        await self.publish("resolutions", event)

    async def publish_eval_result(self, event: EvalResult | Mapping[str, Any]) -> None:
        await self.publish("eval-results", event)

    async def publish_confirmed(self, events: Sequence[tuple[str, Event]]) -> None:
        """Send (topic, event) pairs, all valid or none sent, and return once Kafka has
        confirmed every one of them, not waiting for other sends; raises NotDelivered if any
        was not written. Their failures are said here only, not by a later call."""
        encoded = [
            (topic, *self.encode(topic, event, i)) for i, (topic, event) in enumerate(events)
        ]
        sent = [await self._send(topic, key, value, tracked=False) for topic, key, value in encoded]
        outcomes = await asyncio.gather(*sent, return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise not_delivered(failures)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, tracked: bool = True
    ) -> asyncio.Future[Any]:
        """Hand one message to the producer. A ``tracked`` send is confirmed by ``flush`` (its
        failure raised there or by the next send); an untracked one by awaiting its future."""
        if not self._started:
            raise RuntimeError("Publisher is not started: use 'async with Publisher(...)'")
        name = self._settings.topic(topic)
        if name not in self._existing:
            await self._require(name)
        if self._failures:  # said at once, not after max_pending more sends
            raise not_delivered(self._failures)
        if len(self._pending) >= self._max_pending:
            await self._drain(self._max_pending // 2)
        future: asyncio.Future[Any] = await self._producer.send(name, value=value, key=key)
        if tracked:
            self._pending.add(future)
            future.add_done_callback(self._delivered)
        self.sent += 1
        return future

    async def _require(self, name: str) -> None:
        """Refuse at once a send to a topic that does not exist (the producer would wait for it
        for its request timeout, 40 s, and then name no topic)."""
        metadata = await self._producer.client.fetch_all_metadata()
        self._existing = set(metadata.topics())
        if name not in self._existing:
            raise TopicMissing(
                f"topic {name} does not exist on {self._settings.bootstrap_servers}: "
                "create loopline's topics first (`loopline topics`)"
            )

    def _delivered(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self._failures.append(future.exception())  # type: ignore[arg-type]

    async def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            await asyncio.wait(set(self._pending), return_when=asyncio.FIRST_COMPLETED)
        if self._failures:
            failed = not_delivered(self._failures)
            self._failures.clear()
            raise failed

    async def flush(self) -> None:
        await self._producer.flush()
        await self._drain(0)
