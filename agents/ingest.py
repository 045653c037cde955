"""Stage 1: consume the source topics, decode every record, dead-letter what fails, and turn
each partition's events into partial aggregates for stage 2 (agents/loops.py).

Events are taken in batches; each batch of a partition is applied to its PartitionCore, the
partials are sent to the repartition topic keyed by loop and are durable before the changed
state is checkpointed to the table's changelog (pipeline.checkpoint), marker last. After a
crash the state restores to the last marker and the events after it are applied again, exactly
once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import faust
from faust.types import TP

from agents.batches import BatchTopic, batch_topic, consume
from agents.batchsend import Record, send_keyed
from agents.fence import Fence
from agents.raw import raw_topic
from agents.state import (
    CheckpointedPartitions,
    aiokafka_producer,
    aligned_topics,
    state_table,
)
from pipeline.arrowcodec import ArrowDecoder
from pipeline.checkpoint import next_offsets
from pipeline.codec import Codec, CodecError
from pipeline.core import verdicts_of
from pipeline.deadletter import dead_letter_of
from pipeline.metrics import PipelineMetrics
from pipeline.partials import encode_change
from pipeline.partition import CASES, PartitionCore
from pipeline.processor import partition_key
from pipeline.settings import Settings
from pipeline.topics import EVENT_TOPICS, PARTITION_STATE, RECORD_OF, SOURCE_TOPICS

log = logging.getLogger(__name__)

#: A message to dead-letter: the message, the reason and the error text.
Failure = tuple[Any, str, str]


class DeadLetters:
    """Send a message that cannot be processed to the DLQ with its reason, durably."""

    def __init__(self, app: faust.App, settings: Settings, codec: Codec, metrics: PipelineMetrics):
        self.topic = raw_topic(app, settings.topic("dlq"))
        self.codec = codec
        self.metrics = metrics

    async def send(self, message: Any, reason: str, error: str) -> None:
        record = dead_letter_of(message, reason, error)
        delivery = await self.topic.send(value=self.codec.encode("DeadLetter", record))
        await delivery  # durable before this offset can be committed: nothing lost
        self.metrics.dead_letters.labels(message.topic, reason).inc()
        self.metrics.events.labels(message.topic, "dead_letter").inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )


def register(
    app: faust.App,
    settings: Settings,
    codec: Codec,
    metrics: PipelineMetrics,
    partials: BatchTopic,
    fence: Fence,
) -> Any:
    source = batch_topic(app, *(settings.topic(name) for name in SOURCE_TOPICS))
    dead_letters = DeadLetters(app, settings, codec, metrics)
    logical = {settings.topic(name): name for name in SOURCE_TOPICS}
    timed = {settings.topic(name) for name in EVENT_TOPICS}  # the ones with event time
    config = settings.core_config()

    def evicted(loop: str) -> None:
        metrics.evicted_cases.labels(loop).inc()

    def build(partition: int, records: Mapping[str, Any]) -> PartitionCore:
        return PartitionCore.from_records(
            config,
            partition,
            records,
            metrics.latency.observe,
            keeps_previous=True,
            on_evict=evicted,
        )

    # The cores hold the cases, so the table's store keeps no second copy of them.
    table = state_table(app, PARTITION_STATE, settings.partitions)
    states = CheckpointedPartitions(app, table, build, (CASES,), aligned_topics(settings))

    class Tally:
        """Counter increments of one batch, applied at once (a labelled inc costs microseconds,
        and a batch has thousands of events)."""

        def __init__(self) -> None:
            self.events: Counter[tuple[str, str]] = Counter()
            self.resolutions: Counter[tuple[str, str, str]] = Counter()
            self.verdicts: Counter[tuple[str, str, str]] = Counter()

        def add(
            self, full_topic: str, topic: str, status: str, record: Mapping[str, Any] | None
        ) -> None:
            self.events[(full_topic, status)] += 1
            if status != "ok" or record is None or topic == "inputs":  # inputs carry neither
                return
            loop = config.loop_label(str(record["loop"]))
            if topic == "resolutions":
                self.resolutions[(loop, record["resolver"], record["outcome"])] += 1
            for suite, passed in verdicts_of(topic, record):
                self.verdicts[(loop, suite.lower(), str(passed).lower())] += 1

        def publish(self) -> None:
            for pair, n in self.events.items():
                metrics.events.labels(*pair).inc(n)
            for triple, n in self.resolutions.items():
                metrics.resolutions.labels(*triple).inc(n)
            for triple, n in self.verdicts.items():
                metrics.eval_verdicts.labels(*triple).inc(n)

    decoder = ArrowDecoder(codec, light_inputs=True)

    def decode(messages: list[Any]) -> list[Any]:
        """Per message: its record, the CodecError it fails with, or None for a tombstone of
        the eval-cases topic. Each topic's messages are decoded at once (pipeline.arrowcodec):
        a few times faster than one by one, and the same values, errors and order."""
        expected = [
            None
            if m.value is None and m.key and logical[m.topic] == "eval-cases"
            else RECORD_OF[logical[m.topic]]
            for m in messages
        ]
        return decoder.mixed_rows(expected, [m.value for m in messages])

    def apply(core: PartitionCore, message: Any, decoded: Any, tally: Tally) -> Failure | None:
        """Apply one decoded message to its partition's core; returns what makes it a dead
        letter, if anything (sent by the caller, before the checkpoint)."""
        topic = logical[message.topic]
        try:
            if isinstance(decoded, CodecError):
                raise decoded
            if decoded is None:  # a tombstone
                status = core.delete_eval_case(bytes(message.key).decode())
            else:
                key = partition_key(topic, decoded)
                status = core.process(topic, key, decoded, message.value, message.timestamp)
        except Exception as exc:  # a worker never dies on one message
            if isinstance(exc, CodecError):
                reason, error = exc.reason, str(exc)
            else:
                log.exception("processing failed")
                reason, error = "processing_error", f"{type(exc).__name__}: {exc}"
            # Counted for the dead-letter rate, under its loop when it could be read.
            loop = decoded.get("loop") if isinstance(decoded, dict) else None
            core.dead_letter(loop, message.timestamp)  # aiokafka's: epoch ms
            return message, reason, error
        tally.add(message.topic, topic, status, decoded)
        return None

    partials_topic = partials.get_topic_name()

    async def ingest(by_partition: dict[int, list[Any]]) -> None:
        tally = Tally()
        offsets: dict[int, dict[str, int]] = {}
        outgoing: list[Record] = []  # partials, keyed by loop
        failures: list[Failure] = []
        for partition, messages in by_partition.items():
            core, checkpoint = states.get(partition)
            positions = offsets[partition] = next_offsets(messages)
            # The watermark waits for the topics with events still to be read: those of this
            # batch while it is applied (in no time order across topics), then those that
            # have more after it (pipeline.partition.PartitionCore.hold).
            later = frozenset(
                logical[name]
                for name in timed
                if batches.unread(
                    TP(name, partition), positions.get(name, checkpoint.offsets.get(name, 0))
                )
            )
            core.hold(later | {logical[name] for name in positions if name in timed})
            fresh = checkpoint.unapplied(messages)
            for message, decoded in zip(fresh, decode(fresh), strict=True):
                failure = apply(core, message, decoded, tally)
                if failure is not None:
                    failures.append(failure)
            core.hold(later)
            for change in core.drain():
                outgoing.append((change.loop.encode(), encode_change(change)))
        await batches.ensure_member(by_partition)  # nothing written if it lost them
        for failure in failures:  # durable before the checkpoint: nothing lost
            await dead_letters.send(*failure)
        # The partials are durable before a checkpoint says their events were applied: the
        # producer sends each partition's batches on their own, so a checkpoint could otherwise
        # land first, and a crash then would lose partials that are never resent.
        await asyncio.gather(*await send_keyed(aiokafka_producer(app), partials_topic, outgoing))
        await batches.ensure_member(by_partition)  # and no checkpoint if it lost them since
        for partition, positions in offsets.items():
            core, _ = states.get(partition)
            previous = core.previous_records()
            await states.commit(partition, core.changed_records(), positions, previous)
        tally.publish()

    batches = consume(app, source, ingest, "loopline.ingest", fence)
    return states
