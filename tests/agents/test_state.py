"""agents/state.py: memory a restore freed goes back to the system; the state tables'
changelogs as the broker holds them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import faust
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from faust.types import TP

from agents.batchsend import Sent
from agents.state import (
    _MALLOC_TRIM,
    CHANGELOG_SEGMENT_MS,
    CheckpointedPartitions,
    applied_offset,
    give_back_freed_memory,
    records_to_restore,
    state_table,
)
from pipeline.checkpoint import Checkpoint, encode_envelope
from pipeline.settings import Settings
from tests.conftest import WorkerProcess, wait_for


def test_freed_memory_goes_back_through_glibc_malloc_trim() -> None:
    assert _MALLOC_TRIM is not None  # glibc here (Debian, and the python images of compose)
    assert _MALLOC_TRIM(0) in (0, 1)  # 1: memory was released, 0: there was none to release
    give_back_freed_memory()


async def _topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        responses = await admin.describe_configs([resource])
    finally:
        await admin.close()
    # DescribeConfigsResponse: resources of (error, message, type, name, [config entries])
    entries = responses[0].resources[0][4]
    return {str(entry[0]): str(entry[1]) for entry in entries}


@pytest.mark.broker
def test_the_state_changelogs_are_compacted_in_segments_of_ten_minutes(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings()
    start_worker(settings)  # Faust creates the tables' changelog topics as it starts
    topics = [f"{settings.app_id}-{table}-changelog" for table in ("partition-state", "loop-state")]
    configs: dict[str, dict[str, str]] = {}

    def created() -> bool:
        configs.update({t: asyncio.run(_topic_configs(settings, t)) for t in topics})
        return all(configs.values())

    wait_for(created, 60, f"{topics} to exist")
    for topic in topics:
        assert configs[topic]["cleanup.policy"] == "compact"
        assert configs[topic]["segment.ms"] == str(CHANGELOG_SEGMENT_MS) == "600000"


def test_records_to_restore_are_what_fausts_recovery_has_left_to_read(app: faust.App) -> None:
    recovery: Any = cast(Any, app.tables).recovery
    first, second = TP("w-partition-state-changelog", 0), TP("w-loop-state-changelog", 3)
    # Faust's own bookkeeping: the last offset to read and the last offset read, by partition
    recovery.active_highwaters.update({first: 999, second: 40})
    recovery.active_offsets.update({first: 899, second: 40})
    assert records_to_restore(app) == 0  # not recovering: the numbers are stale
    recovery.in_recovery = True
    assert records_to_restore(app) == 100  # 999 - 899, and nothing left of the second
    recovery.active_offsets[first] = 999
    assert records_to_restore(app) == 0


def test_the_offset_applied_is_read_from_the_checkpoint_markers_of_every_table(
    app: faust.App,
) -> None:
    """The worker's two stages checkpoint different topics in tables of their own; a topic no
    checkpoint has read yet (or a partition without one) has no applied offset."""
    stage1: Any = state_table(app, "partition-state", 4)
    stage2: Any = state_table(app, "loop-state", 4)
    Checkpoint(stage1.data.data, "1/").commit({"x": 1}, {"w.inputs": 130, "w.resolutions": 7})
    Checkpoint(stage2.data.data, "1/").commit({}, {"w.partials": 12})
    Checkpoint(stage2.data.data, "1/").commit({}, {"w.partials": 40})  # the marker replaced
    applied = applied_offset(app)
    assert [
        applied("w.inputs", 1),
        applied("w.resolutions", 1),
        applied("w.partials", 1),
        applied("w.eval_results", 1),
        applied("w.inputs", 0),
    ] == [130, 7, 40, None, None]


def _revoked_state(app: faust.App) -> tuple[Any, CheckpointedPartitions[Any], dict[bytes, Any]]:
    """Two partitions' records in a state table, partition 0's core built (restored from its
    changelog up to offset 5, partition 1's up to 7), both revoked in generation 3."""
    table: Any = state_table(app, "partition-state", 4)
    changelog = table.changelog_topic.get_topic_name()
    recovery: Any = cast(Any, app.tables).recovery
    store = table.data.data
    envelope = encode_envelope(1, b'{"n":1}', None)
    for key in (b"0/c/a", b"0/~checkpoint", b"1/c/b"):
        store[key] = envelope if not key.endswith(b"checkpoint") else b'{"g":1,"offsets":{}}'
        table.data._key_partition[key] = int(key[:1])
    partitions = CheckpointedPartitions(app, table, lambda p, records: dict(records), ("c/",))
    core, _ = partitions.get(0)
    assert core == {"c/a": b'{"n":1}'}  # a held record as its JSON, for the core to decode
    # The core holds it now: neither the store nor its note of the key's partition keeps it.
    assert b"0/c/a" not in store and b"0/c/a" not in table.data._key_partition
    recovery.active_offsets.update({TP(changelog, 0): 5, TP(changelog, 1): 7})
    app.consumer_generation_id = 3
    partitions.revoke([0, 1])
    # Partition 1 had no core: forgotten at once, restored from its changelog's start if
    # assigned again (Faust's recovery reads a partition without an offset from there).
    assert set(store) == {b"0/~checkpoint"}
    assert set(table.data._key_partition) == {b"0/~checkpoint"}
    assert dict(recovery.active_offsets) == {TP(changelog, 0): 5}
    assert partitions.cores() == []  # not exported while the rebalance goes on
    return recovery, partitions, store


def test_a_revoked_partition_given_back_in_the_next_generation_goes_on_as_it_was(
    app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovery, partitions, store = _revoked_state(app)
    changelog = partitions.table.changelog_topic.get_topic_name()
    monkeypatch.setattr(app.assignor, "assigned_actives", lambda: {TP(changelog, 0)})
    app.consumer_generation_id = 4
    partitions.settle(4)
    core, _ = partitions.loaded[0]
    assert partitions.cores() == [core] == [{"c/a": b'{"n":1}'}]
    assert set(store) == {b"0/~checkpoint"}
    # Faust's recovery reads on past offset 5, the last record it restored: nothing
    assert dict(recovery.active_offsets) == {TP(changelog, 0): 5}


def _revoked_after(app: faust.App, sent: Callable[[TP], Sent]) -> tuple[Any, TP, Any]:
    """Partition 2 restored up to changelog offset 5, its core built, then revoked with what
    ``sent`` says its last writes were: the recovery, the changelog partition, the state."""
    table: Any = state_table(app, "partition-state", 4)
    tp = TP(table.changelog_topic.get_topic_name(), 2)
    recovery: Any = cast(Any, app.tables).recovery
    recovery.active_offsets[tp] = 5
    partitions = CheckpointedPartitions(app, table, lambda p, records: dict(records))
    partitions.get(2)
    partitions._sent[2] = sent(tp)
    partitions.revoke([2])
    return recovery, tp, partitions


def test_after_writes_of_its_own_a_revoked_partition_is_read_on_past_its_last_write(
    app: faust.App,
) -> None:
    def three_batches(tp: TP) -> Sent:  # of 200, 200 and 17 records, from offset 6 on
        batches = [app.loop.create_future() for _ in range(3)]
        for batch, first in zip(batches, (6, 206, 406), strict=True):
            batch.set_result(RecordMetadata(tp.topic, 2, tp, first, -1, 0, 0))
        return Sent(batches, 17)

    recovery, tp, partitions = _revoked_after(app, three_batches)
    assert recovery.active_offsets[tp] == 422  # 406 + 17 - 1
    assert 2 in partitions.loaded


def test_a_revoked_partition_whose_last_write_failed_is_forgotten(app: faust.App) -> None:
    def failed(tp: TP) -> Sent:
        batch = app.loop.create_future()
        batch.set_exception(KafkaError("not durable"))
        return Sent([batch], 1)

    recovery, tp, partitions = _revoked_after(app, failed)
    assert partitions.loaded == {} and tp not in recovery.active_offsets


@pytest.mark.parametrize(
    ("generation", "actives"),
    [(5, {0}), (4, set())],
    ids=["given back a generation later", "not given back"],
)
def test_a_revoked_partition_not_given_back_at_once_is_forgotten_to_be_restored(
    app: faust.App, monkeypatch: pytest.MonkeyPatch, generation: int, actives: set[int]
) -> None:
    recovery, partitions, store = _revoked_state(app)
    changelog = partitions.table.changelog_topic.get_topic_name()
    monkeypatch.setattr(
        app.assignor, "assigned_actives", lambda: {TP(changelog, p) for p in actives}
    )
    app.consumer_generation_id = generation
    partitions.settle(generation)
    assert partitions.loaded == {} and store == {} and table_keys(partitions) == set()
    assert dict(recovery.active_offsets) == {}


def table_keys(partitions: CheckpointedPartitions[Any]) -> set[bytes]:
    return set(partitions.table.data._key_partition)


def test_a_changelog_cut_is_looked_up_and_said_beside_the_rebalance_not_in_it(
    app: faust.App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Awaited in the assignment callback, a lookup cut short by a SIGTERM ended the Kafka
    # client's thread and hung the worker's stop: the callback must not wait for it.
    table: Any = state_table(app, "partition-state", 4)
    changelog = table.changelog_topic.get_topic_name()
    partitions = CheckpointedPartitions(app, table, lambda p, records: dict(records))
    monkeypatch.setattr(
        app.assignor, "assigned_actives", lambda: {TP(changelog, 1), TP(changelog, 2)}
    )
    answered = asyncio.Event()

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        await answered.wait()  # the broker's answer, when the test gives it
        return {TP(changelog, 1): 40, TP(changelog, 2): 0}

    monkeypatch.setattr(app.consumer, "earliest_offsets", earliest_offsets)

    async def rebalance() -> None:
        await asyncio.wait_for(table.on_rebalance(set(), set(), set(), 0), 5)
        assert "starts at offset" not in caplog.text  # the lookup is still waiting
        answered.set()
        await asyncio.wait_for(asyncio.gather(*partitions._warning), 5)

    app.loop.run_until_complete(rebalance())
    assert f"{changelog}[1] starts at offset 40" in caplog.text
    assert f"{changelog}[2] starts" not in caplog.text
