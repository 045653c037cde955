"""The agents' messages in batches, taken straight from Faust's consumer.

A Faust agent gets each message through a stream: the conductor wraps it in an Event and puts
it on the channel's queue, the stream takes it off, tracks it, runs its sensors and
processors, and ``take_events`` buffers it once more and acks it with more sensors. At
bench/throughput rates that was a sixth of the worker's time, spent on batches that want only
the messages. Here a subscription is a ``BatchTopic``: the conductor's decode step hands the
message through unchanged, its queue (a ``MessageBuffer``) keeps the messages as they are, and
``consume`` takes them off in batches.

What the stream did for correctness is kept. A message is tracked when taken and acked only
after its batch was handled, so Faust commits no offset past a batch in hand and a rebalance
waits for it (``consumer.wait_empty``). The buffer is a flow-control queue, cleared at a
rebalance like the streams' queues, and a message fetched before the last rebalance (an older
consumer generation) is dropped unprocessed, as the stream drops it: recovery seeks every
partition back to its committed offset, so it is fetched again. A batch that fails as a whole
crashes the worker instead of going on with state ahead of its checkpoint; a restart resumes
from the checkpoint (pipeline.checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.exceptions import ConsumerNotStarted
from faust.types import TP, Message
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from agents.raw import RawSchema

log = logging.getLogger(__name__)

BATCH_EVENTS = 2000
BATCH_SECONDS = 0.2


class MessageBuffer(ThrowableQueue[Message]):
    """A channel queue of raw messages that hands them out in batches of up to ``size``, or
    what arrived within ``within`` seconds of a batch's first message."""

    def __init__(
        self, maxsize: int, *, flow_control: FlowControlEvent, size: int, within: float
    ) -> None:
        super().__init__(maxsize, flow_control=flow_control, clear_on_resume=True)
        self.size = size
        self.within = within
        self._filled = asyncio.Event()  # set once the buffer holds the rest of a batch
        self.newest: dict[TP, int] = {}  # partition -> offset of the newest message put

    def clear(self) -> None:
        super().clear()
        self.newest.clear()

    def put_nowait_enhanced(
        self,
        value: Message,
        *,
        on_pressure_high: Callable[[], Any],
        on_pressure_drop: Callable[[], Any],
    ) -> bool:
        high = super().put_nowait_enhanced(
            value, on_pressure_high=on_pressure_high, on_pressure_drop=on_pressure_drop
        )
        self.newest[value.tp] = value.offset
        if self.qsize() >= self.size - 1:
            self._filled.set()
        return high

    async def take(self) -> list[Message]:
        """The next batch: waits for its first message, then for the rest until ``within``."""
        batch = [await self.get()]
        if self.qsize() < self.size - 1:
            self._filled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._filled.wait(), self.within)
        while len(batch) < self.size and not self.empty():
            batch.append(self.get_nowait())
        return batch


class BatchTopic(faust.Topic):
    """A topic whose messages reach ``consume`` as Kafka delivered them (no Event, no stream);
    for sending it is a raw topic (agents.raw)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("schema", RawSchema(key_serializer="raw", value_serializer="raw"))
        super().__init__(*args, **kwargs)

    def _compile_decode(self) -> None:
        async def decode(message: Message, *, propagate: bool = False) -> Message:
            return message

        self.decode = decode  # type: ignore[method-assign,assignment]

    @property
    def queue(self) -> MessageBuffer:
        if self._queue is None:
            maxsize = self.maxsize or self.app.conf.stream_buffer_maxsize
            self._queue = MessageBuffer(
                maxsize,
                flow_control=self.app.flow_control,
                size=BATCH_EVENTS,
                within=BATCH_SECONDS,
            )
        return cast(MessageBuffer, self._queue)


def client_lag(consumer: Any, tp: TP) -> int | None:
    """How many messages of ``tp`` aiokafka has not handed to Faust's consumer yet (fetched
    or not), or None when it does not know (not assigned, not positioned, nothing fetched
    yet). Faust reads positions only through its consumer thread, a round trip per call;
    this reads aiokafka's subscription state, as the thread's ``position`` does itself."""
    try:
        client = consumer._thread._ensure_consumer()
        assignment = client._subscription.subscription.assignment
    except (AttributeError, ConsumerNotStarted):  # not started, or in a rebalance
        return None
    state = None if assignment is None else assignment.state_value(tp)
    if state is None or state.highwater is None or not state.has_valid_position:
        return None
    return int(state.highwater) - int(state.position)


def batch_topic(app: faust.App, *names: str) -> BatchTopic:
    return BatchTopic(app, topics=list(names))


Handler = Callable[[dict[int, list[Message]]], Awaitable[None]]


class BatchConsumer:
    """Hands every batch of a subscription to ``handle``, grouped by partition (in offset
    order), and acks the batch's messages only after ``handle`` returned."""

    def __init__(self, app: faust.App, topic: BatchTopic, handle: Handler, name: str) -> None:
        self.app = app
        self.channel = cast(BatchTopic, aiter(topic))  # subscribes: the consumer fetches it
        self.handle = handle
        self.name = name

    def fresh(self, taken: list[Message]) -> dict[int, list[Message]]:
        """What of ``taken`` to handle, tracked as in hand: nothing during a rebalance, and
        nothing fetched before the last one (both are fetched again after it)."""
        by_partition: dict[int, list[Message]] = defaultdict(list)
        if not self.app.flow_control.is_active():
            return by_partition
        current = self.app.consumer_generation_id
        track = self.app.consumer.track_message
        for message in taken:
            if message.generation_id == current:
                message.tracked = True
                track(message)
                by_partition[message.partition].append(message)
        return by_partition

    async def run(self) -> None:
        consumer = self.app.consumer
        on_message_out = self.app.sensors.on_message_out
        buffer = self.channel.queue
        while True:
            by_partition = self.fresh(await buffer.take())
            if not by_partition:
                continue
            try:
                await self.handle(by_partition)
            except Exception as exc:
                log.exception(
                    "%s: a batch failed; stopping the worker (restarted, it resumes from its "
                    "last checkpoint)",
                    self.name,
                )
                await self.app.crash(exc)
                return
            for messages in by_partition.values():
                for message in messages:
                    message.ack(consumer)
                    on_message_out(message.tp, message.offset, message)

    def unread(self, tp: TP, next_offset: int) -> bool:
        """Whether ``tp`` has messages from ``next_offset`` on that no batch has had yet: in
        the buffer, or not yet handed over by the Kafka client (fetched or not). What the
        client handed to Faust's fetch loop but the loop has not buffered yet (one fetch at
        most) is not seen. An unknown offset counts as read: nothing waits on a guess."""
        if self.channel.queue.newest.get(tp, -1) >= next_offset:
            return True
        return (client_lag(self.app.consumer, tp) or 0) > 0


def consume(app: faust.App, topic: BatchTopic, handle: Handler, name: str) -> BatchConsumer:
    """Subscribe to ``topic`` and run a BatchConsumer of it while the app runs."""
    batches = BatchConsumer(app, topic, handle, name)
    app.task(batches.run)
    return batches
