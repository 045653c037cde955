"""Eval set files: rows validated with their line numbers, defaults filled, suites aged."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.codec import Codec
from pipeline.evalset import aged, read_eval_cases

NOW = 1_795_000_000_000
DAY = 86_400_000


def test_bad_rows_are_named_by_line_and_good_rows_kept(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"eval_case_id": "a", "loop": "refunds", "category": "late"}),
                "{not json",
                "",
                json.dumps({"eval_case_id": "b", "loop": "refunds", "suite": "NEXT"}),
                json.dumps({"eval_case_id": "c", "loop": "refunds", "ts": "2026-11-25T09:00:00Z"}),
                json.dumps(["a", "list"]),
                json.dumps({"eval_case_id": "d", "loop": "refunds", "ts": "last week"}),
            ]
        )
    )
    rows = list(read_eval_cases(path, Codec.load(), NOW))
    good = {r["eval_case_id"]: r for _, r, _ in rows if r is not None}
    bad = {where.rsplit(":", 1)[-1]: error for where, r, error in rows if r is None}
    assert set(good) == {"a", "c"} and set(bad) == {"2", "4", "6", "7"}
    assert "not JSON" in bad["2"] and "suite" in bad["4"] and "JSON object" in bad["6"]
    assert bad["7"] == (
        "ts: not a timestamp: 'last week' (epoch milliseconds or ISO-8601 text with its offset)"
    )
    assert (good["a"]["suite"], good["a"]["origin"], good["a"]["ts"]) == (
        "CURRENT",
        "IMPORTED",
        NOW,
    )
    assert good["c"]["ts"] == 1_795_597_200_000  # 2026-11-25T09:00:00Z
    assert good["a"]["features"] == {} and good["a"]["attributes"] == {}


def test_parquet_maps_come_back_as_dicts(tmp_path: Path) -> None:
    path = tmp_path / "cases.parquet"
    table = pa.Table.from_pylist(
        [{"eval_case_id": "p1", "loop": "kyc-review", "features": [("age", 3.0)], "tokens": 12}],
        schema=pa.schema(
            [
                ("eval_case_id", pa.string()),
                ("loop", pa.string()),
                ("features", pa.map_(pa.string(), pa.float64())),
                ("tokens", pa.int64()),
            ]
        ),
    )
    pq.write_table(table, path)
    [(where, record, error)] = list(read_eval_cases(path, Codec.load(), NOW))
    assert error is None and where.endswith(":row 1")
    assert record is not None and record["features"] == {"age": 3.0} and record["tokens"] == 12


def test_current_cases_older_than_the_limit_turn_historical() -> None:
    cases = [
        {"eval_case_id": "old", "suite": "CURRENT", "ts": NOW - 31 * DAY},
        {"eval_case_id": "young", "suite": "CURRENT", "ts": NOW - 29 * DAY},
        {"eval_case_id": "hist", "suite": "HISTORICAL", "ts": NOW - 90 * DAY},
    ]
    assert aged(cases, NOW, 30) == [
        {"eval_case_id": "old", "suite": "HISTORICAL", "ts": NOW - 31 * DAY}
    ]


def test_a_file_that_cannot_be_read_is_one_rejection_and_a_bad_line_one_row(
    tmp_path: Path,
) -> None:
    good = {"eval_case_id": "p1", "loop": "refunds"}
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist([good]), whole)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole.read_bytes()[:100])  # its footer (and magic) cut off
    not_parquet = tmp_path / "named.parquet"
    not_parquet.write_text(json.dumps(good) + "\n")
    for path in (truncated, not_parquet):
        [(where, record, error)] = list(read_eval_cases(path, Codec.load(), NOW))
        assert (where, record) == (str(path), None)
        assert error is not None and error.startswith("not a readable Parquet file (")
    lines = tmp_path / "cases.jsonl"
    lines.write_bytes(b'{"eval_case_id": "x\xff"}\n' + json.dumps(good).encode() + b"\n")
    rows = list(read_eval_cases(lines, Codec.load(), NOW))
    assert [(where, error) for where, _, error in rows] == [
        (f"{lines}:1", "not UTF-8 text (invalid start byte at byte 19)"),
        (f"{lines}:2", None),
    ]
