"""Faust's fetch loop with whole fetches handed to the batch subscriptions (agents.batches).

Faust's loop (``Consumer._drain_messages``) takes every record of a fetch through its
``getmany`` generator (flow, generation and assignment checks, the end-offset monitor, a
Message object), its read-offset and gap bookkeeping, the hand-over (agents.dispatch) and the
conductor (flow control, producer ebb, decode, the queue's pressure checks): about a fifth of
the worker's time in bench/throughput, for subscriptions that want the records only, in
batches. Here the records a fetch brings of a batch topic's partition go to its buffer at
once, in slices of at most a batch (``Fetched``), each checked, bookkept and acked as one:

- only while the consumer's flow is active and its generation is the one fetched under, and
  only for partitions still active (not paused, not revoked), as ``getmany`` checks;
- records before the partition's read offset are dropped, as Faust drops them, and a
  slice covers the offsets from the last one read on, so what Kafka skipped (compacted or
  transaction markers) is acked with it, as Faust's gaps are; a fetch that waited out the end
  of a rebalance is dropped if the Kafka client's partition was seeked after it (it is
  fetched again from there), and kept otherwise (nothing fetches it again);
- the app's flow control and the producer buffer are waited for before each hand-over, as
  the conductor waits before each message; a fetch is put whole, and a buffer holding more
  than its limit holds the loop before the next fetch (Faust's put into a full queue does);
- the offsets fetched for a buffer are announced to it in the consumer's thread, as the
  Kafka client hands them over (``announce_in_thread``), so that they are never out of sight
  of ``BatchConsumer.unread`` between the client and the buffer, and the client's position
  after the fetch is noted there too;
- ``broker_commit_every`` commits as Faust's loop does.

Records of the state tables' changelogs, read while they recover, go into their stores a
fetch at a time, all but the last of each (agents.restore). Records of every other topic take
Faust's own per-message path, unchanged, in its round-robin order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP

from agents.batches import BatchTopic, FetchBuffer, Fetched, client_position
from agents.restore import RecordsRestore
from pipeline.offsetresets import AppliedOffset, OffsetResets

log = logging.getLogger(__name__)

#: Faust's loop yields to the event loop every 100 messages (the table recovery that reads
#: them runs there); a slice is handed over without any per-record work, so only here.
YIELD_EVERY = 100
#: How often a fetch put during the end of a rebalance looks whether it has ended.
REBALANCE_POLL_SECONDS = 0.01


def batch_buffers(app: Any) -> Callable[[str], FetchBuffer | None]:
    """The buffer of the batch topic subscribed to ``topic``, or None for a topic that has
    none (or is subscribed to by anything else too: Faust's path serves every subscriber)."""
    found: dict[str, FetchBuffer | None] = {}

    def buffer_of(topic: str) -> FetchBuffer | None:
        if topic not in found:
            channels = app.topics._topic_name_index.get(topic, ())
            only = next(iter(channels)) if len(channels) == 1 else None
            found[topic] = only.queue if isinstance(only, BatchTopic) else None
        return found[topic]

    return buffer_of


def from_read_offset(fetched: list[Any], read: int | None) -> list[Any]:
    """A fetch's records from the partition's read offset on: Faust drops those before it."""
    if read is None or fetched[0].offset >= read:
        return fetched
    return [record for record in fetched if record.offset >= read]


def install(
    consumer: Any,
    on_deleted: Callable[[str, int], None] | None = None,
    applied: AppliedOffset | None = None,
) -> None:
    """Give ``consumer`` (Faust's, before it starts) the fetch loop below, with each fetch
    announced to its buffer in the consumer's thread, and its offset resets said and counted
    (``OffsetResets``: ``on_deleted``, past what the state ``applied``)."""
    fetch_loop = FetchLoop(consumer, OffsetResets(on_deleted, applied))
    consumer._drain_messages = fetch_loop.run
    announce_in_thread(consumer._thread, fetch_loop.fetched)
    fetch_loop.resets.listen()

    async def forget_resets(sender: Any, revoked: Any, **_: Any) -> None:
        fetch_loop.resets.forget(revoked)

    consumer.app.on_partitions_revoked.connect(forget_resets)


def announce_in_thread(thread: Any, fetched: Callable[[TP, list[Any]], None]) -> None:
    """Call ``fetched`` (``FetchLoop.fetched``) with each partition's records in Faust's
    consumer thread, as the Kafka client hands them over (``_fetch_records``), before they
    cross to the main thread.

    The client's position moves past a fetch in that thread, and the fetch reaches the fetch
    loop only after the main thread ran whatever was ready before it: a batch handled in
    between found the fetch's records neither in the client nor in the buffer
    (``BatchConsumer.unread``), its partition's watermark went to the newest event of the
    other topics, and the fetch's events were too late (all of one partition's resolutions
    in about one run in six of tests/agents/test_five_numbers_live.py's backlog)."""
    fetch_records = thread._fetch_records

    async def announced(*args: Any, **kwargs: Any) -> Any:
        records = await fetch_records(*args, **kwargs)
        for tp, handed in records.items():
            if handed:
                fetched(tp, handed)
        return records

    thread._fetch_records = announced


class FetchLoop:
    """The loop Faust's Fetcher runs (as the consumer's ``_drain_messages``): fetch, then hand
    each partition's records to its batch buffer (``hand_over``), a state table's changelog
    records to its store (``restore``) or, for any other topic, to Faust's per-message path
    (``deliver_each``)."""

    def __init__(self, consumer: Any, resets: OffsetResets | None = None) -> None:
        self.consumer = consumer
        self.app = consumer.app
        self.resets = OffsetResets() if resets is None else resets
        self.buffer_of = batch_buffers(self.app)
        self.restore = RecordsRestore(self.app)
        self.read_offset: dict[TP, int | None] = consumer._read_offset
        self.since_yield = 0  # messages handed over one by one since the loop last yielded
        # the Kafka client's position of each batch topic's partition after its last fetch
        self.fetched_to: dict[TP, int | None] = {}

    def position_of(self, tp: TP) -> int | None:
        return client_position(self.consumer, tp)

    def fetched(self, tp: TP, records: list[Any]) -> None:
        """In the consumer's thread, as the client hands ``records`` over: say what an offset
        reset before them skipped, announce them to their buffer (if their topic has one) and
        note the client's position after them."""
        self.resets.fetched(tp, records[0].offset)
        buffer = self.buffer_of(tp.topic)
        if buffer is not None:
            buffer.announce(tp, records[-1].offset)
            self.fetched_to[tp] = self.position_of(tp)

    async def run(self, fetcher: Any) -> None:
        consumer = self.consumer
        consumer_should_stop = consumer._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                consumer.diag.set_flag(CONSUMER_FETCHING)
                records, active = await consumer._wait_next_records(1.0)
                await consumer.sleep(0)  # as Faust's loop: a fetch may not have yielded
                if records and not consumer.should_stop:
                    await self.deliver(records, active)
                consumer.diag.unset_flag(CONSUMER_FETCHING)
        except consumer.consumer_stopped_errors:
            if consumer.transport.app.should_stop:
                log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if consumer.transport.app.should_stop:
                log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            consumer.diag.unset_flag(CONSUMER_FETCHING)

    async def deliver(self, records: Mapping[TP, list[Any]], active: set[TP] | None) -> None:
        consumer, app = self.consumer, self.app
        generation = app.consumer_generation_id
        batched: list[tuple[FetchBuffer, TP, list[Any]]] = []
        others: dict[TP, list[Any]] = {}
        for tp, fetched in records.items():
            if active is not None and tp not in active and tp not in consumer._buffered_partitions:
                continue
            buffer = self.buffer_of(tp.topic)
            if buffer is None:
                others[tp] = fetched
            else:  # announced already (announce_in_thread)
                batched.append((buffer, tp, fetched))
        for buffer, tp, fetched in batched:
            if not consumer.flow_active or app.consumer_generation_id != generation:
                return  # a rebalance: what was fetched is fetched again after it
            app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
            await self.hand_over(buffer, tp, fetched, generation)
        if others:
            await self.deliver_each(self.restored(others, generation), generation)
        for buffer in {id(b): b for b, _, _ in batched}.values():
            await buffer.room()  # before the next fetch

    async def commit_if_due(self) -> None:
        """Commit once ``broker_commit_every`` offsets were acked since the last time, as
        Faust's loop does before each hand-over."""
        consumer = self.consumer
        commit_every = consumer._commit_every
        if commit_every is not None and consumer._n_acked >= commit_every:
            consumer._n_acked = 0
            await consumer.commit()

    async def hand_over(
        self, buffer: FetchBuffer, tp: TP, fetched: list[Any], generation: int
    ) -> None:
        """Put what ``tp``'s fetch brings from its read offset on, in slices of a batch."""
        app = self.app
        position = self.fetched_to.get(tp)  # the client's, after this fetch
        size = buffer.size
        while fetched:
            await self.commit_if_due()
            await app.flow_control.acquire()
            await app.producer.buffer.wait_until_ebb()
            if app.rebalancing:
                await self.rebalanced(generation)
            if app.consumer_generation_id != generation:
                return
            if self.position_of(tp) != position:
                # Seeked after this fetch (at the end of a recovery, to the committed offset):
                # the Kafka client fetches from there again. Put, it would come twice.
                return
            # Faust's recovery seeks a partition in the client, and only after the others
            # sets its read offset (the next one to read): a fetch the client made between
            # the two is from the new position on, and nothing fetches it again. Dropped,
            # its records were lost (the next fetch's slice covered them, below).
            read = self.read_offset.get(tp)
            fetched = from_read_offset(fetched, read)
            if not fetched:
                return
            # What Kafka skipped after the last offset read (compacted, transaction markers)
            # is acked with the slice, as Faust's gaps are (after a seek, the read offset is
            # the next one to read, and the fetch starts there).
            head = fetched[0].offset
            first = head if read is None or head <= read else read + 1
            part, fetched = fetched[:size], fetched[size:]
            buffer.put_fetched(Fetched(tp, part, first, generation))
            self.read_offset[tp] = part[-1].offset

    def restored(self, records: dict[TP, list[Any]], generation: int) -> dict[TP, list[Any]]:
        """Put the state tables' changelog records into their stores (agents.restore) under
        the conditions Faust's path applies: flow on, the generation unchanged, from the read
        offset on; what is left (the last of each, other topics' all) goes Faust's path."""
        consumer = self.consumer
        if not consumer.flow_active or self.app.consumer_generation_id != generation:
            return records  # Faust's path drops them, to be fetched again
        left: dict[TP, list[Any]] = {}
        for tp, fetched in records.items():
            fetched = from_read_offset(fetched, self.read_offset.get(tp))
            if fetched:
                left[tp] = self.restore.take(tp, fetched)
        return left

    async def rebalanced(self, generation: int) -> None:
        """Wait for the rebalance to end, or for another to start. At the end of a recovery
        Faust resumes the stream partitions and seeks them to their committed offsets, and only
        then resumes its flow control, which clears the buffers (``FetchBuffer`` is cleared
        on resume, as Faust's stream queues are): a fetch put in between was cleared with its
        offsets read, so it was never processed, and its partitions stalled until a restart
        (seen once table restores took a fetch at a time, agents.restore, and so ended while
        the fetch loop was free to fetch)."""
        consumer, app = self.consumer, self.app
        while app.rebalancing and consumer.flow_active:
            if app.consumer_generation_id != generation:
                return
            await asyncio.sleep(REBALANCE_POLL_SECONDS)

    async def deliver_each(self, records: dict[TP, list[Any]], generation: int) -> None:
        """Faust's own path, record by record (``getmany`` and ``_drain_messages``)."""
        consumer, app = self.consumer, self.app
        acks_enabled_for = app.topics.acks_enabled_for
        callback = consumer.callback
        for tp, record in consumer.scheduler.iterate(records):
            if not consumer.flow_active or app.consumer_generation_id != generation:
                return
            self.since_yield += 1
            if self.since_yield > YIELD_EVERY:  # a hand-over need not suspend: let others run
                self.since_yield = 0
                await asyncio.sleep(0)
            app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
            message = consumer._to_message(tp, record)
            offset = message.offset
            read = self.read_offset.get(tp)
            if read is None or offset >= read:
                if offset - (read or 0) > 1 and read and acks_enabled_for(message.topic):
                    await consumer._add_gap(tp, read + 1, offset)
                await self.commit_if_due()
                await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                self.read_offset[tp] = offset
