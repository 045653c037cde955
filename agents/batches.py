"""The agents' messages in batches, taken straight from Faust's consumer.

A Faust agent gets each message through a stream: the conductor wraps it in an Event and puts
it on the channel's queue, the stream takes it off, tracks it, runs its sensors and
processors, and ``take_events`` buffers it once more and acks it with more sensors. At
bench/throughput rates that was a sixth of the worker's time, spent on batches that want only
the records. Here a subscription is a ``BatchTopic``: the fetch loop (agents.fetch) puts the
records of each fetch of one of its partitions on its buffer whole (``Fetched``, Kafka's own
record objects), and ``consume`` takes them off in batches.

What the stream did for correctness is kept, per fetched slice instead of per message. A slice
is tracked when taken and acked only after its batch was handled, so Faust commits no offset
past a batch in hand and a rebalance waits for it (``consumer.wait_empty``). The buffer is a
flow-control queue, cleared at a rebalance like the streams' queues, and a slice fetched
before the last rebalance (an older consumer generation) is dropped unprocessed, as the stream
drops a message: recovery seeks every partition back to its committed offset, so it is fetched
again. A batch that fails as a whole crashes the worker instead of going on with state ahead
of its checkpoint; a restart resumes from the checkpoint (pipeline.checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import faust
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from agents.fence import Fence, Fenced
from agents.raw import RawSchema

log = logging.getLogger(__name__)

#: The exit status of a worker that found it may no longer own its partitions (agents.fence).
FENCED_EXIT_CODE = 75
#: Records per batch at most. 10,000 was measured twice (docs/benchmark.md): its gain was
#: within the shared machine's noise, and it cost median freshness (before the fetch loop) or
#: memory (after it), so batches stay at 2,000.
BATCH_EVENTS = 2000
BATCH_SECONDS = 0.2


class Fetched:
    """Consecutive records of one topic-partition from one fetch (aiokafka's records), tracked
    and acked as one. It covers the offsets from ``first`` to its last record's: those before
    its first record that Kafka skipped (compaction, transaction markers) are acked with it."""

    __slots__ = ("__weakref__", "acked", "first", "generation_id", "records", "tp")

    refcount = 1  # what Faust's wait_empty logs of what it waits for

    def __init__(self, tp: TP, records: list[Any], first: int, generation_id: int) -> None:
        self.tp = tp
        self.records = records
        self.first = first
        self.generation_id = generation_id
        self.acked = False

    def __repr__(self) -> str:
        return f"<Fetched {self.tp.topic}[{self.tp.partition}]@{self.first}..{self.last}>"

    @property
    def last(self) -> int:
        return int(self.records[-1].offset)

    def ack(self, consumer: Any) -> None:
        """Mark its offsets acked in Faust's consumer, as ``Consumer.ack`` does a message's:
        Faust commits up to the first offset not acked."""
        with ack_lock:
            if self.acked:
                return
            self.acked = True
            consumer._unacked_messages.discard(self)
            tp = self.tp
            if not consumer.app.topics.acks_enabled_for(tp.topic):
                return
            committed = consumer._committed_offset[tp]
            start = self.first if committed is None else max(self.first, committed)
            index = consumer._acked_index[tp]
            new = [offset for offset in range(start, self.last + 1) if offset not in index]
            index.update(new)
            consumer._acked[tp].extend(new)
            consumer._n_acked += len(new)
            notify(consumer._waiting_for_ack)


class FetchBuffer(ThrowableQueue[Fetched]):
    """A channel queue of fetched slices that hands them out in batches of up to ``size``
    records, or what arrived within ``within`` seconds of a batch's first slice. A fetch is
    put whole (its records are in memory already); beyond ``maxsize`` records the fetch loop
    waits for ``room`` before it fetches more, as Faust's buffers hold a fetch."""

    def __init__(
        self, maxsize: int, *, flow_control: FlowControlEvent, size: int, within: float
    ) -> None:
        super().__init__(0, flow_control=flow_control, clear_on_resume=True)
        self.limit = maxsize
        self.size = size
        self.within = within
        self.records = 0  # how many records the slices in the buffer hold
        self._filled = asyncio.Event()  # set once the buffer holds the rest of a batch
        self._wanted = size  # records that make up the rest of the batch being taken
        self._room = asyncio.Event()  # set while the buffer holds fewer than ``limit`` records
        self._room.set()
        # partition -> offset of the newest record fetched for the buffer (announced before
        # its fetch is put, so that no record is in neither the client nor the buffer)
        self.newest: dict[TP, int] = {}

    def clear(self) -> None:
        super().clear()
        self.records = 0
        self.newest.clear()
        self._room.set()

    def announce(self, tp: TP, offset: int) -> None:
        """Records of ``tp`` up to ``offset`` were fetched and are about to be put."""
        if offset > self.newest.get(tp, -1):
            self.newest[tp] = offset

    def put_fetched(self, fetched: Fetched) -> None:
        self.put_nowait(fetched)
        self.records += len(fetched.records)
        self.announce(fetched.tp, fetched.last)
        if self.records >= self._wanted:
            self._filled.set()
        if self.records >= self.limit:
            self._room.clear()

    async def room(self) -> None:
        """Wait until the buffer holds fewer than ``limit`` records."""
        await self._room.wait()

    def _taken(self, fetched: Fetched) -> Fetched:
        self.records -= len(fetched.records)
        if self.records < self.limit:
            self._room.set()
        return fetched

    async def take(self) -> list[Fetched]:
        """The next batch: waits for its first slice, then for the rest until ``within``."""
        batch = [self._taken(await self.get())]
        taken = len(batch[0].records)
        self._wanted = self.size - taken
        if self.records < self._wanted:
            self._filled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._filled.wait(), self.within)
        waiting = cast(Any, self)._queue  # asyncio.Queue's deque
        while waiting and taken + len(waiting[0].records) <= self.size:
            batch.append(self._taken(self.get_nowait()))
            taken += len(batch[-1].records)
        return batch

    def put_nowait_enhanced(self, value: Any, **_: Any) -> bool:
        raise RuntimeError(
            "a BatchTopic's records come through agents.fetch, installed on Faust's consumer "
            "before it starts (pipeline.worker.make_worker); Faust's conductor handed it one"
        )


class BatchTopic(faust.Topic):
    """A topic whose records reach ``consume`` as Kafka delivered them (no Message, no Event,
    no stream), fetched by agents.fetch; for sending it is a raw topic (agents.raw)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("schema", RawSchema(key_serializer="raw", value_serializer="raw"))
        super().__init__(*args, **kwargs)

    @property
    def queue(self) -> FetchBuffer:
        if self._queue is None:
            maxsize = self.maxsize or self.app.conf.stream_buffer_maxsize
            self._queue = FetchBuffer(
                maxsize,
                flow_control=self.app.flow_control,
                size=BATCH_EVENTS,
                within=BATCH_SECONDS,
            )
        return cast(FetchBuffer, self._queue)


def _client_state(consumer: Any, tp: TP) -> Any | None:
    """aiokafka's state of ``tp`` in Faust's consumer, or None when the client is not started,
    is in a rebalance or does not have ``tp`` assigned. Faust reads positions only through its
    consumer thread, a round trip per call; this reads aiokafka's subscription state, as the
    thread's ``position`` does itself."""
    try:
        client = consumer._thread._ensure_consumer()
        assignment = client._subscription.subscription.assignment
    except (AttributeError, ConsumerNotStarted):  # not started, or in a rebalance
        return None
    return None if assignment is None else assignment.state_value(tp)


def client_position(consumer: Any, tp: TP) -> int | None:
    """The offset aiokafka fetches ``tp`` from next (None when it has none: not assigned, in
    a rebalance, or not positioned yet). It moves only as records are handed over and when the
    partition is seeked, so a position unlike the one a fetch left says it was seeked since."""
    state = _client_state(consumer, tp)
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def client_highwater(consumer: Any, tp: TP) -> int | None:
    """The log end offset of ``tp`` as of the client's last fetch of it (None before one)."""
    state = _client_state(consumer, tp)
    return None if state is None or state.highwater is None else int(state.highwater)


def client_may_hold(consumer: Any, tp: TP) -> bool:
    """Whether aiokafka may still hand over messages of an assigned ``tp``: it has some not
    handed over, or it has not fetched ``tp`` once since the assignment (no position or end
    offset yet), so it may hold any number. A client positions and fetches the partitions of
    an assignment one by one, so a worker's first batches can come from one topic of a
    partition before its other topics were fetched at all."""
    state = _client_state(consumer, tp)
    if state is None:
        return False
    if state.highwater is None or not state.has_valid_position:
        return True
    return int(state.highwater) > int(state.position)


def unprocessed(consumer: Any, buffers: Iterable[FetchBuffer]) -> dict[TP, int]:
    """Per partition, the first offset fetched for a batch subscription and not processed yet:
    a slice waiting in one of ``buffers``, or in a batch in hand (acked once handled). Called
    on the event loop, which alone puts, takes and acks slices."""
    slices = [s for s in list(consumer._unacked_messages) if isinstance(s, Fetched)]
    for buffer in buffers:
        slices.extend(cast(Any, buffer)._queue)  # asyncio.Queue's deque
    first: dict[TP, int] = {}
    for fetched in slices:
        known = first.get(fetched.tp)
        if known is None or fetched.first < known:
            first[fetched.tp] = fetched.first
    return first


def batch_topic(app: faust.App, *names: str) -> BatchTopic:
    return BatchTopic(app, topics=list(names))


Handler = Callable[[dict[int, list[Any]]], Awaitable[None]]


class BatchConsumer:
    """Hands every batch of a subscription to ``handle``, its records (aiokafka's) grouped by
    partition in offset order, and acks the batch only after ``handle`` returned."""

    def __init__(
        self, app: faust.App, topic: BatchTopic, handle: Handler, name: str, fence: Fence
    ) -> None:
        self.app = app
        self.channel = cast(BatchTopic, aiter(topic))  # subscribes: the consumer fetches it
        self.handle = handle
        self.name = name
        self.fence = fence
        self.generation = 0  # the consumer generation the batch in hand was taken in

    async def ensure_member(self, batch: dict[int, list[Any]]) -> None:
        """For ``handle`` to call before it writes anything of ``batch``: raises Fenced when
        this worker may no longer own its partitions. Either a rebalance came while the batch
        was in hand (Faust waits for it, but not forever: the stalled worker of
        tests/agents/test_distributed.py rejoined and had its state forgotten meanwhile), or
        the process stood still and the group has dropped it (agents.fence)."""
        self._same_generation()
        await self.fence.ensure_member(batch, self.generation)

    def _same_generation(self) -> None:
        current = self.app.consumer_generation_id
        if current != self.generation:
            raise Fenced(
                f"a rebalance (generation {self.generation} -> {current}) came while a batch "
                "was in hand: its partitions may have another owner or be restored anew, so "
                "it writes nothing of the batch and stops; restarted, it rejoins"
            )

    def fresh(self, taken: list[Fetched]) -> list[Fetched]:
        """What of ``taken`` to handle, tracked as in hand: nothing during a rebalance, and
        nothing fetched before the last one (both are fetched again after it)."""
        if not self.app.flow_control.is_active():
            return []
        current = self.generation = self.app.consumer_generation_id
        in_hand = cast(Any, self.app.consumer)._unacked_messages  # what wait_empty waits for
        kept = [fetched for fetched in taken if fetched.generation_id == current]
        in_hand.update(kept)
        return kept

    async def run(self) -> None:
        consumer = self.app.consumer
        buffer = self.channel.queue
        while True:
            kept = self.fresh(await buffer.take())
            if not kept:
                continue
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for fetched in kept:
                by_partition[fetched.tp.partition].extend(fetched.records)
            try:
                await self.handle(by_partition)
            except Fenced as exc:
                # At once, as SIGKILL would stop it (the checkpoints are made for that): a clean
                # stop goes through the rebalance it is in, writes on meanwhile and can hang
                # there, holding partitions it no longer processes.
                log.critical("%s: %s", self.name, exc)
                logging.shutdown()
                os._exit(FENCED_EXIT_CODE)
            except Exception as exc:
                log.exception(
                    "%s: a batch failed; stopping the worker (restarted, it resumes from its "
                    "last checkpoint)",
                    self.name,
                )
                await self.app.crash(exc)
                return
            for fetched in kept:
                fetched.ack(consumer)

    def unread(self, tp: TP, next_offset: int) -> bool:
        """Whether ``tp`` may have records from ``next_offset`` on that no batch has had yet:
        in the buffer or announced to it (agents.fetch, as they leave the Kafka client), or
        not yet handed over by the client (fetched or not, or not fetched once since the
        assignment: ``client_may_hold``). What is counted as read here lets the partition's
        watermark go past it, and events found behind it later are too late."""
        if self.channel.queue.newest.get(tp, -1) >= next_offset:
            return True
        return client_may_hold(self.app.consumer, tp)


def consume(
    app: faust.App, topic: BatchTopic, handle: Handler, name: str, fence: Fence
) -> BatchConsumer:
    """Subscribe to ``topic`` and run a BatchConsumer of it while the app runs."""
    batches = BatchConsumer(app, topic, handle, name, fence)
    app.task(batches.run)
    return batches
