"""Stage 1's outputs (pipeline.partition): each changed bucket is encoded once per batch for
its partial and its checkpoint record, and never from a stale encoding."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice
from typing import Any

import msgspec
import pytest

from pipeline.aggregates import Aggregate
from pipeline.core import CoreConfig
from pipeline.fastjson import dumps, loads
from pipeline.generator import TrafficGenerator
from pipeline.partition import Partial, PartitionCore
from pipeline.processor import partition_key

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def events(count: int, skip: int = 0) -> list[tuple[str, dict[str, Any]]]:
    generator = TrafficGenerator(3, START, cases_per_second=50.0)
    return list(islice(generator, skip, skip + count))


def feed(core: PartitionCore, batch: list[tuple[str, dict[str, Any]]]) -> None:
    for topic, record in batch:
        core.process(topic, partition_key(topic, record), record)


def bucket_records(records: dict[str, Any]) -> dict[str, Any]:
    """The bucket records of ``changed_records``, decoded."""
    return {k: None if v is None else loads(bytes(v)) for k, v in records.items() if k[:2] == "b/"}


def test_partials_and_bucket_records_are_the_buckets_json() -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(600))
    partials = [m for m in core.drain() if isinstance(m, Partial)]
    records = core.changed_records()
    sent = {(p.loop, k): a for p in partials for k, a in p.buckets.items()}
    assert sent and all(isinstance(v, msgspec.Raw) for k, v in records.items() if k[:2] == "b/")
    for partial in partials:
        assert partial.encode() == dumps(partial.to_json())
    assert bucket_records(records) == {
        f"b/{loop}/{index}": aggregate.to_json() for (loop, index), aggregate in sent.items()
    }


def test_a_bucket_that_changes_after_its_partial_is_encoded_again() -> None:
    core = PartitionCore(CoreConfig())
    batch = events(400)
    feed(core, batch[:200])
    first = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    encoded = {(p.loop, k): p.encode() for p in first for k in p.buckets}
    feed(core, batch[200:])  # same buckets, more events, before the checkpoint is taken
    records = bucket_records(core.changed_records())
    changed = [key for key in encoded if f"b/{key[0]}/{key[1]}" in records]
    assert changed
    for loop, index in changed:
        assert records[f"b/{loop}/{index}"] == core.buckets[(loop, index)].to_json()
    later = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    for partial in later:
        assert partial.encode() == dumps(partial.to_json())
    assert any(p.encode() != encoded[(p.loop, k)] for p in later for k in p.buckets)


def test_each_changed_bucket_is_encoded_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(600))
    calls: list[int] = []
    to_json = Aggregate.to_json

    def counted(self: Aggregate) -> dict[str, Any]:
        calls.append(1)
        return to_json(self)

    monkeypatch.setattr(Aggregate, "to_json", counted)
    for message in core.drain():
        if isinstance(message, Partial):
            message.encode()
    records = core.changed_records()
    buckets = [k for k, v in records.items() if k[:2] == "b/" and v is not None]
    assert len(buckets) > 1
    assert len(calls) == len(buckets)


def test_restore_from_changed_records_as_they_are() -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(500))
    list(core.drain())
    restored = PartitionCore.from_records(CoreConfig(), 0, core.changed_records())
    assert {k: a.to_json() for k, a in restored.buckets.items()} == {
        k: a.to_json() for k, a in core.buckets.items()
    }
