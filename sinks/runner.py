"""The Kafka edge of a sink: consume, decode, add, flush, and only then commit offsets.

A plain aiokafka consumer rather than a Faust agent, because a sink must decide itself when an
offset may be committed: after the batch holding that record is durable, never before.

The commit sequence, in one place:
  1. consume records and add them (or their dead letters) to the sink's batch;
  2. when the batch is due (size or age), flush it: one atomic, idempotent write;
  3. commit the batch's offsets.
A crash before 3 replays records that may already be stored; the sink's idempotent write makes
that harmless. When the destination pushes back (locked, disk full), the batch is kept, the
partitions are paused (the consumer keeps polling so the group does not evict it), and the
flush is retried with a growing pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from pipeline.codec import Codec, CodecError
from pipeline.deadletter import dead_letter_of
from pipeline.kafka_security import client_options
from pipeline.settings import Settings
from pipeline.topics import RECORD_OF, SOURCE_TOPICS
from sinks.base import Positions, SinkBackpressure

log = logging.getLogger(__name__)


class RecordSink(Protocol):
    """What the runner needs of a sink (sinks.base.BatchingSink plus ``add_record``)."""

    @property
    def pending(self) -> int: ...

    def add_record(
        self, topic: str, record: Mapping[str, Any], source: str, partition: int, offset: int
    ) -> None: ...

    def due(self) -> bool: ...

    def flush(self) -> Positions: ...

    def drop(self, partitions: set[tuple[str, int]]) -> None: ...


@dataclass
class SinkProgress:
    """Counts for progress output and tests."""

    consumed: int = 0
    dead_letters: int = 0
    flushes: int = 0
    backpressure: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: SinkRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runner.handover({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class SinkRunner:
    """Runs one sink over loopline topics until ``stop`` is set, then flushes a last time."""

    def __init__(
        self,
        settings: Settings,
        sink: RecordSink,
        topics: tuple[str, ...],
        group_id: str,
        codec: Codec | None = None,
        report: Callable[[str], None] | None = None,
        report_every: float = 10.0,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.codec = codec or Codec.load()
        self.logical = {settings.topic(name): name for name in topics}
        self.group_id = group_id
        self.progress = SinkProgress()
        self.report = report or log.info
        self.report_every = report_every
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pause = 0.0  # seconds between flush attempts while the destination pushes back
        self._retry_at = 0.0
        self._next: dict[tuple[str, int], int] = {}

    async def run(self, stop: asyncio.Event) -> SinkProgress:
        self._consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=5000,
        )
        self._consumer.subscribe(list(self.logical), listener=_Rebalance(self))
        self._producer = AIOKafkaProducer(**client_options(self.settings))
        await self._producer.start()
        await self._consumer.start()
        last_report = time.monotonic()
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(timeout_ms=200, max_records=20_000)
                for messages in batches.values():
                    for message in messages:
                        await self._add(message)
                        if self.sink.due() and time.monotonic() >= self._retry_at:
                            await self._flush_and_commit()
                if self.sink.due() and time.monotonic() >= self._retry_at:
                    await self._flush_and_commit()
                if time.monotonic() - last_report >= self.report_every:
                    last_report = time.monotonic()
                    self.report(self._describe())
            await self._drain(stop_timeout=30.0)
        finally:
            await self._consumer.stop()
            await self._producer.stop()
        return self.progress

    async def _add(self, message: Any) -> None:
        topic = self.logical[message.topic]
        self.progress.consumed += 1
        self._next[(message.topic, message.partition)] = message.offset + 1
        try:
            record = self.codec.decode(message.value, expected=RECORD_OF[topic]).record
        except CodecError as exc:
            await self._dead_letter(message, topic, exc.reason, str(exc))
            return
        try:
            self.sink.add_record(topic, record, message.topic, message.partition, message.offset)
        except Exception as exc:  # one odd record never stops the sink
            log.exception("archiving %s failed", message.topic)
            await self._dead_letter(
                message, topic, "processing_error", f"{type(exc).__name__}: {exc}"
            )

    async def _dead_letter(self, message: Any, topic: str, reason: str, error: str) -> None:
        """Archive the failure itself; publish it to the DLQ too unless a worker already does
        (source topics) or it came from the DLQ. Its id is the source position: one row."""
        record = dead_letter_of(message, reason, error)
        self.progress.dead_letters += 1
        log.warning(
            "dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )
        if topic not in SOURCE_TOPICS and topic != "dlq" and self._producer is not None:
            value = self.codec.encode("DeadLetter", record)
            await self._producer.send_and_wait(self.settings.topic("dlq"), value)
        self.sink.add_record("dlq", record, message.topic, message.partition, message.offset)

    async def _flush_and_commit(self) -> bool:
        """Steps 2 and 3; False when the destination pushed back (the batch is kept)."""
        assert self._consumer is not None
        try:
            await self._flush_and_commit_once()
        except SinkBackpressure as exc:
            self.progress.backpressure += 1
            self._pause = min(max(exc.retry_after, 2 * self._pause), 60.0)
            self._retry_at = time.monotonic() + self._pause
            self._consumer.pause(*self._consumer.assignment())
            log.error(
                "%s; keeping %d rows, retrying in %.0f s", exc, self.sink.pending, self._pause
            )
            return False
        if self._pause:
            log.info("archive writable again; resuming")
        self._pause = self._retry_at = 0.0
        self._consumer.resume(*self._consumer.paused())
        return True

    async def _commit(self, positions: Positions) -> None:
        assert self._consumer is not None
        if not positions:
            return
        offsets = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "")
            for (topic, partition), offset in positions.items()
        }
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The rows are durable; the new owner re-reads them and the write skips them.
            log.warning(
                "offset commit failed after a durable flush (%s); records will be re-read", exc
            )
            return
        self.progress.committed.update(positions)

    async def handover(self, revoked: set[tuple[str, int]]) -> None:
        """Partitions are being taken away: flush and commit what was read from them, or forget
        their positions if the destination pushes back (the new owner re-reads them)."""
        try:
            await self._flush_and_commit_once()
        except SinkBackpressure:
            self.sink.drop(revoked)

    async def _flush_and_commit_once(self) -> None:
        positions = await asyncio.to_thread(self.sink.flush)
        self.progress.flushes += 1
        await self._commit(positions)

    async def _drain(self, stop_timeout: float) -> None:
        """On shutdown, flush the last batch, retrying for up to ``stop_timeout`` seconds."""
        deadline = time.monotonic() + stop_timeout
        while True:
            try:
                await self._flush_and_commit_once()
                return
            except SinkBackpressure as exc:
                if time.monotonic() + exc.retry_after > deadline:
                    log.error(
                        "%s; stopping with %d rows unwritten: they are re-read on the next start",
                        exc,
                        self.sink.pending,
                    )
                    return
                await asyncio.sleep(exc.retry_after)

    def _describe(self) -> str:
        lag = 0
        if self._consumer is not None:
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is not None:
                    lag += max(high - self._next.get((tp.topic, tp.partition), high), 0)
        return (
            f"archive: {self.progress.consumed} records read, {self.progress.flushes} batches "
            f"written, {self.progress.dead_letters} dead letters, {self.sink.pending} rows "
            f"buffered, lag {lag}"
        )
