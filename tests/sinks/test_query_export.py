"""`loopline query` (read-only, three formats) and the Parquet export layout."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from click.testing import CliRunner

from pipeline.cli import main
from tests.sinks import factories as f
from tests.sinks.test_store import make_archive
from tests.sinks.test_views import _write


def _archive(tmp_path: Path) -> Path:
    archive = make_archive(tmp_path / "a.duckdb")
    _write(
        archive,
        [
            ("inputs", f.input_event("i1", "c1", f.at(0, 5))),
            ("inputs", f.input_event("i2", "c2", f.at(1, 5), category="damaged")),
            ("inputs", f.input_event("i3", "c3", f.at(1, 9), loop="kyc-review")),
            (
                "dlq",
                {
                    "event_id": "t:0:1",
                    "source_topic": "t",
                    "source_partition": 0,
                    "source_offset": 1,
                    "key": None,
                    "value": b"x",
                    "reason": "bad_header",
                    "error": "not avro",
                    "ts": f.at(1),
                },
            ),
        ],
    )
    return archive.path


def test_query_prints_csv_json_and_a_table_and_refuses_writes(tmp_path: Path) -> None:
    db = str(_archive(tmp_path))
    sql = "SELECT event_id, loop, ts, features['amount'] AS amount FROM inputs ORDER BY event_id"
    run = CliRunner().invoke
    csv_out = run(main, ["query", sql, "--format", "csv", "--db", db])
    assert csv_out.exit_code == 0, csv_out.output
    assert csv_out.output.splitlines() == [
        "event_id,loop,ts,amount",
        "i1,refunds,2026-11-16T00:00:05+00:00,12.5",
        "i2,refunds,2026-11-17T00:00:05+00:00,12.5",
        "i3,kyc-review,2026-11-17T00:00:09+00:00,12.5",
    ]
    json_out = run(
        main, ["query", "SELECT count(*) AS n FROM inputs", "--format", "json", "--db", db]
    )
    assert [json.loads(line) for line in json_out.output.splitlines()] == [{"n": 3}]
    table = run(
        main,
        ["query", "SELECT category, count(*) AS n FROM inputs GROUP BY 1 ORDER BY 1", "--db", db],
    )
    assert table.exit_code == 0 and "damaged" in table.output and "late" in table.output
    refused = run(main, ["query", "DELETE FROM inputs", "--db", db])
    assert refused.exit_code == 1 and "read-only" in refused.output
    missing = run(main, ["query", "SELECT 1", "--db", str(tmp_path / "nope.duckdb")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_parquet_export_partitions_by_loop_and_day(tmp_path: Path) -> None:
    db = str(_archive(tmp_path))
    out = tmp_path / "lake"
    result = CliRunner().invoke(
        main,
        [
            "archive",
            "export-parquet",
            str(out),
            "--table",
            "inputs",
            "--table",
            "dead_letters",
            "--db",
            db,
        ],
    )
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out).parent) for p in out.rglob("*.parquet"))
    assert files == [
        "dead_letters/day=2026-11-17",
        "inputs/loop=kyc-review/day=2026-11-17",
        "inputs/loop=refunds/day=2026-11-16",
        "inputs/loop=refunds/day=2026-11-17",
    ]
    back = duckdb.sql(
        "SELECT event_id, loop, CAST(day AS VARCHAR) "
        f"FROM read_parquet('{out}/inputs/**/*.parquet', hive_partitioning = true) "
        "ORDER BY event_id"
    ).fetchall()
    assert back == [
        ("i1", "refunds", "2026-11-16"),
        ("i2", "refunds", "2026-11-17"),
        ("i3", "kyc-review", "2026-11-17"),
    ]
    unknown = CliRunner().invoke(
        main, ["archive", "export-parquet", str(out), "--table", "nope", "--db", db]
    )
    assert unknown.exit_code == 1 and "unknown table(s) nope" in unknown.output
