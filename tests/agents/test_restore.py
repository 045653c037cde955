"""agents/restore.py on a real Faust app without a broker: a fetch of a state table's
changelog goes into its store in order, past Faust's recovery offset, Faust's buffer first,
and only its last record on to Faust's path."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import faust
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from agents.restore import RecordsRestore, apply_records, restorable
from agents.state import state_table

CHANGELOG = TP("offline-test-partition-state-changelog", 2)


def record(offset: int, key: bytes, value: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(CHANGELOG.topic, 2, offset, 0, 0, key, value, None, 1, 1, [])


def recovering(app: faust.App, offset: int, highwater: int) -> tuple[Any, Any, RecordsRestore]:
    """A state table whose changelog partition 2 is being restored, read up to ``offset``."""
    table: Any = state_table(app, "partition-state", 4)
    recovery: Any = cast(Any, app.tables).recovery
    recovery.add_active(table, CHANGELOG)
    recovery.active_offsets[CHANGELOG] = offset
    recovery.active_highwaters[CHANGELOG] = highwater
    return table, recovery, RecordsRestore(app)


def test_only_raw_tables_in_the_memory_store_are_restored_here(app: faust.App) -> None:
    assert restorable(state_table(app, "partition-state", 4))
    assert not restorable(app.Table("json", partitions=4))  # values need deserializing
    windowed = app.Table("windowed", key_type=bytes, value_type=bytes, partitions=4)
    assert restorable(windowed) and not restorable(windowed.tumbling(10).table)


def test_a_fetch_goes_into_the_store_in_order_and_its_last_record_to_fausts_path(
    app: faust.App,
) -> None:
    table, recovery, restore = recovering(app, offset=1, highwater=9)
    table.data.data[b"2/a"] = b"a1"  # offsets 0 and 1 were applied before
    fetched = [
        record(1, b"2/a", b"a-stale"),  # read already: not applied again
        record(2, b"2/a", b"a2"),
        record(3, b"2/b", b"b3"),
        record(4, b"2/b", None),  # a tombstone: deleted
        record(5, b"2/c", b"c5"),
        record(6, b"2/a", b"a6"),  # the latest of a key wins
    ]
    assert restore.take(CHANGELOG, fetched) == fetched[-1:]
    assert table.data.data == {b"2/a": b"a6", b"2/c": b"c5"}
    assert table.data._key_partition == {b"2/a": 2, b"2/c": 2}
    # Faust's loop applies only past this offset: the last record, read already, is skipped.
    assert recovery.active_offsets[CHANGELOG] == 6
    assert recovery.active_remaining_total() == 3  # 9 - 6, for /metrics and the demo
    assert restore.applied[CHANGELOG] == 5

    stale = [record(5, b"2/c", b"c-stale"), record(6, b"2/a", b"a-stale")]
    assert restore.take(CHANGELOG, stale) == stale[-1:]  # fetched again: nothing applied
    assert table.data.data == {b"2/a": b"a6", b"2/c": b"c5"}


def test_records_faust_read_before_are_applied_first(app: faust.App) -> None:
    table, recovery, restore = recovering(app, offset=3, highwater=9)

    def event(key: bytes, value: bytes) -> SimpleNamespace:  # as Faust's loop buffers them
        message = SimpleNamespace(value=value, partition=2)
        return SimpleNamespace(key=key, value=value, message=message)

    recovery.buffers[table] = [event(b"2/a", b"a2"), event(b"2/z", b"z3")]
    restore.take(CHANGELOG, [record(4, b"2/a", b"a4")])
    assert table.data.data == {b"2/a": b"a4", b"2/z": b"z3"}
    assert recovery.buffers[table] == []


def test_other_partitions_and_topics_are_left_to_fausts_path(app: faust.App) -> None:
    table, recovery, restore = recovering(app, offset=-1, highwater=9)
    other_partition = TP(CHANGELOG.topic, 3)  # not assigned here (a standby's would be so)
    fetched = [record(0, b"3/a", b"a0"), record(1, b"3/b", b"b1")]
    assert restore.take(other_partition, fetched) == fetched
    assert restore.take(TP("source", 2), fetched) == fetched
    assert table.data.data == {} and recovery.active_offsets[CHANGELOG] == -1


def test_a_partition_read_to_its_highwater_is_logged_as_restored(
    app: faust.App, caplog: Any
) -> None:
    _, _, restore = recovering(app, offset=-1, highwater=2)
    caplog.set_level("INFO", logger="agents.restore")
    restore.take(CHANGELOG, [record(0, b"2/a", b"a0"), record(1, b"2/b", b"b1")])
    assert "restored" not in caplog.text
    restore.take(CHANGELOG, [record(2, b"2/c", b"c2")])
    assert f"restored {CHANGELOG.topic}[2]: 3 records" in caplog.text
    assert CHANGELOG not in restore.applied


def test_apply_records_keeps_the_latest_value_of_each_key() -> None:
    store: Any = SimpleNamespace(data={b"k": b"0"}, _key_partition={b"k": 1})
    apply_records(store, [record(0, b"k", None), record(1, b"k", b"1"), record(2, b"j", None)])
    assert store.data == {b"k": b"1"} and store._key_partition == {b"k": 2}
