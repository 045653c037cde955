"""Checkpointed per-partition state on a Faust table: the adapter between pipeline.checkpoint
(pure) and Faust (the table's store and changelog)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Set
from typing import Any, Generic, TypeVar, cast

import faust
from faust.types import TP

from agents.batchsend import Sent, send_to_partition
from pipeline.checkpoint import Checkpoint, read_marker
from pipeline.health import WorkerState
from pipeline.offsetresets import AppliedOffset
from pipeline.settings import Settings
from pipeline.topics import STATE_MESSAGE_BYTES, ensure_topics

log = logging.getLogger(__name__)
Core = TypeVar("Core")


#: How often a changelog partition starts a new segment. Kafka compacts only closed segments,
#: and by default a segment closes after 7 days or 1 GiB, so a restore read every version of
#: every record of up to a week (each demo run's, too) instead of about one per live record.
CHANGELOG_SEGMENT_MS = 10 * 60 * 1000


def state_table(app: faust.App, name: str, partitions: int) -> Any:
    """A changelog-backed table whose values are the checkpoint's raw JSON envelopes. The
    changelog is compacted (Faust's default for tables), which keeps the latest envelope of
    every key and so exactly what a restore reads (pipeline.checkpoint)."""
    return app.Table(
        name,
        partitions=partitions,
        key_type=bytes,  # bytes -> the "raw" serializer, for writes and for recovery alike
        value_type=bytes,
        help="loopline checkpointed state (pipeline.checkpoint)",
        extra_topic_configs={
            "segment.ms": str(CHANGELOG_SEGMENT_MS),
            "max.message.bytes": str(STATE_MESSAGE_BYTES),
        },
    )


def _backing(store: Any) -> MutableMapping[bytes, Any]:
    """The dict behind Faust's in-memory store (its ``data``, made once and only ever cleared
    in place), so that the checkpoint's lookups skip the store's Python mapping methods (~2 %
    of the worker in bench/throughput); any other store as it is."""
    data = getattr(store, "data", None)
    return data if isinstance(data, dict) else cast(MutableMapping[bytes, Any], store)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _libc_malloc_trim()


def give_back_freed_memory() -> None:
    """Hand freed memory back to the system. A partition's restore holds its changelog's raw
    envelopes (with the previous values) until its core is built; glibc kept their memory, so
    a restarted worker stayed at the restore's peak (1,974 MiB against 1,366 before the kill
    in bench/recovery)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def records_to_restore(app: faust.App) -> int:
    """How many changelog records Faust's table recovery still reads before the worker's
    tables are restored (0 when it is not recovering): progress for /metrics and the demo, as
    a restart with a large state takes a while (README, "Recovery after a crash")."""
    recovery = cast(Any, app.tables).recovery
    if not recovery.in_recovery:
        return 0
    return max(0, int(recovery.active_remaining_total()))


def worker_state(app: faust.App, sources: Set[str]) -> WorkerState:
    """What /readyz judges (pipeline.health), read off Faust's app: its rebalances, its
    tables' recovery and the partitions of ``sources`` (topic names) it holds."""
    recovery = cast(Any, app.tables).recovery
    assignment = cast(Any, app.consumer).assignment()
    return WorkerState(
        rebalances=app.rebalancing_count,
        rebalancing=app.rebalancing,
        restoring=bool(recovery.in_recovery),
        records_to_restore=records_to_restore(app),
        partitions=sum(1 for tp in assignment if tp.topic in sources),
    )


def aligned_topics(settings: Settings) -> Callable[[], Awaitable[str]]:
    """``ensure_topics`` for a running worker, saying what it did: it gives each state
    changelog as many partitions as the topics its stage reads."""

    async def align() -> str:
        return (await ensure_topics(settings)).describe()

    return align


def aiokafka_producer(app: faust.App) -> Any:
    """aiokafka's producer, under Faust's."""
    return cast(Any, app.producer)._ensure_producer()


def applied_offset(app: faust.App) -> AppliedOffset:
    """Where the records of a topic's partition that ``app``'s state never applied begin: the
    offset its checkpoint marker goes on from (None: no checkpoint has read that topic). The
    group's committed offset can be behind it (a crash, or a stop before the last batch was
    acked), and the records between were counted (pipeline.offsetresets). Called in the Kafka
    client's thread: a marker is one value in the store's dictionary, replaced whole."""

    def lookup(topic: str, partition: int) -> int | None:
        for table in list(app.tables.values()):
            marker = read_marker(_backing(table.data), f"{partition}/")
            if marker is not None and topic in marker.offsets:
                return marker.offsets[topic]
        return None

    return lookup


class CheckpointedPartitions(Generic[Core]):
    """For each partition this worker owns: its core, rebuilt from the table on first use after
    an assignment (table recovery has finished by then), and its checkpoint.

    Kafka's rebalances revoke every partition of a worker, also those it keeps. A revoked
    partition's state stays in memory until the assignment that follows: given back in the
    very next generation of the group, no one else can have written its changelog since the
    worker's own last write, so its core goes on as it is and Faust's recovery starts past that
    write (nothing to read); any other partition is forgotten whole and, if assigned again,
    restored from its changelog's start. A worker joining or leaving then costs the others no
    restore of the partitions they keep."""

    def __init__(
        self,
        app: faust.App,
        table: Any,
        build: Callable[[int, Mapping[str, Any]], Core],
        held: tuple[str, ...] = (),
        align_topics: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.app = app
        self.table = table
        self.build = build
        self.held = held  # key prefixes of records the cores hold (pipeline.checkpoint)
        # gives the changelog as many partitions as the topic it checkpoints (says what it did)
        self.align_topics = align_topics
        self._writable: set[int] = set()  # changelog partitions the producer knows of
        self.loaded: dict[int, tuple[Core, Checkpoint]] = {}
        self._sent: dict[int, Sent] = {}  # each loaded partition's last changelog writes
        self._revoked: dict[int, int] = {}  # kept until the assignment: -> its generation
        self._cut: set[tuple[int, int]] = set()  # (partition, start offset) warned of
        self._warning: set[asyncio.Task[None]] = set()  # warn_of_deleted_records' lookups
        faust_on_rebalance = table.on_rebalance

        async def on_rebalance(
            assigned: Set[TP], revoked: Set[TP], newly_assigned: Set[TP], generation_id: int = 0
        ) -> None:
            # Faust calls each table's before its recovery looks at the offsets to read from.
            self.settle(generation_id)
            self.warn_of_deleted_records()
            await faust_on_rebalance(assigned, revoked, newly_assigned, generation_id)

        table.on_rebalance = on_rebalance

    def get(self, partition: int) -> tuple[Core, Checkpoint]:
        found = self.loaded.get(partition)
        if found is None:
            store = _backing(self.table.data)
            checkpoint = Checkpoint(store, f"{partition}/", self.held)
            # The checkpoint took the held records out of the store; so goes the memory
            # store's note of their partition (an entry per case otherwise).
            key_partitions = getattr(self.table.data, "_key_partition", {})
            prefix = f"{partition}/".encode()
            for key in [k for k in key_partitions if k.startswith(prefix) and k not in store]:
                del key_partitions[key]
            core = self.build(partition, checkpoint.values)
            checkpoint.values = {}  # the core holds the state now
            found = self.loaded[partition] = (core, checkpoint)
            give_back_freed_memory()
        return found

    async def commit(
        self,
        partition: int,
        changed: Mapping[str, Any],
        offsets: Mapping[str, int],
        before: Mapping[str, bytes | None] | None = None,
    ) -> None:
        """Write one batch's records and then its marker to the partition's changelog.

        Straight to the producer rather than through ``Table.send_changelog``, whose buffer
        hands messages over one at a time (about half the worker's time went there), and as
        whole record batches (agents.batchsend), in order, so the marker is still last. Faust
        flushes this producer before it commits offsets, so the writes are durable first."""
        _, checkpoint = self.loaded[partition]
        writes = checkpoint.commit(changed, offsets, before)
        producer = aiokafka_producer(self.app)
        if partition not in self._writable:
            await self._changelog_partition(producer, partition)
        self._sent[partition] = await send_to_partition(
            producer, self._changelog_name, partition, writes
        )

    async def _changelog_partition(self, producer: Any, partition: int) -> None:
        """Make sure the changelog has ``partition`` and the producer knows it. Partitions
        added to the topics a stage reads while the worker runs (an operator scaling out) are
        assigned to it after its next metadata refresh, and the changelog had fewer: every
        batch of a new partition failed, and the worker stopped (status 1)."""
        name = self._changelog_name
        if partition not in await producer.partitions_for(name):
            if self.align_topics is not None:
                said = await self.align_topics()
                log.warning("%s has no partition %d yet; topics: %s", name, partition, said)
            await producer.client.force_metadata_update()
            if partition not in await producer.partitions_for(name):
                raise RuntimeError(
                    f"{name} has no partition {partition}: give it as many as the topics its "
                    "stage reads (`loopline topics` does)"
                )
        self._writable.add(partition)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Keep the state of these partitions until the assignment (``settle``), with Faust's
        recovery offset of their changelog partitions at the worker's last write; forget it
        where that write is unknown. Faust flushes the producer before it revokes."""
        recovery = cast(Any, self.app.tables).recovery
        generation = self.app.consumer_generation_id
        for partition in partitions:
            tp = self._changelog(partition)
            sent = self._sent.get(partition)
            # Nothing written since the core was built: its state is what was restored.
            last = recovery.active_offsets.get(tp) if sent is None else sent.last_offset()
            if partition in self.loaded and last is not None:
                recovery.active_offsets[tp] = last
                self._revoked[partition] = generation
            else:
                self._forget(partition)

    def settle(self, generation: int) -> None:
        """At an assignment, before Faust's recovery: go on with each revoked partition given
        back in the next generation, and forget the others. A partition given back later (a
        worker that missed a generation, as a paused one does) may have had another owner
        meanwhile, who wrote its changelog: it is restored from the start.

        Without this, Faust read a kept partition's changelog on from where its last recovery
        ended into the same store: the worker's own writes since then replaced the
        checkpoint's entries (``old.generation`` on raw bytes), and a core rebuilt from the
        store met the placeholders of the cases the old core had held (pipeline.checkpoint,
        ``held``). Both crashed a worker that another joined (tests/agents/test_distributed.py)."""
        actives = self.app.assignor.assigned_actives()
        current = generation == self.app.consumer_generation_id
        kept = []
        for partition, held_in in self._revoked.items():
            if current and generation == held_in + 1 and self._changelog(partition) in actives:
                kept.append(partition)
            else:
                self._forget(partition)
        self._revoked.clear()
        if kept:
            name = self._changelog_name
            log.info("kept %s%s: given back in generation %d", name, sorted(kept), generation)

    def warn_of_deleted_records(self) -> None:
        """Say which changelog partitions about to be restored lost their first records.

        Kafka refuses to delete records of a compacted-only topic, and compaction never moves
        a partition's start offset, so one that starts past 0 was cut by retention or
        kafka-delete-records after someone gave the changelog a "delete" policy: the cases only
        those records held are gone, with the checkpoint too if all were. Faust restores from
        the new start (its reset is "earliest": faust-streaming #651 waited forever with
        "latest"); this says so once per process, as recovery itself cannot.

        The start offsets are looked up beside the rebalance, not in it: awaited in the
        assignment callback, a lookup that a SIGTERM cut short (the Kafka client's thread
        stopping) ended that thread with a CancelledError and hung the worker's stop until
        its 20 s deadline (exit 1; tests/agents/test_distributed.py's churn test)."""
        name = self._changelog_name
        tps = [
            tp
            for tp in self.app.assignor.assigned_actives()
            if tp.topic == name and tp.partition not in self.loaded
        ]
        if tps:
            lookup = asyncio.ensure_future(self._warn_of_cut(name, tps))
            self._warning.add(lookup)
            lookup.add_done_callback(self._warning.discard)

    async def _warn_of_cut(self, name: str, tps: list[TP]) -> None:
        try:
            starts = await self.app.consumer.earliest_offsets(*tps)
        except Exception as exc:  # a warning is not worth failing anything for
            log.warning("could not read the start offsets of %s: %s", name, exc)
            return
        for tp, start in sorted(starts.items()):
            if start and (tp.partition, start) not in self._cut:
                self._cut.add((tp.partition, start))
                log.warning(
                    "%s[%d] starts at offset %d: the records before it were deleted (retention "
                    "or kafka-delete-records; a state changelog must be compacted only), and "
                    "the state only they held is lost",
                    name,
                    tp.partition,
                    start,
                )

    @property
    def _changelog_name(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    def _changelog(self, partition: int) -> TP:
        return TP(self._changelog_name, partition)

    def _forget(self, partition: int) -> None:
        """Forget everything of a partition: its core, its records in the table's store, and
        Faust's recovery offset of its changelog partition, so that it is restored from its
        changelog's start when assigned again, to this worker too."""
        store = _backing(self.table.data)
        key_partitions = getattr(self.table.data, "_key_partition", {})  # the memory store's
        self.loaded.pop(partition, None)
        self._sent.pop(partition, None)
        prefix = f"{partition}/".encode()
        for key in [key for key in store if key.startswith(prefix)]:
            del store[key]
            key_partitions.pop(key, None)
        cast(Any, self.app.tables).recovery.active_offsets.pop(self._changelog(partition), None)

    def cores(self) -> list[Core]:
        """The cores of the partitions this worker owns (not those revoked, until settled)."""
        return [core for p, (core, _) in self.loaded.items() if p not in self._revoked]
