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
from pipeline.publisher import NotDelivered, Publisher
from pipeline.review.queue import ReviewQueue
from pipeline.settings import Settings
from pipeline.status import deleted_before

log = logging.getLogger(__name__)
FOLLOWED = ("eval-candidates", "reviews", "eval-cases")
DECISION_TIMEOUT_MS = 10_000
#: How long a reviewer waits for Kafka to confirm a decision. Past it the page says so and the
#: send goes on (aiokafka retries it while the broker's leaders are known): a little longer
#: than DECISION_TIMEOUT_MS, so that a send refused for want of a leader is said as refused.
DECISION_WAIT_SECONDS = DECISION_TIMEOUT_MS / 1000 + 2


class DecisionUnconfirmed(RuntimeError):
    """Kafka did not confirm a decision within DECISION_WAIT_SECONDS; it is still being sent."""


class ReviewFeed:
    def __init__(self, settings: Settings, queue: ReviewQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.codec = Codec.load()
        self.publisher: Publisher | None = None  # made in start(): it needs the running loop
        self.ready = asyncio.Event()  # set once the topics were read up to their end
        self._task: asyncio.Task[None] | None = None
        # the sends of decisions not confirmed in time (a task needs a reference to run on)
        self._sending: set[asyncio.Task[None]] = set()

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
            waiting = sorted(self.queue.unconfirmed)
            try:  # bounded: the broker may be away for good
                await self.publisher.close(give_up_seconds=DECISION_WAIT_SECONDS)
            except NotDelivered as exc:
                log.error(
                    "the page stopped before Kafka confirmed the decisions on %s (%s): they are "
                    "not saved, and those candidates are open again at the next start",
                    ", ".join(waiting) or "a candidate",
                    exc,
                )

    async def publish_decision(
        self, decision: dict[str, Any], eval_case: dict[str, Any] | None
    ) -> None:
        """Both records durable before the queue counts the decision (then the page moves on).
        Raises DecisionUnconfirmed when Kafka has not confirmed them within
        DECISION_WAIT_SECONDS: the queue holds the candidate as ``unconfirmed`` (open to no
        one) until the send ends, confirmed (decided) or failed (open again)."""
        if self.publisher is None:
            raise RuntimeError("the review feed is not started")
        sending = asyncio.create_task(self._publish(self.publisher, decision, eval_case))
        try:
            await asyncio.wait({sending}, timeout=DECISION_WAIT_SECONDS)
        finally:
            if not sending.done():  # timed out, or the request went away: the send goes on
                candidate_id = str(decision["candidate_id"])
                self.queue.hold_unconfirmed(decision)
                self._sending.add(sending)
                sending.add_done_callback(lambda task: self._settled(candidate_id, task))
        if not sending.done():
            raise DecisionUnconfirmed(
                f"Kafka has not confirmed it within {DECISION_WAIT_SECONDS:g} s"
            )
        sending.result()  # raises what the send raised

    def _settled(self, candidate_id: str, sending: asyncio.Task[None]) -> None:
        """A decision not confirmed in time ended: decided (``_publish`` recorded it) or not
        written, when the candidate is open again."""
        self._sending.discard(sending)
        self.queue.release_unconfirmed(candidate_id)
        if sending.cancelled():
            return
        failed = sending.exception()
        if failed is None:
            log.info("Kafka confirmed the decision on %s late", candidate_id)
        else:
            log.warning(
                "the decision on %s was not written (%s); it is open again", candidate_id, failed
            )

    async def _publish(
        self, publisher: Publisher, decision: dict[str, Any], eval_case: dict[str, Any] | None
    ) -> None:
        sends: list[tuple[str, dict[str, Any]]] = [("reviews", decision)]
        if eval_case is not None:
            sends.append(("eval-cases", eval_case))
        await publisher.publish_confirmed(sends)
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
            isolation_level="read_committed",  # as the workers read (pipeline.worker)
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
                    assigned = list(consumer.assignment())
                    ends = await consumer.end_offsets(assigned)
                    deleted = deleted_before(await consumer.beginning_offsets(assigned))
                    for topic, count in sorted(deleted.items()):
                        say_deleted(topics[topic], topic, count)
                if not self.ready.is_set() and ends is not None:
                    positions = [await consumer.position(tp) for tp in ends]
                    if all(p >= ends[tp] for p, tp in zip(positions, ends, strict=True)):
                        self.ready.set()
                        log.info(
                            "review queue loaded: %d candidates open, %d decided",
                            len(self.queue.candidates),
                            len(self.queue.decided),
                        )
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
            queued_ms = message.timestamp if message.timestamp > 0 else None  # -1: unknown
            self.queue.add_candidate(record, queued_ms=queued_ms)
        elif topic == "reviews":
            self.queue.add_decision(record)
        else:
            self.queue.add_eval_case(record)


def say_deleted(name: str, topic: str, count: int) -> None:
    """Log what the queue lacks for records of ``topic`` (its logical ``name``) that Kafka
    deleted: candidates go by the topic's retention; decisions are kept for good
    (pipeline.topics), so only an operator deletes them."""
    if name == "eval-candidates":
        log.info(
            "%d earlier candidate records of %s were deleted by Kafka (the topic's retention) "
            "before this start: those not decided are not in the queue (the archive keeps "
            "every candidate it read; a longer retention.ms on the topic keeps a longer "
            "backlog)",
            count, topic,
        )  # fmt: skip
    elif name == "reviews":
        log.warning(
            "%d decisions of %s were deleted from Kafka before this start: their candidates, "
            "if still on the candidates topic, are open again (the topic keeps decisions for "
            "good unless its retention.ms was changed)",
            count, topic,
        )  # fmt: skip
    else:
        log.warning(
            "%d eval cases of %s were deleted from Kafka before this start: the page does not "
            "show them among the similar eval cases",
            count, topic,
        )  # fmt: skip
