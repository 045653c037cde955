"""`loopline status`: the pipeline as Kafka sees it, in one look, without Prometheus.

The loopline topics with their partitions and records, and every consumer group of this
deployment (the workers', the archive sinks', the redrive's) with its state, its members and
its lag by topic: what an SRE asks first when the numbers look stale.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.kafka_security import client_options
from pipeline.settings import Settings
from pipeline.topics import TOPICS


@dataclass(frozen=True)
class TopicStatus:
    name: str
    partitions: int
    records: int  # end offsets minus start offsets, summed (records kept, markers included)
    deleted: int = 0  # start offsets, summed: records Kafka deleted (retention, delete-records)


@dataclass(frozen=True)
class GroupStatus:
    name: str
    role: str  # workers, archive sink, dlq redrive, or other
    state: str  # Kafka's: Stable, PreparingRebalance, Empty, Dead, ...
    members: int
    #: topic -> messages from the next record the group reads (past its committed offsets:
    #: ``next_readable``) to the end; a partition it has committed nothing for: all of it
    lag: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    bootstrap: str
    topics: list[TopicStatus]
    groups: list[GroupStatus]


def role_of(group: str, app_id: str) -> str | None:
    """Which part of this deployment a consumer group is (None: not this deployment's)."""
    if group == app_id:
        return "workers"
    if group == f"{app_id}-dlq-redrive":
        return "dlq redrive"
    if group == f"{app_id}-archive" or group.startswith(f"{app_id}-archive-"):
        return "archive sink"
    return None


def lag_by_topic(
    ends: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
) -> dict[str, int]:
    """Per topic the group has committed offsets of, the messages past them; a partition of
    such a topic it has committed nothing for counts whole (from its start), as a new
    consumer would read it."""
    wanted = {tp.topic for tp in committed}
    lag: dict[str, int] = {}
    for tp, end in ends.items():
        if tp.topic in wanted:
            position = committed.get(tp, starts.get(tp, 0))
            lag[tp.topic] = lag.get(tp.topic, 0) + max(end - position, 0)
    return lag


def deleted_before(starts: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Per topic, the records Kafka deleted (retention or delete-records) before a reader
    from the start got to them: its partitions' log start offsets; a topic it deleted nothing
    of is left out (``status`` and the review page's feed say them)."""
    deleted: dict[str, int] = {}
    for tp, start in starts.items():
        if start:
            deleted[tp.topic] = deleted.get(tp.topic, 0) + start
    return deleted


def partition_lags(
    ends: Mapping[TopicPartition, int],
    positions: Mapping[TopicPartition, int | None],
    fetched_ends: Mapping[TopicPartition, int | None],
    unprocessed: Mapping[TopicPartition, int] | None = None,
) -> dict[tuple[str, int], int]:
    """A consumer's messages not yet processed in each partition (its lag metric: the worker's
    and the sinks'): from its position, or from the first offset it fetched and has not
    processed yet (``unprocessed``: records waiting in its buffers or in the batch in hand,
    which a stuck stage holds while its buffer fills), to the end. The end is the later of
    the broker's answer (``ends``, asked now: the last stable offset for a read_committed
    consumer) and the log end the consumer's last fetch saw: the fetch's alone stands still
    while nothing is fetched (a stage stuck, a sink paused), and the broker's alone leaves out
    the records behind a transaction still open, which the consumer waits on. A partition
    without a position or an answer is left out."""
    lags: dict[tuple[str, int], int] = {}
    waiting = unprocessed or {}
    for tp, position in positions.items():
        if position is not None and tp in ends:
            end = max(ends[tp], fetched_ends.get(tp) or 0)
            start = min(position, waiting.get(tp, position))
            lags[(tp.topic, tp.partition)] = max(end - start, 0)
    return lags


async def next_readable(
    reader: AIOKafkaConsumer, committed: Mapping[TopicPartition, int], seconds: float = 5.0
) -> dict[TopicPartition, int]:
    """Per partition, where ``reader`` (read_committed, with no group) gets its next record
    from the committed offset on: past transaction markers and aborted records, or where it
    waits on a transaction still open. A group that has read everything a transactional
    producer wrote (the services' exactly-once output, loopline's own) commits its last
    record + 1, which is the last transaction's marker: counted from there, each such
    partition showed a lag of 1 for good. A partition not settled within ``seconds`` keeps its
    committed offset; one whose committed offset the log no longer holds is read from its
    start, as the group would be."""
    if not committed:
        return {}
    reader.assign(list(committed))
    for tp, offset in committed.items():
        reader.seek(tp, offset)
    readable = await reader.end_offsets(list(committed))  # the last stable offsets
    found: dict[TopicPartition, int] = {}
    left = set(committed)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while left:
                for tp, records in (await reader.getmany(*left, timeout_ms=200)).items():
                    if records:
                        found[tp] = records[0].offset
                        left.discard(tp)
                        reader.pause(tp)
                for tp in list(left):
                    position = await reader.position(tp)
                    if position >= readable[tp]:
                        found[tp] = position
                        left.discard(tp)
    return found


async def read_status(settings: Settings) -> Status:
    names = [settings.topic(t.name) for t in TOPICS]
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    reader = AIOKafkaConsumer(
        **client_options(settings),
        enable_auto_commit=False,
        isolation_level="read_committed",  # as every consumer of loopline's reads
        auto_offset_reset="earliest",
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        present = [name for name in names if name in existing]
        described = await admin.describe_topics(present) if present else []
        tps = [
            TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]
        ]
        await consumer.start()
        await reader.start()
        ends = await consumer.end_offsets(tps) if tps else {}
        starts = await consumer.beginning_offsets(tps) if tps else {}
        deleted = deleted_before(starts)
        topics = [
            TopicStatus(
                name,
                sum(1 for tp in tps if tp.topic == name),
                sum(ends[tp] - starts[tp] for tp in tps if tp.topic == name),
                deleted.get(name, 0),
            )
            for name in present
        ]
        ours = sorted(
            (group_id, role)
            for group_id, *_ in await admin.list_consumer_groups()
            if (role := role_of(group_id, settings.app_id)) is not None
        )
        groups = []
        for group_id, role in ours:
            (response,) = await admin.describe_consumer_groups([group_id])
            _, _, state, _, _, members, *_ = response.groups[0]
            offsets = await admin.list_consumer_group_offsets(group_id)
            committed = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
            behind = {tp: c for tp, c in committed.items() if ends.get(tp, c) > c}
            committed.update(await next_readable(reader, behind))
            groups.append(
                GroupStatus(
                    group_id,
                    role,
                    str(state),
                    len(members),
                    lag_by_topic(ends, starts, committed),
                )
            )
    finally:
        await reader.stop()
        await consumer.stop()
        await admin.close()
    return Status(settings.bootstrap_servers, topics, groups)


def describe(status: Status) -> str:
    """The status as a few aligned tables."""
    lines = [f"kafka {status.bootstrap}: {len(status.topics)} loopline topics"]
    width = max((len(t.name) for t in status.topics), default=5)
    lines.append(f"  {'topic':<{width}}  {'partitions':>10}  {'records':>12}  {'deleted':>12}")
    for topic in status.topics:
        lines.append(
            f"  {topic.name:<{width}}  {topic.partitions:>10}  {topic.records:>12,}"
            f"  {topic.deleted:>12,}"
        )
    if not status.groups:
        lines.append("no consumer group of this deployment yet (no worker or sink has committed)")
        return "\n".join(lines)
    lines.append("consumer groups:")
    for group in status.groups:
        lines.append(
            f"  {group.name} ({group.role}): {group.state}, {group.members} member"
            + ("" if group.members == 1 else "s")
        )
        for name, lag in sorted(group.lag.items()):
            lines.append(f"    {name:<{width}}  lag {lag:>12,}")
    return "\n".join(lines)
