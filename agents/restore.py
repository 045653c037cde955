"""Table recovery a fetch at a time, for the state tables (agents.state).

Faust's recovery takes every changelog record through its per-message path (a Message, an
Event, the conductor, its changelog queue and a ``wait_for`` on it, a check of every
partition's remaining offsets after each): about 21,000 records a second, against about
300,000 for reading the same changelogs raw (bench/recovery), so a worker restarted with a
large state spent most of a minute restoring it. A state table holds raw bytes in Faust's
memory store, so a changelog record needs no conversion: ``RecordsRestore.take`` writes a
fetch's records of such a table's changelog partition into the store itself, in order, and
advances Faust's recovery offset as its loop would; only the last record goes on through
Faust's path, where the loop, finding it read already, skips it but looks whether recovery is
complete (it looks after each record, and otherwise only every 5 s).

Why this is safe with Faust's loop running beside it: its loop applies a record only if its
offset is past the recovery offset of its partition, which ``take`` has moved past everything
it wrote, so a record still in Faust's queue is never applied over a newer one; and records
in Faust's buffer (read by its loop but not yet applied) are applied before any of the fetch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import faust
from faust.stores.memory import Store as MemoryStore
from faust.types import TP

log = logging.getLogger(__name__)


def restorable(table: Any) -> bool:
    """Whether a table's changelog records can go into its store as they are: raw bytes keys
    and values (no serializer), Faust's memory store (a dict), not windowed, and no one
    listening for its changelog events."""
    return (
        type(table) is faust.Table
        and isinstance(table.data, MemoryStore)
        and table.key_type is bytes
        and table.value_type is bytes
        and table.window is None
        and table._on_changelog_event is None
    )


def apply_records(store: MemoryStore[bytes, bytes], records: Sequence[Any]) -> None:
    """Changelog records (aiokafka's ConsumerRecord) into a memory store, as Faust's
    ``Store.apply_changelog_batch`` applies their events: the latest value of each key, a
    tombstone (None) deleting it, and the partition of each key (for the store's clean-up of
    partitions no longer assigned, ``on_recovery_completed``)."""
    data = store.data
    partitions = store._key_partition
    for record in records:
        key = record.key
        if record.value is None:
            data.pop(key, None)
            partitions.pop(key, None)
        else:
            data[key] = record.value
            partitions[key] = record.partition


class RecordsRestore:
    """Applies fetched changelog records of restorable tables (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.recovery = app.tables.recovery
        self._restorable: dict[int, bool] = {}  # id(table) -> restorable(table)
        self.applied: Counter[TP] = Counter()  # records written here, until restored

    def take(self, tp: TP, fetched: list[Any]) -> list[Any]:
        """Write what ``fetched`` (one partition's records, in offset order) brings of a
        restorable table's changelog into its store; returns the records left for Faust's
        per-message path: the last one (read already), or all of them for any other topic.
        Every record of such a partition comes through here, a fetch of one record too: one
        left to Faust's path unread would be skipped by its loop once a later fetch is in."""
        recovery = self.recovery
        table = recovery.tp_to_table.get(tp)
        if table is None or not self._is_restorable(table):
            return fetched
        if tp not in recovery.active_tps:
            return fetched  # a standby's (the app has none, pipeline.app) or no table's
        offsets = recovery.active_offsets
        seen = offsets.get(tp)
        fresh = fetched if seen is None else [r for r in fetched if r.offset > seen]
        if fresh:
            buffered = recovery.buffers.get(table)
            if buffered:  # read by Faust's loop before this fetch, not applied yet
                table.apply_changelog_batch(buffered)
                buffered.clear()
            apply_records(table.data, fresh)
            last = offsets[tp] = fresh[-1].offset
            self.applied[tp] += len(fresh)
            if last >= recovery.active_highwaters.get(tp, last + 1):  # read to its end
                count = self.applied.pop(tp)
                log.info("restored %s[%d]: %d records", tp.topic, tp.partition, count)
        return fetched[-1:]

    def _is_restorable(self, table: Any) -> bool:
        found = self._restorable.get(id(table))
        if found is None:
            found = self._restorable[id(table)] = restorable(table)
        return found
