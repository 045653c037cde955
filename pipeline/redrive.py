"""The dead-letter topic read back: listed (`loopline dlq show`), and published again to their
topics once their cause is fixed (`loopline dlq redrive`).

A dead letter keeps its record's original key and bytes (pipeline.deadletter), so after a fix
(a writer schema added to schemas/history, a producer's clock set right, a worker's bug fixed)
its event can still be counted. Each one is checked first as a worker would (decoded with the
current schemas, amounts finite, ts not too far ahead of now): one that still fails stays in the
DLQ and is counted by reason, so a redrive never makes dead letters of dead letters.
``too_many_events`` is left out unless asked for: its bytes carry the case id at fault, and
published again it fails the same way.

Copies are guarded twice: a redrive publishes each source position once (a record both a
worker and the archive sink dead-lettered has two dead letters), and the redrive group's
committed offsets on the DLQ start the next redrive after the last one. A dead letter published
twice (``--from-beginning``) counts once within the dedupe horizon (1 h), twice past it.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.codec import Codec, CodecError
from pipeline.core import check_not_ahead, resolution_amounts, to_ms
from pipeline.kafka_security import client_options
from pipeline.settings import Settings
from pipeline.topics import CONTRACT_TOPICS, EVENT_TOPICS, RECORD_OF

#: Reasons a redrive leaves out unless named (the bytes themselves are at fault).
LEFT_OUT = frozenset({"too_many_events"})
#: The topics whose dead letters can be published again: loopline's, but the DLQ (the archive
#: sink keeps an unreadable dead letter in the archive only).
REDRIVABLE = tuple(name for name in CONTRACT_TOPICS if name != "dlq")
#: The header a published-again message carries: the dead letter's DLQ position.
REDRIVE_HEADER = "loopline-redriven-from"


class RedriveError(RuntimeError):
    """A redrive that cannot start (no DLQ topic); the message says why."""


@dataclass(frozen=True)
class Selection:
    """Which dead letters to publish again: by reason and source topic (logical names; empty:
    all but LEFT_OUT reasons, all topics) and by the time they were dead-lettered."""

    reasons: frozenset[str] = frozenset()
    topics: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    left_out: frozenset[str] = LEFT_OUT  # the reasons taken only when named

    def takes(self, reason: str, topic: str, ts_ms: int) -> bool:
        return (
            (reason in self.reasons if self.reasons else reason not in self.left_out)
            and (not self.topics or topic in self.topics)
            and (self.since_ms is None or ts_ms >= self.since_ms)
            and (self.until_ms is None or ts_ms < self.until_ms)
        )


@dataclass
class Plan:
    """What a redrive does with the dead letters it read."""

    publish: list[tuple[str, bytes | None, bytes, str]] = field(default_factory=list)
    #: ^ (full topic name, key, value, the dead letter's DLQ position)
    published: Counter[str] = field(default_factory=Counter)  # logical topic -> count
    failing: Counter[str] = field(default_factory=Counter)  # reason now -> count
    first_error: dict[str, str] = field(default_factory=dict)  # reason now -> its first error
    not_kept: list[str] = field(default_factory=list)  # no bytes kept: their source position
    not_selected: int = 0
    copies: int = 0  # the same source position again
    unreadable: int = 0  # DLQ messages that are no DeadLetter
    foreign: Counter[str] = field(default_factory=Counter)  # topics it does not publish to
    #: of those published, events older than the allowed lateness: a worker whose event time
    #: is about now counts them too_late (the archive keeps them; their windows do not)
    late: int = 0


class Planner:
    """Decides for each dead letter, one after the other, what a redrive does with it."""

    def __init__(self, codec: Codec, settings: Settings, selection: Selection, now_ms: int):
        self.codec = codec
        self.selection = selection
        self.now_ms = now_ms
        self.logical = {settings.topic(name): name for name in REDRIVABLE}
        self.max_ahead_ms = settings.max_ahead_seconds * 1000
        self.lateness_ms = settings.allowed_lateness_seconds * 1000
        self.plan = Plan()
        self.seen: set[tuple[str, int, int]] = set()  # source positions taken

    def add(self, position: str, letter: Mapping[str, Any] | CodecError) -> None:
        """One dead letter: its DLQ position, and its record or why it is none."""
        done = self.plan
        if isinstance(letter, CodecError):
            done.unreadable += 1
            return
        source = str(letter["source_topic"])
        topic = self.logical.get(source)
        if topic is None:
            done.foreign[source] += 1
            return
        if not self.selection.takes(str(letter["reason"]), topic, to_ms(letter["ts"])):
            done.not_selected += 1
            return
        origin = (source, int(letter["source_partition"]), int(letter["source_offset"]))
        if origin in self.seen:
            done.copies += 1
            return
        self.seen.add(origin)
        value = letter["value"]
        if value is None:
            done.not_kept.append(f"{source}[{origin[1]}]@{origin[2]}")
            return
        try:
            ts_ms = _check(self.codec, topic, bytes(value), self.now_ms, self.max_ahead_ms)
        except CodecError as exc:
            done.failing[exc.reason] += 1
            done.first_error.setdefault(exc.reason, str(exc))
            return
        key = letter["key"]
        done.publish.append((source, None if key is None else bytes(key), bytes(value), position))
        done.published[topic] += 1
        if ts_ms is not None and ts_ms <= self.now_ms - self.lateness_ms:
            done.late += 1


def plan(
    dead_letters: Iterable[tuple[str, Mapping[str, Any] | CodecError]],
    codec: Codec,
    settings: Settings,
    selection: Selection,
    now_ms: int,
) -> Plan:
    """The Plan of these dead letters (their DLQ positions, and records or why none)."""
    planner = Planner(codec, settings, selection, now_ms)
    for position, letter in dead_letters:
        planner.add(position, letter)
    return planner.plan


def _check(codec: Codec, topic: str, value: bytes, now_ms: int, max_ahead_ms: int) -> int | None:
    """Raise the CodecError a worker would dead-letter the record with, as far as the record
    alone tells (too_many_events depends on the worker's state); else return its event time
    (None: the topic's records have none)."""
    record = codec.decode(value, expected=RECORD_OF[topic]).record
    if topic == "resolutions":
        resolution_amounts(record)
    if topic not in EVENT_TOPICS:
        return None
    ts_ms = to_ms(record["ts"])
    check_not_ahead(ts_ms, now_ms, max_ahead_ms)
    return ts_ms


@dataclass
class Redriven:
    plan: Plan
    read: int  # dead letters read
    first: dict[int, int]  # DLQ partition -> the first offset read
    end: dict[int, int]  # DLQ partition -> the offset read up to
    dry_run: bool
    deleted: int = 0  # dead letters Kafka deleted before any redrive read them


def group_id(settings: Settings) -> str:
    """The consumer group whose committed offsets on the DLQ say where the last redrive ended."""
    return f"{settings.app_id}-dlq-redrive"


async def redrive(
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool = False,
    from_beginning: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Redriven:
    """Read the DLQ from after the last redrive (or its beginning) to its end as of now, and
    publish the dead letters that now pass again, a fetch at a time: confirmed by Kafka before
    the redrive group commits where it read to (a crash between the two publishes that fetch's
    again at the next redrive, which the workers count once within the dedupe horizon).
    ``dry_run``: publish and commit nothing."""
    codec = Codec.load()
    planner = Planner(codec, settings, selection, int(time.time() * 1000))
    producer = None if dry_run else AIOKafkaProducer(**client_options(settings), acks="all")
    read = 0
    async with _dlq_reader(settings, group_id(settings), from_beginning) as (
        consumer,
        end,
        deleted,
    ):
        first = {tp.partition: await consumer.position(tp) for tp in end}
        if producer is not None:
            await producer.start()
        try:
            reported = time.monotonic()
            async for tp, messages in _fetches(consumer, end):
                for message in messages:
                    planner.add(_position(message), _letter(codec, message.value))
                read += len(messages)
                if producer is not None:
                    await _publish(producer, planner.plan.publish)
                    await consumer.commit({tp: min(await consumer.position(tp), end[tp])})
                planner.plan.publish.clear()
                if progress is not None and time.monotonic() - reported >= 2:
                    reported = time.monotonic()
                    published = planner.plan.published.total()
                    progress(f"read {read:,} dead letters, {published:,} to publish ...")
        finally:
            if producer is not None:
                await producer.stop()
    ends = {tp.partition: offset for tp, offset in end.items()}
    return Redriven(planner.plan, read, first, ends, dry_run, deleted)


@asynccontextmanager
async def _dlq_reader(
    settings: Settings, group: str | None, from_beginning: bool
) -> AsyncIterator[tuple[AIOKafkaConsumer, dict[TopicPartition, int], int]]:
    """A consumer assigned every DLQ partition, at the group's committed offsets (or the
    beginning), each partition's end as of now, and the dead letters Kafka deleted (retention)
    before the group read them (without a group: all it deleted); stopped on leaving."""
    dlq = settings.topic("dlq")
    partitions = [TopicPartition(dlq, number) for number in await _partitions(settings, dlq)]
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    try:
        await consumer.start()
        consumer.assign(partitions)
        starts = await consumer.beginning_offsets(partitions)
        deleted = 0
        for tp, start in starts.items():
            read_up_to = (await consumer.committed(tp) if group is not None else None) or 0
            deleted += max(start - read_up_to, 0)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        yield consumer, await consumer.end_offsets(partitions), deleted
    finally:
        await consumer.stop()


def _position(message: Any) -> str:
    """A DLQ message's position, as a redrive's header and ``show`` name it."""
    return f"{message.topic}[{message.partition}]@{message.offset}"


async def _fetches(
    consumer: AIOKafkaConsumer, end: Mapping[TopicPartition, int]
) -> AsyncIterator[tuple[TopicPartition, list[Any]]]:
    """Each partition's messages from the consumer's position to ``end``, a fetch at a time."""
    for tp, stop in end.items():
        while await consumer.position(tp) < stop:
            fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=1000)
            yield tp, [m for m in fetched.get(tp, []) if m.offset < stop]


@dataclass
class Shown:
    """The dead letters ``show`` read: how many, those selected by source topic and reason,
    and the newest of them (oldest first); and how many older ones Kafka deleted."""

    read: int
    counts: Counter[tuple[str, str]]
    newest: list[dict[str, Any]]
    unreadable: int
    deleted: int = 0


async def show(
    settings: Settings,
    selection: Selection,
    limit: int,
    progress: Callable[[str], None] | None = None,
) -> Shown:
    """Read the whole DLQ (no consumer group: nothing is committed) and keep the newest
    ``limit`` dead letters ``selection`` takes, with their DLQ position as ``dlq_position``."""
    codec = Codec.load()
    logical = {settings.topic(name): name for name in REDRIVABLE}
    counts: Counter[tuple[str, str]] = Counter()
    newest: list[tuple[int, int, dict[str, Any]]] = []  # a heap of (ts, order, letter)
    read = unreadable = 0
    async with _dlq_reader(settings, None, from_beginning=True) as (consumer, end, deleted):
        reported = time.monotonic()
        async for _, messages in _fetches(consumer, end):
            if progress is not None and time.monotonic() - reported >= 2:
                reported = time.monotonic()
                progress(f"read {read:,} dead letters ...")
            for message in messages:
                read += 1
                letter = _letter(codec, message.value)
                if isinstance(letter, CodecError):
                    unreadable += 1
                    continue
                source, reason, ts_ms = (
                    letter["source_topic"],
                    letter["reason"],
                    to_ms(letter["ts"]),
                )
                if not selection.takes(reason, logical.get(source, source), ts_ms):
                    continue
                counts[(source, reason)] += 1
                shown = {**letter, "dlq_position": _position(message)}
                heapq.heappush(newest, (ts_ms, read, shown))
                if len(newest) > limit:
                    heapq.heappop(newest)
    return Shown(read, counts, [letter for *_, letter in sorted(newest)], unreadable, deleted)


async def _partitions(settings: Settings, topic: str) -> list[int]:
    """The topic's partition numbers; RedriveError if it does not exist (it is looked for
    first: described, a broker that creates topics on demand would make it)."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:
        await admin.start()
        if topic not in await admin.list_topics():
            raise RedriveError(f"topic {topic} does not exist (`loopline topics` makes it)")
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(int(p["partition"]) for p in described["partitions"])


def _letter(codec: Codec, value: bytes | None) -> Mapping[str, Any] | CodecError:
    try:
        return codec.decode(value, expected="DeadLetter").record
    except CodecError as exc:
        return exc


async def _publish(
    producer: AIOKafkaProducer, messages: list[tuple[str, bytes | None, bytes, str]]
) -> None:
    """Publish each message with its key and the header naming its dead letter; return once
    Kafka confirmed every one (raises what a send failed with)."""
    deliveries = [
        await producer.send(topic, value, key=key, headers=[(REDRIVE_HEADER, position.encode())])
        for topic, key, value, position in messages
    ]
    for delivery in deliveries:
        await delivery
