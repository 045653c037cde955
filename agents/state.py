"""Checkpointed per-partition state on a Faust table: the adapter between pipeline.checkpoint
(pure) and Faust (the table's store and changelog)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Generic, TypeVar, cast

import faust
from faust.types import TP

from agents.batchsend import send_to_partition
from pipeline.checkpoint import Checkpoint

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
        extra_topic_configs={"segment.ms": str(CHANGELOG_SEGMENT_MS)},
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


def aiokafka_producer(app: faust.App) -> Any:
    """aiokafka's producer, under Faust's."""
    return cast(Any, app.producer)._ensure_producer()


class CheckpointedPartitions(Generic[Core]):
    """For each partition this worker owns: its core, rebuilt from the table on first use after
    an assignment (table recovery has finished by then), and its checkpoint."""

    def __init__(
        self,
        app: faust.App,
        table: Any,
        build: Callable[[int, Mapping[str, Any]], Core],
        held: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.table = table
        self.build = build
        self.held = held  # key prefixes of records the cores hold (pipeline.checkpoint)
        self.loaded: dict[int, tuple[Core, Checkpoint]] = {}

    def get(self, partition: int) -> tuple[Core, Checkpoint]:
        found = self.loaded.get(partition)
        if found is None:
            checkpoint = Checkpoint(_backing(self.table.data), f"{partition}/", self.held)
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
        topic = self.table.changelog_topic.get_topic_name()
        writes = checkpoint.commit(changed, offsets, before)
        await send_to_partition(aiokafka_producer(self.app), topic, partition, writes)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget everything of these partitions: their cores, their records in the table's
        store, and Faust's recovery offset of their changelog partitions, so that a partition
        assigned again, to this worker too, is restored from its changelog's start.

        Kafka's rebalances revoke every partition, also those a worker keeps, and Faust then
        reads a kept partition's changelog on from where its last recovery ended, into the
        same store: the worker's own writes since then replaced the checkpoint's entries
        (``old.generation`` on raw bytes), and a core rebuilt from the store met the
        placeholders of the cases the old core had held (pipeline.checkpoint, ``held``). Both
        crashed a worker that another joined (tests/agents/test_distributed.py)."""
        store = _backing(self.table.data)
        key_partitions = getattr(self.table.data, "_key_partition", {})  # the memory store's
        recovery = cast(Any, self.app.tables).recovery
        changelog = self.table.changelog_topic.get_topic_name()
        for partition in partitions:
            self.loaded.pop(partition, None)
            prefix = f"{partition}/".encode()
            for key in [key for key in store if key.startswith(prefix)]:
                del store[key]
                key_partitions.pop(key, None)
            recovery.active_offsets.pop(TP(changelog, partition), None)

    def cores(self) -> list[Core]:
        return [core for core, _ in self.loaded.values()]
