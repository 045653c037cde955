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
from faust.types import TP

from agents.state import (
    _MALLOC_TRIM,
    CHANGELOG_SEGMENT_MS,
    CheckpointedPartitions,
    give_back_freed_memory,
    records_to_restore,
    state_table,
)
from pipeline.checkpoint import HELD, Envelope, encode_envelope
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


def test_a_revoked_partition_is_forgotten_to_be_restored_from_its_changelogs_start(
    app: faust.App,
) -> None:
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
    assert store[b"0/c/a"] == Envelope(1, HELD, None)  # the core holds it now
    recovery.active_offsets.update({TP(changelog, 0): 5, TP(changelog, 1): 7})

    partitions.revoke([0])
    assert 0 not in partitions.loaded
    assert set(store) == {b"1/c/b"} and set(table.data._key_partition) == {b"1/c/b"}
    # Faust's recovery reads a partition without an offset from its changelog's start
    assert dict(recovery.active_offsets) == {TP(changelog, 1): 7}
