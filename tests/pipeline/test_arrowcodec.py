"""Batch decoding into Arrow: the same values as the per-record codec, and every bad record of a
batch named exactly as the codec names it (the rest still decoded)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.arrowcodec import ArrowDecoder, DecodedBatch
from pipeline.arrowrows import to_rows
from pipeline.codec import Codec, CodecError, default_schema_dir
from tests.pipeline.test_codec import RECORDS

CODEC = Codec.load()
DECODER = ArrowDecoder(CODEC)


def _plain(value: Any) -> Any:
    """Arrow's Python values in the codec's shapes (maps come as lists of pairs)."""
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return dict(value)
    return value


def _outcomes(batch: DecodedBatch, size: int) -> list[tuple[str, Any]]:
    """Per message: ("row", record) from the table or one by one, or ("error", reason, text)."""
    out: list[Any] = [None] * size
    if batch.table is not None:
        assert batch.table.num_rows == len(batch.table_index)
        for index, row in zip(batch.table_index, batch.table.to_pylist(), strict=True):
            out[index] = ("row", {k: _plain(v) for k, v in row.items()})
    for index, record in batch.records:
        assert out[index] is None
        out[index] = ("row", record)
    for index, error in batch.errors:
        assert out[index] is None
        out[index] = ("error", error.reason, str(error))
    assert None not in out
    return out


def _reference(values: Sequence[bytes | None], expected: str) -> list[tuple[str, Any]]:
    out: list[Any] = []
    for value in values:
        try:
            out.append(("row", CODEC.decode(value, expected=expected).record))
        except CodecError as exc:
            out.append(("error", exc.reason, str(exc)))
    return out


def _variant(name: str, n: int) -> dict[str, Any]:
    first = CODEC.schema(name)["fields"][0]["name"]
    return {**RECORDS[name], first: f"{RECORDS[name][first]}-{n}"}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_record_type_decodes_in_one_table_to_the_codecs_values(name: str) -> None:
    values = [CODEC.encode(name, _variant(name, n)) for n in range(5)]
    batch = DECODER.decode(name, values)
    assert batch.table is not None and batch.table_index == list(range(5))
    assert not batch.records and not batch.errors
    assert _outcomes(batch, 5) == _reference(values, name)


def test_bad_records_are_named_as_the_codec_names_them_and_the_rest_decode() -> None:
    good = [CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(6)]
    values: list[bytes | None] = [
        good[0],
        b"not avro",  # bad_header
        good[1][:20],  # truncated inside loop
        CODEC.encode("EvalResult", RECORDS["EvalResult"]),  # wrong_record
        good[2] + b"\x00\x02",  # two bytes after the record, mid-batch
        None,  # a tombstone
        good[3],
        b"\xc3\x01" + bytes(8) + good[4][10:],  # unknown writer fingerprint
        good[5] + b"\x00",  # one byte after the last record
    ]
    batch = DECODER.decode("InputEvent", values)
    outcomes = _outcomes(batch, len(values))
    assert outcomes == _reference(values, "InputEvent")
    assert [o[1] if o[0] == "error" else "ok" for o in outcomes] == [
        "ok",
        "bad_header",
        "truncated",
        "wrong_record",
        "bad_value",
        "bad_header",
        "ok",
        "unknown_schema",
        "bad_value",
    ]


def test_a_byte_moved_from_one_record_to_the_next_is_caught() -> None:
    """Concatenated, the bodies read as valid records; only the check that each row starts
    where its message starts sees that the first is cut short and the second starts wrong."""
    a, b, c = (CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(3))
    values = [a[:-1], b[:10] + a[-1:] + b[10:], c]
    outcomes = _outcomes(DECODER.decode("InputEvent", values), 3)
    assert outcomes == _reference(values, "InputEvent")
    assert [o[0] for o in outcomes] == ["error", "error", "row"]


def test_bad_headers_alone_keep_the_batch_in_one_table() -> None:
    good = [CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(3)]
    values = [good[0], b"junk", good[1], None, good[2]]
    batch = DECODER.decode("InputEvent", values)
    assert batch.table_index == [0, 2, 4] and batch.table is not None
    assert [i for i, _ in batch.errors] == [1, 3]
    assert _outcomes(batch, 5) == _reference(values, "InputEvent")


def test_a_bad_enum_index_is_named_like_the_codec_does() -> None:
    data = bytearray(CODEC.encode("EvalResult", RECORDS["EvalResult"]))
    release = b"\x12" + b"2026.11.0"
    at = data.index(release) + len(release)
    data[at] = 0x0A  # suite index 5: no such symbol
    values = [CODEC.encode("EvalResult", _variant("EvalResult", 1)), bytes(data)]
    assert _outcomes(DECODER.decode("EvalResult", values), 2) == _reference(values, "EvalResult")


def test_an_older_writer_goes_one_by_one_and_keeps_its_place() -> None:
    old = json.loads((default_schema_dir() / "history/MetricSnapshot/v1.avsc").read_text())
    record = {k: v for k, v in RECORDS["MetricSnapshot"].items() if k != "drift_json"}
    values = [
        CODEC.encode("MetricSnapshot", _variant("MetricSnapshot", 1)),
        Codec([old]).encode("MetricSnapshot", record),
        CODEC.encode("MetricSnapshot", _variant("MetricSnapshot", 2)),
    ]
    batch = DECODER.decode("MetricSnapshot", values)
    assert batch.table_index == [0, 2]
    assert batch.records == [(1, {**record, "drift_json": None})]
    assert _outcomes(batch, 3) == _reference(values, "MetricSnapshot")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.one_of(
                st.just(("keep", 0, b"")),
                st.tuples(st.just("cut"), st.integers(1, 60), st.just(b"")),
                st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=6)),
            ),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_any_framing_damage_gives_exactly_the_codecs_outcome(
    plan: list[tuple[int, tuple[str, int, bytes]]],
) -> None:
    """Records cut short or with bytes after them, anywhere in a batch: each one gets the
    codec's own error and every other record its exact values (no garbage row, no hang)."""
    values: list[bytes | None] = []
    for n, (how, cut, extra) in plan:
        data = CODEC.encode("InputEvent", _variant("InputEvent", n))
        if how == "cut":
            data = data[: max(len(data) - cut, 0)]
        values.append(data + extra)
    assert _outcomes(DECODER.decode("InputEvent", values), len(values)) == _reference(
        values, "InputEvent"
    )


def _in_ms(record: dict[str, Any]) -> dict[str, Any]:
    """The codec's record with each datetime as epoch milliseconds, as the core reads it."""
    return {
        k: round(v.timestamp() * 1000) if isinstance(v, datetime) else v for k, v in record.items()
    }


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_rows_are_the_codecs_records_with_event_times_in_milliseconds(name: str) -> None:
    records = [_variant(name, n) for n in range(4)]
    for field in CODEC.schema(name)["fields"]:  # maps of several sizes, empty ones between
        if isinstance(field["type"], dict) and field["type"].get("type") == "map":
            records[1][field["name"]] = {}
            value = next(iter(records[0][field["name"]].values()))
            records[2][field["name"]] = {f"k{i}": value for i in (1, 2, 3)}
    values = [CODEC.encode(name, record) for record in records]
    batch = DECODER.decode(name, values)
    assert batch.table is not None and batch.table_index == [0, 1, 2, 3]
    expected = [_in_ms(CODEC.decode(value).record) for value in values]
    assert to_rows(batch.table) == expected


def test_rows_keep_null_maps_enums_and_other_timestamp_units() -> None:
    at = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    table = pa.table(
        {
            "m": pa.array(
                [{"a": 1.5}, None, {}, {"b": 2.0, "c": 3.0}], pa.map_(pa.string(), pa.float64())
            ),
            "e": pa.array(["X", "Y", "X", None]).dictionary_encode(),
            "us": pa.array([at, None, at, at], pa.timestamp("us", tz="UTC")),
            "ms": pa.array([0, 1, None, 1_764_072_000_123], pa.timestamp("ms", tz="UTC")),
        }
    )
    rows = to_rows(pa.Table.from_batches(table.to_batches(max_chunksize=3)))  # two chunks
    assert rows == [
        {"m": {"a": 1.5}, "e": "X", "us": at, "ms": 0},
        {"m": None, "e": "Y", "us": None, "ms": 1},
        {"m": {}, "e": "X", "us": at, "ms": None},
        {"m": {"b": 2.0, "c": 3.0}, "e": None, "us": at, "ms": 1_764_072_000_123},
    ]


def _as_outcomes(rows: list[dict[str, Any] | CodecError]) -> list[tuple[str, Any]]:
    return [
        ("error", r.reason, str(r)) if isinstance(r, CodecError) else ("row", _in_ms(r))
        for r in rows
    ]


@pytest.mark.parametrize("truncated", [False, True])
def test_rows_give_each_value_its_record_or_error_in_order(truncated: bool) -> None:
    """Through the table (bad headers aside), or one by one when a framed record is bad."""
    good = [CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(4)]
    values: list[bytes | None] = [good[0], b"not avro", good[1], good[2], good[3]]
    if truncated:
        values[3] = good[2][:20]
    table_index = DECODER.decode("InputEvent", values).table_index
    assert table_index == ([] if truncated else [0, 2, 3, 4])
    expected = [
        ("error", o[1], o[2]) if o[0] == "error" else ("row", _in_ms(o[1]))
        for o in _reference(values, "InputEvent")
    ]
    kinds = ["row", "error", "row", "error" if truncated else "row", "row"]
    assert [o[0] for o in expected] == kinds
    assert _as_outcomes(DECODER.rows("InputEvent", values)) == expected


def test_rows_fall_back_to_one_by_one_when_reading_the_table_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No batch can stop a worker: should reading rows from Arrow ever fail, the codec
    decodes each record, with the same values and errors in the same places."""
    good = [CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(3)]
    values: list[bytes | None] = [good[0], b"not avro", good[1], good[2]]
    expected = _as_outcomes(DECODER.rows("InputEvent", values))

    def broken(table: pa.Table) -> list[dict[str, Any]]:
        raise pa.ArrowInvalid("a type this reader does not know")

    monkeypatch.setattr("pipeline.arrowcodec.to_rows", broken)
    with caplog.at_level("ERROR", logger="pipeline.arrowcodec"):
        assert _as_outcomes(DECODER.rows("InputEvent", values)) == expected
    assert "decoding one by one" in caplog.text
    assert [o[0] for o in expected] == ["row", "error", "row", "row"]


def test_mixed_rows_decode_each_type_at_once_and_keep_message_order() -> None:
    inputs = [CODEC.encode("InputEvent", _variant("InputEvent", n)) for n in range(2)]
    result = CODEC.encode("EvalResult", RECORDS["EvalResult"])
    values: list[bytes | None] = [inputs[0], result, None, inputs[1], b"not avro"]
    expected: list[str | None] = ["InputEvent", "EvalResult", None, "InputEvent", "EvalResult"]
    outcomes = DECODER.mixed_rows(expected, values)
    assert outcomes[2] is None  # not to decode: left None
    got = [o for i, o in enumerate(outcomes) if i != 2]
    assert isinstance(got[3], CodecError) and got[3].reason == "bad_header"
    rows = [o for o in got if not isinstance(o, CodecError)]
    assert rows == [_in_ms(CODEC.decode(v).record) for v in (inputs[0], result, inputs[1])]


@pytest.mark.parametrize("ts", [253_402_300_800_000, -62_135_596_800_001, 99_999_999_999_999_999])
def test_a_time_no_datetime_holds_is_named_like_the_codec_does(ts: int) -> None:
    """Arrow holds any long; the codec decodes a timestamp-millis into a datetime (years 1 to
    9999). The last times a datetime holds still go into the table."""
    first, last = -62_135_596_800_000, 253_402_300_799_999
    edges = [
        CODEC.encode("InputEvent", {**_variant("InputEvent", n), "ts": t})
        for n, t in ((1, first), (2, last))
    ]
    assert DECODER.decode("InputEvent", edges).table is not None
    values = [*edges, CODEC.encode("InputEvent", {**_variant("InputEvent", 3), "ts": ts})]
    outcomes = _outcomes(DECODER.decode("InputEvent", values), 3)
    assert outcomes == _reference(values, "InputEvent")
    assert outcomes[2][:2] == ("error", "bad_value")
