"""The review page's Kafka edge: the queue follows three topics; decisions are published.

The queue is rebuilt from the topics at start (candidates, decisions, eval cases, from their
beginning) and then follows them, so any number of page restarts agree with the topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer

from pipeline.codec import Codec, CodecError
from pipeline.core import to_ms
from pipeline.kafka_security import client_options
from pipeline.publisher import Publisher
from pipeline.review.queue import ReviewQueue
from pipeline.settings import Settings

log = logging.getLogger(__name__)
FOLLOWED = ("eval-candidates", "reviews", "eval-cases")
DECISION_TIMEOUT_MS = 10_000


class ReviewFeed:
    def __init__(self, settings: Settings, queue: ReviewQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.codec = Codec.load()
        self.publisher: Publisher | None = None  # made in start(): it needs the running loop
        self.ready = asyncio.Event()  # set once the topics were read up to their end
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A reviewer waits for the decision: one that cannot find its topic's leader (the
        # broker away) fails after this long, not aiokafka's 40 s.
        self.publisher = Publisher(
            self.settings, self.codec, linger_ms=0, request_timeout_ms=DECISION_TIMEOUT_MS
        )
        await self.publisher.start()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.publisher is not None:
            await self.publisher.close()

    async def publish_decision(
        self, decision: dict[str, Any], eval_case: dict[str, Any] | None
    ) -> None:
        """Both records durable before the queue counts the decision (then the page moves on)."""
        if self.publisher is None:
            raise RuntimeError("the review feed is not started")
        await self.publisher.publish("reviews", decision)
        if eval_case is not None:
            await self.publisher.publish("eval-cases", eval_case)
        await self.publisher.flush()
        self.queue.add_decision(decision)
        if eval_case is not None:
            self.queue.add_eval_case(eval_case)

    async def _follow(self) -> None:
        topics = {self.settings.topic(name): name for name in FOLLOWED}
        consumer = AIOKafkaConsumer(
            *topics,
            **client_options(self.settings),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            ends: dict[Any, int] | None = None
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                for tp, messages in batches.items():
                    for message in messages:
                        self._apply(topics[tp.topic], message)
                if ends is None and consumer.assignment():
                    ends = await consumer.end_offsets(list(consumer.assignment()))
                if not self.ready.is_set() and ends is not None:
                    positions = [await consumer.position(tp) for tp in ends]
                    if all(p >= ends[tp] for p, tp in zip(positions, ends, strict=True)):
                        self.ready.set()
                        log.info("review queue loaded: %d candidates", len(self.queue.candidates))
        finally:
            await consumer.stop()

    def _apply(self, topic: str, message: Any) -> None:
        if message.value is None:
            return
        try:
            record = self.codec.decode(message.value).record
        except CodecError as exc:  # the pipeline's DLQ has it; the page just skips it
            log.warning(
                "skipped an unreadable %s record at offset %d: %s", topic, message.offset, exc
            )
            return
        record = {**record, "ts": to_ms(record["ts"])}
        if topic == "eval-candidates":
            self.queue.add_candidate(record)
        elif topic == "reviews":
            self.queue.add_decision(record)
        else:
            self.queue.add_eval_case(record)
