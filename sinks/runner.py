"""The Kafka edge of a sink: consume, decode, add, flush, and only then commit offsets.

A plain aiokafka consumer rather than a Faust agent, because a sink must decide itself when an
offset may be committed: after the batch holding that record is durable, never before.

The commit sequence, in one place:
  1. consume records and add them (or their dead letters) to the sink's batch; a partition's
     messages are decoded at once into Arrow when the sink takes them so (pipeline.arrowcodec),
     else one by one;
  2. when the batch is due (size or age), take it out of the sink and write it in a thread:
     one atomic, idempotent write; consuming goes on into the next batch meanwhile, but that
     one is not written before this one is done (one write in flight, batches in order);
  3. when the write has returned, commit the batch's offsets.
A crash before 3 replays records that may already be stored; the sink's idempotent write makes
that harmless. When the destination pushes back (locked, disk full), the batch goes back ahead
of the records read since, the partitions are paused (the consumer keeps polling so the group
does not evict it), and the write is retried with a growing pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from pipeline import kafka_outage
from pipeline.arrowcodec import ArrowDecoder, DecodedBatch
from pipeline.codec import Codec, CodecError
from pipeline.deadletter import dead_letter_of
from pipeline.kafka_security import client_options
from pipeline.offsetresets import OffsetResets
from pipeline.settings import Settings
from pipeline.status import partition_lags
from pipeline.topics import COMPACTED_TOPICS, RECORD_OF, SOURCE_TOPICS
from sinks.base import Batch, Positions, SinkBackpressure
from sinks.metrics import Lags, SinkMetrics

log = logging.getLogger(__name__)


class RecordSink(Protocol):
    """What the runner needs of a sink (sinks.base.BatchingSink plus ``add_record``)."""

    @property
    def pending(self) -> int: ...

    def add_record(
        self, topic: str, record: Mapping[str, Any], source: str, partition: int, offset: int
    ) -> None: ...

    def delete_record(
        self, topic: str, key: str, source: str, partition: int, offset: int
    ) -> None: ...

    def columnar(self, topic: str) -> bool: ...

    def add_records(
        self, topic: str, records: pa.Table, source: str, partition: int, last_offset: int
    ) -> None: ...

    def advance(self, topic: str, partition: int, offset: int) -> None: ...

    def due(self) -> bool: ...

    def idle(self) -> None: ...

    def close(self) -> None: ...

    def take(self) -> Batch | None: ...

    def restore(self, batch: Batch) -> None: ...

    def write_batch(self, batch: Batch) -> Positions: ...

    def drop(self, partitions: set[tuple[str, int]]) -> None: ...


@dataclass
class SinkProgress:
    """Counts for progress output and tests."""

    consumed: int = 0
    dead_letters: int = 0
    flushes: int = 0
    backpressure: int = 0
    deleted_unread: int = 0  # records Kafka deleted before they were read (OffsetResets)
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
        metrics: SinkMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.codec = codec or Codec.load()
        self.decoder = ArrowDecoder(self.codec)
        self.logical = {settings.topic(name): name for name in topics}
        self.group_id = group_id
        self.progress = SinkProgress()
        self.metrics = metrics or SinkMetrics("sink")
        self._sink_name = self.metrics.sink
        self.report = report or log.info
        self.report_every = report_every
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pause = 0.0  # seconds between flush attempts while the destination pushes back
        self._retry_at = 0.0
        self._writing: tuple[Batch, asyncio.Task[Positions]] | None = None  # step 2 in flight
        self._lags: Lags = {}  # as last measured (``_measure``)
        self._measuring: asyncio.Task[None] | None = None
        self._resets = OffsetResets(self._deleted_unread)

    async def run(self, stop: asyncio.Event) -> SinkProgress:
        self._consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=5000,
            # what the workers count: not the records of a producer's aborted transactions
            isolation_level="read_committed",
        )
        self._consumer.subscribe(list(self.logical), listener=_Rebalance(self))
        self._producer = AIOKafkaProducer(**client_options(self.settings))
        await self._producer.start()
        await self._consumer.start()
        self._resets.listen()
        last_report = last_measure = time.monotonic()
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(timeout_ms=200, max_records=20_000)
                for tp, messages in batches.items():
                    if messages:
                        self._resets.fetched(tp, messages[0].offset)
                        await self._add_partition(messages)
                    await self._write_when_due()
                await self._write_when_due()
                if self._writing is None and not self.sink.due():
                    await asyncio.to_thread(self.sink.idle)
                if time.monotonic() - last_measure >= 1:
                    last_measure = time.monotonic()
                    self._measure_beside()
                    self.metrics.measure(self._lags, self.sink.pending)
                if time.monotonic() - last_report >= self.report_every:
                    last_report = time.monotonic()
                    self.report(self._describe())
            await self._drain(stop_timeout=30.0)
        finally:
            if self._measuring is not None:
                self._measuring.cancel()
            if self._writing is None:
                await asyncio.to_thread(self.sink.close)
            await kafka_outage.stop_consumer(self._consumer)
            await self._producer.stop()
            self._resets.close()
        return self.progress

    def _deleted_unread(self, topic: str, records: int) -> None:
        self.progress.deleted_unread += records
        self.metrics.deleted_unread.labels(self._sink_name, topic).inc(records)

    async def _add_partition(self, messages: list[Any]) -> None:
        """Add one partition's messages (consecutive offsets) to the sink."""
        last = messages[-1]
        topic = self.logical[last.topic]
        self.progress.consumed += len(messages)
        self.metrics.records.labels(self._sink_name, last.topic).inc(len(messages))
        if not self.sink.columnar(topic):
            for message in messages:
                await self._add(topic, message)
            return
        decoded = await asyncio.to_thread(
            self.decoder.decode, RECORD_OF[topic], [m.value for m in messages]
        )
        await self._add_decoded(topic, messages, decoded)
        self.sink.advance(last.topic, last.partition, last.offset)

    async def _add_decoded(self, topic: str, messages: list[Any], decoded: DecodedBatch) -> None:
        """Hand the Arrow rows over in runs, and the one-by-one records and dead letters between
        them, in offset order (a later version of a key must stay later)."""
        singles: dict[int, Mapping[str, Any] | CodecError] = dict(decoded.records)
        singles.update(decoded.errors)
        start = row = 0  # the run of table rows waiting: messages[start:index], rows from row
        for index in [*sorted(singles), len(messages)]:
            if index > start and decoded.table is not None:
                rows = decoded.table.slice(row, index - start)
                await self._add_rows(topic, messages[start:index], rows)
                row += index - start
            if index < len(messages):
                await self._add(topic, messages[index], singles[index])
            start = index + 1

    async def _add_rows(self, topic: str, messages: list[Any], rows: pa.Table) -> None:
        last = messages[-1]
        try:
            self.sink.add_records(topic, rows, last.topic, last.partition, last.offset)
        except Exception:  # find the odd record: one by one, each error is a dead letter
            log.exception("archiving %d records of %s at once failed", len(messages), topic)
            for message in messages:
                await self._add(topic, message)

    async def _add(
        self, topic: str, message: Any, decoded: Mapping[str, Any] | CodecError | None = None
    ) -> None:
        if message.value is None and message.key and topic in COMPACTED_TOPICS:
            await self._delete(topic, message)
            return
        if decoded is None:
            try:
                decoded = self.codec.decode(message.value, expected=RECORD_OF[topic]).record
            except CodecError as exc:
                decoded = exc
        if isinstance(decoded, CodecError):
            await self._dead_letter(message, topic, decoded.reason, str(decoded))
            return
        record = decoded
        try:
            self.sink.add_record(topic, record, message.topic, message.partition, message.offset)
        except Exception as exc:  # one odd record never stops the sink
            log.exception("archiving %s failed", message.topic)
            await self._dead_letter(
                message, topic, "processing_error", f"{type(exc).__name__}: {exc}"
            )

    async def _delete(self, topic: str, message: Any) -> None:
        """A tombstone: the record with the message's key is deleted."""
        try:
            key = bytes(message.key).decode()
        except UnicodeDecodeError as exc:
            await self._dead_letter(message, topic, "bad_key", f"tombstone key is not UTF-8: {exc}")
            return
        self.sink.delete_record(topic, key, message.topic, message.partition, message.offset)

    async def _dead_letter(self, message: Any, topic: str, reason: str, error: str) -> None:
        """Archive the failure itself; publish it to the DLQ too unless a worker already does
        (source topics) or it came from the DLQ. Its id is the source position: one row."""
        record = dead_letter_of(message, reason, error)
        self.progress.dead_letters += 1
        self.metrics.dead_letters.labels(self._sink_name, message.topic, reason).inc()
        log.warning(
            "dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )
        if topic not in SOURCE_TOPICS and topic != "dlq" and self._producer is not None:
            value = self.codec.encode("DeadLetter", record)
            await self._producer.send_and_wait(self.settings.topic("dlq"), value)
        self.sink.add_record("dlq", record, message.topic, message.partition, message.offset)

    async def _write_when_due(self) -> None:
        """Step 3 for a written batch as soon as its write is done; step 2 for the next batch
        when it is due. One batch is written at a time (in a thread, while consuming goes on),
        so batches reach the destination in order."""
        if self._writing is not None and self._writing[1].done():
            await self._settle_or_pause()
        if self.sink.due() and time.monotonic() >= self._retry_at:
            if not await self._settle_or_pause():
                return
            self._start_write()

    def _start_write(self) -> None:
        """Step 2: take the pending batch out of the sink and write it in a thread."""
        batch = self.sink.take()
        if batch is not None:
            write = asyncio.create_task(asyncio.to_thread(self.sink.write_batch, batch))
            self._writing = (batch, write)

    async def _settle_or_pause(self) -> bool:
        """Settle the batch in flight; when the destination pushed back, keep it, pause the
        partitions and retry later with a growing pause. False when it pushed back."""
        assert self._consumer is not None
        try:
            await self._settle()
        except SinkBackpressure as exc:
            self.progress.backpressure += 1
            self.metrics.backpressure.labels(self._sink_name).inc()
            self._pause = min(max(exc.retry_after, 2 * self._pause), 60.0)
            self._retry_at = time.monotonic() + self._pause
            self._consumer.pause(*self._consumer.assignment())
            log.error(
                "%s; keeping %d rows, retrying in %.0f s", exc, self.sink.pending, self._pause
            )
            return False
        return True

    async def _settle(self) -> None:
        """Wait for the batch in flight, then commit its offsets (step 3). On SinkBackpressure
        the batch goes back ahead of the pending records and the error is raised."""
        if self._writing is None:
            return
        batch, write = self._writing
        self._writing = None
        try:
            positions = await write
        except SinkBackpressure:
            self.sink.restore(batch)
            raise
        self.progress.flushes += 1
        self.metrics.batches.labels(self._sink_name).inc()
        self.metrics.last_write.labels(self._sink_name).set(time.time())
        await self._commit(positions)
        if self._pause and self._consumer is not None:
            log.info("archive writable again; resuming")
            self._consumer.resume(*self._consumer.paused())
        self._pause = self._retry_at = 0.0

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
        """Partitions are being taken away: write and commit what was read from them, or forget
        their positions if the destination pushes back (the new owner re-reads them)."""
        self._resets.forget(revoked)
        try:
            await self._write_now()
        except SinkBackpressure:
            self.sink.drop(revoked)

    async def _write_now(self) -> None:
        """Steps 2 and 3 for everything read so far, waiting for them (rebalance, shutdown).
        Raises SinkBackpressure with the rows kept."""
        await self._settle()
        self._start_write()
        await self._settle()

    async def _drain(self, stop_timeout: float) -> None:
        """On shutdown, flush the last batch, retrying for up to ``stop_timeout`` seconds."""
        deadline = time.monotonic() + stop_timeout
        while True:
            try:
                await self._write_now()
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

    def _measure_beside(self) -> None:
        """Measure the lag in a task of its own, one at a time: its end offsets are a request,
        which with the broker away would hold the loop for the client's request timeout."""
        if self._measuring is None or self._measuring.done():
            self._measuring = asyncio.create_task(self._measure())

    async def _measure(self) -> None:
        """Messages not read yet of each partition held (``partition_lags``: the end asked of
        the broker now, or the last fetch's when later). Not the last fetch's alone: while the
        destination pushes back the partitions are paused and nothing is fetched, so the lag
        stood still as records piled up; nor from the last offset read, which a partition not
        read yet lacks (its lag was 0) and a transaction's marker never reaches."""
        assert self._consumer is not None
        held = self._consumer.assignment()
        try:
            ends = await self._consumer.end_offsets(list(held)) if held else {}
            positions = {tp: await asyncio.wait_for(self._consumer.position(tp), 5) for tp in held}
        except (KafkaError, TimeoutError) as exc:  # away, or a rebalance meanwhile
            log.debug("lag not measured (%s); the last measure stands", exc)
            return
        still_held = self._consumer.assignment()  # highwater() asserts the partition is held
        kept = {tp: positions[tp] for tp in positions if tp in still_held}
        fetched = {tp: self._consumer.highwater(tp) for tp in kept}
        self._lags = partition_lags(ends, kept, fetched)

    def _describe(self) -> str:
        lag = sum(self._lags.values())
        deleted = self.progress.deleted_unread
        return (
            f"archive: {self.progress.consumed} records read, {self.progress.flushes} batches "
            f"written, {self.progress.dead_letters} dead letters, {self.sink.pending} rows "
            f"buffered, lag {lag}"
            + (f", {deleted} records deleted by Kafka before they were read" if deleted else "")
        )
