"""The codec: single-object encoding, schema evolution and errors that name their field."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest

from pipeline.codec import Codec, CodecError, default_schema_dir

TS = datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=UTC)

RECORDS: dict[str, dict[str, Any]] = {
    "InputEvent": {
        "event_id": "e-1",
        "case_id": "c-1",
        "loop": "refunds",
        "ts": TS,
        "source": "api",
        "channel": "chat",
        "category": "late",
        "language": "de",
        "features": {"order_value_usd": 12.5},
        "attributes": {"tier": "pro"},
        "text": "where is my parcel",
        "embedding": [0.5, -0.25],
        "tokens": 42,
    },
    "ResolutionEvent": {
        "event_id": "e-2",
        "case_id": "c-1",
        "loop": "refunds",
        "ts": TS,
        "resolver": "HYBRID",
        "outcome": "ESCALATED",
        "release": "2026.11.0",
        "model": "model-a",
        "model_cost_usd": 0.0125,
        "other_cost_usd": 0.001,
        "input_tokens": 42,
        "output_tokens": 7,
        "human_minutes": 3.5,
        "confidence": 0.75,
        "eval_passed": False,
        "failure_reason": "policy",
        "output": "escalated",
    },
    "EvalResult": {
        "event_id": "e-3",
        "eval_case_id": "ec-1",
        "case_id": None,
        "loop": "refunds",
        "ts": TS,
        "release": "2026.11.0",
        "suite": "HISTORICAL",
        "passed": True,
        "score": 0.5,
        "evaluator": "judge",
    },
    "EvalCase": {
        "eval_case_id": "ec-1",
        "loop": "refunds",
        "ts": TS,
        "suite": "CURRENT",
        "origin": "REVIEWED",
        "case_id": "c-1",
        "channel": "email",
        "category": "late",
        "language": "en",
        "features": {"order_value_usd": 3.0},
        "attributes": {"tier": "free"},
        "text": "late",
        "embedding": None,
        "tokens": 10,
        "expected": "refund",
        "notes": "ok",
    },
    "MetricSnapshot": {
        "event_id": "loopline@w1:refunds:1795600000000",
        "ts": TS,
        "loop": "refunds",
        "producer": "loopline@w1",
        "unresolved_cases": 3,
        "windows_json": '{"5m": {"resolved": 0}}',
        "drift_json": '{"detected": false, "features": {}}',
    },
    "Alert": {
        "event_id": "quality_floor:refunds:FIRING:1795600000000",
        "fingerprint": "quality_floor:refunds",
        "rule": "quality_floor",
        "loop": "refunds",
        "severity": "CRITICAL",
        "state": "FIRING",
        "value": 0.7,
        "threshold": 0.8,
        "window": "1h",
        "started_at": TS,
        "ts": TS,
        "summary": "quality 70% < 80%",
        "runbook_url": "docs/runbooks/quality_floor.md",
    },
    "EvalCandidate": {
        "candidate_id": "k-1",
        "case_id": "c-1",
        "loop": "refunds",
        "ts": TS,
        "reasons": ["failed_eval", "novel_category"],
        "priority": 2.5,
        "channel": "chat",
        "category": "chargeback",
        "language": "en",
        "input_text": "refund please [email]",
        "output": "denied",
        "resolver": "SYSTEM",
        "outcome": "FAILED",
        "release": "2026.11.0",
        "confidence": 0.4,
        "cost_usd": 0.02,
        "latency_seconds": 8.5,
        "verdicts": {"CURRENT": False},
        "drifted_features": ["category"],
        "features": {"order_value_usd": 59.9},
        "attributes": {"tier": "pro"},
        "tokens": 420,
        "embedding": [0.5, -0.25],
    },
    "ReviewDecision": {
        "event_id": "r-1",
        "candidate_id": "k-1",
        "loop": "refunds",
        "reviewer": "ana",
        "decision": "ACCEPTED",
        "expected": "refund",
        "suite": "CURRENT",
        "eval_case_id": "ec-9",
        "notes": None,
        "ts": TS,
    },
    "DeadLetter": {
        "event_id": "loopline.inputs:0:7",
        "source_topic": "loopline.inputs",
        "source_partition": 0,
        "source_offset": 7,
        "key": b"c-1",
        "value": b"\x00\x01",
        "reason": "bad_header",
        "error": "not Avro",
        "ts": TS,
    },
}


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.load()


def _rabin64(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification's reference code computes it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_round_trip_of_every_schema(codec: Codec, name: str) -> None:
    decoded = codec.decode(codec.encode(name, RECORDS[name]), expected=name)
    assert decoded.name == name
    assert decoded.record == RECORDS[name]


def test_every_schema_file_has_a_round_trip_case(codec: Codec) -> None:
    assert set(codec.names) == set(RECORDS)


def test_a_metric_snapshot_from_the_first_schema_version_reads_with_no_drift(codec: Codec) -> None:
    old = json.loads((default_schema_dir() / "history/MetricSnapshot/v1.avsc").read_text())
    record = {k: v for k, v in RECORDS["MetricSnapshot"].items() if k != "drift_json"}
    data = Codec([old]).encode("MetricSnapshot", record)
    assert codec.decode(data, expected="MetricSnapshot").record == {**record, "drift_json": None}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_plain_fastavro_reads_the_body_after_the_ten_byte_header(codec: Codec, name: str) -> None:
    data = codec.encode(name, RECORDS[name])
    assert data[:2] == b"\xc3\x01"
    raw = json.loads((default_schema_dir() / f"{name}.avsc").read_text())
    canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(raw))
    assert data[2:10] == _rabin64(canonical.encode()).to_bytes(8, "little")
    plain = fastavro.schemaless_reader(io.BytesIO(data[10:]), fastavro.parse_schema(raw))
    assert plain == RECORDS[name]


def test_older_writer_schema_is_resolved_against_the_current_reader() -> None:
    current = json.loads((default_schema_dir() / "InputEvent.avsc").read_text())
    # Version 0 of InputEvent: before language, text, embedding and tokens were added.
    dropped = {"language", "text", "embedding", "tokens"}
    old = dict(current, fields=[f for f in current["fields"] if f["name"] not in dropped])
    old_codec = Codec([old])
    old_record = {k: v for k, v in RECORDS["InputEvent"].items() if k not in dropped}
    data = old_codec.encode("InputEvent", old_record)

    reader = Codec([current], writers=[old])
    decoded = reader.decode(data, expected="InputEvent")
    assert decoded.record == {
        **old_record,
        "language": None,
        "text": None,
        "embedding": None,
        "tokens": None,
    }
    # Without the old writer's schema the fingerprint is unknown, and says so.
    with pytest.raises(CodecError) as info:
        Codec([current]).decode(data)
    assert info.value.reason == "unknown_schema"
    assert data[2:10].hex() in str(info.value)


def test_history_folder_supplies_older_writers(tmp_path: Any) -> None:
    current = json.loads((default_schema_dir() / "EvalResult.avsc").read_text())
    old = dict(current, fields=[f for f in current["fields"] if f["name"] != "score"])
    (tmp_path / "EvalResult.avsc").write_text(json.dumps(current))
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "EvalResult.v0.avsc").write_text(json.dumps(old))
    record = {k: v for k, v in RECORDS["EvalResult"].items() if k != "score"}
    decoded = Codec.load(tmp_path).decode(Codec([old]).encode("EvalResult", record))
    assert decoded.record == {**record, "score": None}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"tokens": "42"}, "tokens", "does not match"),
        ({"ts": "yesterday"}, "ts", "does not match"),
        ({"features": {"order_value_usd": "high"}}, "features", "does not match"),
        ({"surprise": 1}, "surprise", "unknown field"),
        ({"ts": datetime(2026, 11, 25, 12, 0)}, "ts", "naive datetime"),
    ],
)
def test_encode_errors_name_their_field(
    codec: Codec, change: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(CodecError) as info:
        codec.encode("InputEvent", {**RECORDS["InputEvent"], **change})
    assert info.value.field == field
    assert f"InputEvent.{field}" in str(info.value)
    assert words in str(info.value)


def test_missing_required_field_and_bad_enum_symbol(codec: Codec) -> None:
    record = {k: v for k, v in RECORDS["ResolutionEvent"].items() if k != "release"}
    with pytest.raises(CodecError, match=r"ResolutionEvent\.release: required field is missing"):
        codec.encode("ResolutionEvent", record)
    with pytest.raises(CodecError) as info:
        codec.encode("ResolutionEvent", {**RECORDS["ResolutionEvent"], "resolver": "ROBOT"})
    assert info.value.field == "resolver"
    assert "'ROBOT'" in str(info.value)


def test_aware_datetimes_in_any_zone_encode_as_the_same_instant(codec: Codec) -> None:
    cet = TS.astimezone(timezone(timedelta(hours=1)))
    decoded = codec.decode(codec.encode("InputEvent", {**RECORDS["InputEvent"], "ts": cet}))
    assert decoded.record["ts"] == TS


def test_truncated_body_names_the_field_where_bytes_ran_out(codec: Codec) -> None:
    data = codec.encode("InputEvent", RECORDS["InputEvent"])
    # Header (10) + event_id "e-1" (1 length byte + 3) + case_id "c-1" (1 + 3) = 18 bytes;
    # cutting inside loop's string leaves loop as the field that cannot be read.
    with pytest.raises(CodecError) as info:
        codec.decode(data[:20])
    assert info.value.reason == "truncated"
    assert info.value.field == "loop"
    assert "InputEvent.loop" in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_header"),
        (b'{"event_id": 1}', "bad_header"),
        (b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00body", "unknown_schema"),
    ],
)
def test_bad_headers_are_specific(codec: Codec, data: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(data)
    assert info.value.reason == reason


def test_wrong_record_type_and_trailing_bytes(codec: Codec) -> None:
    data = codec.encode("EvalResult", RECORDS["EvalResult"])
    with pytest.raises(CodecError) as info:
        codec.decode(data, expected="InputEvent")
    assert info.value.reason == "wrong_record"
    assert "expected a InputEvent record, got EvalResult" in str(info.value)
    with pytest.raises(CodecError) as info:
        codec.decode(data + b"\x00\x00")
    assert info.value.reason == "bad_value"
    assert "2 bytes after the record" in str(info.value)


def test_bad_enum_index_on_the_wire_names_the_field(codec: Codec) -> None:
    data = bytearray(codec.encode("EvalResult", RECORDS["EvalResult"]))
    # The suite enum index sits right after release; HISTORICAL is index 1 (zigzag 0x02).
    body = bytes(data[10:])
    release = b"\x12" + b"2026.11.0"
    at = 10 + body.index(release) + len(release)
    assert data[at] == 0x02
    data[at] = 0x0A  # index 5: no such symbol
    with pytest.raises(CodecError) as info:
        codec.decode(bytes(data))
    assert info.value.field == "suite"
