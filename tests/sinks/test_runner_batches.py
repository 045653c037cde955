"""The runner's step 1 without a broker: a partition's messages decoded at once into Arrow,
with one-by-one records and dead letters kept in offset order, and every row in the archive."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.codec import Codec
from pipeline.settings import Settings
from sinks.runner import SinkRunner
from tests.sinks.factories import at, eval_case, input_event
from tests.sinks.test_store import fetch, make_archive, make_sink


@dataclass(frozen=True)
class Message:
    """The fields of an aiokafka ConsumerRecord that the runner reads."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


def _eval_case_before_tokens() -> dict[str, Any]:
    """An EvalCase schema from before its ``tokens`` field existed (an older writer)."""
    current = Codec.load().schema("EvalCase")
    return {**current, "fields": [f for f in current["fields"] if f["name"] != "tokens"]}


def test_a_partition_batch_keeps_offset_order_across_arrow_rows_and_single_records(
    tmp_path: Path,
) -> None:
    current = Codec.load()
    old = Codec([_eval_case_before_tokens()])
    codec = Codec([current.schema(n) for n in current.names], [_eval_case_before_tokens()])
    settings = Settings(topic_prefix="t.")
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    runner = SinkRunner(settings, sink, ("eval-cases",), "g", codec=codec)
    older = {k: v for k, v in eval_case("e1", at(1), expected="refund").items() if k != "tokens"}
    values = [
        codec.encode("EvalCase", eval_case("e2", at(0), expected="refund")),
        old.encode("EvalCase", older),  # one by one (an older writer) ...
        codec.encode("EvalCase", eval_case("e1", at(2), expected="deny")),  # ... then newer
        b"\xc3\x01 no such writer",  # a dead letter between the runs
        codec.encode("EvalCase", eval_case("e3", at(3), expected="refund")),
        None,  # a tombstone: e2 is deleted
    ]
    messages = [
        Message("t.eval-cases", 0, 40 + i, v, b"e2" if v is None else None)
        for i, v in enumerate(values)
    ]
    asyncio.run(runner._add_partition(messages))
    assert runner.progress.consumed == 6 and runner.progress.dead_letters == 1
    assert sink.flush() == {("t.eval-cases", 0): 46}
    assert fetch(archive, "SELECT eval_case_id, expected FROM eval_cases ORDER BY 1") == [
        ("e1", "deny"),
        ("e3", "refund"),
    ]
    assert fetch(archive, "SELECT event_id, reason FROM dead_letters") == [
        ("t.eval-cases:0:43", "unknown_schema")
    ]


def test_a_batch_the_sink_cannot_take_at_once_is_retried_record_by_record(
    tmp_path: Path,
) -> None:
    """A failure while turning many records into rows is not a lost batch: the records go one
    by one, and only the record that fails becomes a dead letter."""
    codec = Codec.load()
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    runner = SinkRunner(Settings(topic_prefix="t."), sink, ("inputs",), "g", codec=codec)
    calls = []

    def failing(*args: object) -> None:
        calls.append(args)
        raise RuntimeError("cannot take these rows")

    sink.add_records = failing  # type: ignore[method-assign]
    values = [codec.encode("InputEvent", input_event(f"i{n}", f"c{n}", at(0))) for n in range(3)]
    asyncio.run(runner._add_partition([Message("t.inputs", 2, n, v) for n, v in enumerate(values)]))
    assert len(calls) == 1 and runner.progress.dead_letters == 0
    assert sink.flush() == {("t.inputs", 2): 3}
    assert fetch(archive, "SELECT event_id FROM inputs ORDER BY 1") == [("i0",), ("i1",), ("i2",)]


def test_an_event_stamped_past_the_year_9999_is_a_dead_letter_and_the_batch_is_archived(
    tmp_path: Path,
) -> None:
    """Decoded at once into Arrow it was a valid long, and DuckDB then refused the whole batch
    ("Could not convert TimestampTZ"): the sink stopped at it, and again after every restart."""
    codec = Codec.load()
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    runner = SinkRunner(Settings(topic_prefix="t."), sink, ("inputs",), "g", codec=codec)
    far = {**input_event("i2", "c2", at(1)), "ts": 99_999_999_999_999_999}
    records = [input_event("i1", "c1", at(0)), far, input_event("i3", "c3", at(2))]
    values = [codec.encode("InputEvent", r) for r in records]
    messages = [Message("t.inputs", 0, 10 + i, v) for i, v in enumerate(values)]
    asyncio.run(runner._add_partition(messages))
    assert sink.flush() == {("t.inputs", 0): 13}
    assert fetch(archive, "SELECT event_id FROM inputs ORDER BY 1") == [("i1",), ("i3",)]
    assert fetch(archive, "SELECT event_id, reason FROM dead_letters") == [
        ("t.inputs:0:11", "bad_value")
    ]


def test_a_map_holding_a_key_twice_in_a_batch_is_archived_as_the_codec_reads_it(
    tmp_path: Path,
) -> None:
    """Valid Avro binary, but no dict: DuckDB refused the whole batch ("Arrow map contains
    duplicate key"), again after every restart. Taken one by one, the last value of the key
    stands, as the per-record codec (and the workers) read it."""
    codec = Codec.load()
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    runner = SinkRunner(Settings(topic_prefix="t."), sink, ("inputs",), "g", codec=codec)
    twice = bytearray(
        codec.encode(
            "InputEvent", {**input_event("i2", "c2", at(1)), "features": {"aa": 1.0, "bb": 2.0}}
        )
    )
    at_bb = twice.index(b"bb")
    twice[at_bb : at_bb + 2] = b"aa"  # the second key spelled as the first
    values = [
        codec.encode("InputEvent", input_event("i1", "c1", at(0))),
        bytes(twice),
        codec.encode("InputEvent", input_event("i3", "c3", at(2))),
    ]
    messages = [Message("t.inputs", 0, 10 + i, v) for i, v in enumerate(values)]
    asyncio.run(runner._add_partition(messages))
    assert sink.flush() == {("t.inputs", 0): 13}
    assert fetch(archive, "SELECT event_id, features FROM inputs ORDER BY 1") == [
        ("i1", {"amount": 12.5}),  # the factory's
        ("i2", {"aa": 2.0}),
        ("i3", {"amount": 12.5}),
    ]
    assert runner.progress.dead_letters == 0
