"""The archive store and sink without Kafka: idempotent writes, flattening, lock and full disk."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import Codec
from sinks.archive.sink import ArchiveSink
from sinks.archive.store import IDENTITY_TABLE, Archive, ArchiveError, ArchiveLocked
from sinks.archive.tables import build_tables, metric_rows
from sinks.base import BatchPolicy
from tests.sinks.factories import at, eval_case, input_event, resolution, snapshot


def make_archive(path: Path, rates: dict[str, float] | None = None) -> Archive:
    return Archive(path, build_tables(Codec.load(), rates))


def make_sink(archive: Archive, rows: int = 1_000_000) -> ArchiveSink:
    return ArchiveSink(archive, archive.by_topic, BatchPolicy(max_records=rows, max_seconds=3600))


def fetch(archive: Archive, sql: str) -> list[tuple[Any, ...]]:
    with archive.connect(read_only=True) as con:
        return con.execute(sql).fetchall()


def test_rows_equal_records_and_a_rewrite_adds_nothing(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.duckdb", {"refunds": 30.0})
    first = input_event("i1", "c1", at(0, 10), features={"amount": 3.5, "items": 2.0})
    second = input_event("i2", "c2", at(1), channel=None, embedding=None, tokens=None)
    res = resolution("r1", "c1", at(0, 70), human_minutes=6.0)
    sink = make_sink(archive)
    for offset, record in enumerate([first, second, first]):  # a redelivered copy in-batch
        sink.add_record("inputs", record, "t.inputs", 0, offset)
    sink.add_record("resolutions", res, "t.resolutions", 1, 41)
    assert sink.flush() == {("t.inputs", 0): 3, ("t.resolutions", 1): 42}
    assert sink.written == {"inputs": 2, "resolutions": 1}

    rows = fetch(
        archive,
        "SELECT event_id, case_id, ts, channel, features, attributes, embedding, tokens "
        "FROM inputs ORDER BY event_id",
    )
    assert rows == [
        (
            "i1",
            "c1",
            at(0, 10),
            "email",
            {"amount": 3.5, "items": 2.0},
            {"tier": "pro"},
            [0.5, 0.25],
            42,
        ),
        ("i2", "c2", at(1), None, {"amount": 12.5}, {"tier": "pro"}, None, None),
    ]
    # The resolution keeps the hourly rate that priced its human minutes when archived.
    assert fetch(archive, "SELECT event_id, human_minutes, hourly_rate_usd FROM resolutions") == [
        ("r1", 6.0, 30.0)
    ]

    # A restart re-reads the same offsets: nothing new.
    again = make_sink(make_archive(tmp_path / "a.duckdb"))
    for offset, record in enumerate([first, second]):
        again.add_record("inputs", record, "t.inputs", 0, offset)
    again.flush()
    assert again.written == {"inputs": 0} and again.skipped == {"inputs": 2}
    assert fetch(archive, "SELECT count(*) FROM inputs") == [(2,)]


def test_eval_cases_keep_the_latest_version(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    sink.add_record("eval-cases", eval_case("e1", at(0), expected="refund"), "t.ec", 0, 0)
    sink.flush()
    sink.add_record("eval-cases", eval_case("e1", at(2), expected="deny"), "t.ec", 0, 1)
    sink.flush()
    assert fetch(archive, "SELECT eval_case_id, ts, expected FROM eval_cases") == [
        ("e1", at(2), "deny")
    ]


def test_a_metric_snapshot_becomes_one_row_per_number() -> None:
    drift = {"detected": True, "features": {"category": {"js": 0.3, "psi": 0.4, "drifted": True}}}
    rows = list(metric_rows(snapshot(at(0), drift=drift)))
    by_key = {(r["window"], r["metric"], r["labels"]): r["value"] for r in rows}
    # 12 numbers in the 5m window, their 12 deltas, unresolved_cases, and 4 drift rows.
    assert len(rows) == len(by_key) == 29
    assert by_key[("5m", "coverage", "{}")] == 0.5
    assert by_key[("5m", "quality", '{"suite":"historical"}')] is None
    assert by_key[("5m", "latency_seconds", '{"quantile":"p99"}')] == 30.0
    assert by_key[("5m", "coverage_wow_delta", "{}")] == -0.25
    assert by_key[("5m", "quality_wow_delta", '{"suite":"all"}')] == 0.0
    assert by_key[("", "unresolved_cases", "{}")] == 3.0
    assert by_key[("", "drift_detected", "{}")] == 1.0
    assert by_key[("", "drift_score", '{"feature":"category","method":"psi"}')] == 0.4
    assert by_key[("", "drift_feature_drifted", '{"feature":"category"}')] == 1.0


#: Holds the archive's lock once it is free (a sink lets go of it after a second idle).
TAKE_LOCK = textwrap.dedent(
    """
    import sys, time, duckdb
    while True:
        try:
            con = duckdb.connect(sys.argv[1])
            break
        except duckdb.IOException:
            time.sleep(0.1)
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


@contextlib.contextmanager
def locked_by_another_process(archive_file: Path) -> Iterator[None]:
    """The archive's lock held by another process meanwhile, as a reader's would be."""
    holder = subprocess.Popen(
        [sys.executable, "-c", TAKE_LOCK, str(archive_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.communicate("\n", timeout=30)


def test_a_locked_archive_keeps_the_batch_until_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    archive = make_archive(path)
    archive.initialise()
    with locked_by_another_process(path):
        sink = make_sink(archive)
        sink.add_record("inputs", input_event("i1", "c1", at(0)), "t.inputs", 0, 7)
        with pytest.raises(
            ArchiveLocked, match=r"archive .*a\.duckdb is locked by another process"
        ):
            sink.flush()
        assert sink.pending == 1  # nothing lost, nothing to commit yet
    assert sink.flush() == {("t.inputs", 0): 8}
    assert fetch(archive, "SELECT event_id FROM inputs") == [("i1",)]


FULL_DISK = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from pathlib import Path
    mount = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    from tests.sinks.test_store import make_archive, make_sink
    from tests.sinks.factories import at, input_event
    from sinks.archive.store import ArchiveFull
    archive = make_archive(mount / "a.duckdb")
    archive.initialise()
    filler = mount / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"],
                   capture_output=True)  # fails when the disk is full, as intended
    sink = make_sink(archive)
    for i in range(20_000):
        record = input_event(f"i{i}", f"c{i}", at(0, i), text="x" * 200)
        sink.add_record("inputs", record, "t.inputs", 0, i)
    out = {}
    try:
        sink.flush()
        out["first"] = "written"
    except ArchiveFull as exc:
        out["first"] = str(exc)
    out["pending"] = sink.pending
    filler.unlink()
    out["positions"] = {f"{t}:{p}": o for (t, p), o in sink.flush().items()}
    with archive.connect(read_only=True) as con:
        out["rows"] = con.execute("SELECT count(*) FROM inputs").fetchall()[0][0]
    print(json.dumps(out))
    """
)


def test_a_full_disk_keeps_the_batch_until_there_is_room(tmp_path: Path) -> None:
    """A real 24 MiB tmpfs, mounted in a private user and mount namespace, filled up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-c",
            FULL_DISK,
            str(mount),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["first"].startswith("archive ") and "disk" in out["first"], out["first"]
    assert out["pending"] == 20_000
    assert out["positions"] == {"t.inputs:0": 20_000}
    assert out["rows"] == 20_000


def test_a_batch_put_back_after_a_failed_write_stays_ahead_of_newer_records(
    tmp_path: Path,
) -> None:
    """The runner writes a taken batch while consuming goes on; when that write is pushed
    back, the batch returns ahead of what came since, so the newer version still wins."""
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    sink.add_record("eval-cases", eval_case("e1", at(0), expected="refund"), "t.ec", 0, 0)
    taken = sink.take()
    assert taken is not None and sink.pending == 0
    sink.add_record("eval-cases", eval_case("e1", at(2), expected="deny"), "t.ec", 0, 1)
    sink.add_record("inputs", input_event("i1", "c1", at(2)), "t.in", 3, 9)
    sink.restore(taken)
    assert sink.pending == 3
    assert sink.flush() == {("t.ec", 0): 2, ("t.in", 3): 10}
    assert fetch(archive, "SELECT eval_case_id, expected FROM eval_cases") == [("e1", "deny")]
    assert fetch(archive, "SELECT event_id FROM inputs") == [("i1",)]


def test_a_tombstone_deletes_the_row_in_its_place_among_the_batch(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.duckdb")
    sink = make_sink(archive)
    sink.add_record("eval-cases", eval_case("e1", at(0)), "t.ec", 0, 0)
    sink.add_record("eval-cases", eval_case("e2", at(0)), "t.ec", 0, 1)
    sink.flush()
    # In one batch: e1 deleted; e2 deleted then published again; e3 published then deleted.
    sink.delete_record("eval-cases", "e1", "t.ec", 0, 2)
    sink.delete_record("eval-cases", "e2", "t.ec", 0, 3)
    sink.add_record("eval-cases", eval_case("e2", at(1), expected="deny"), "t.ec", 0, 4)
    sink.add_record("eval-cases", eval_case("e3", at(1)), "t.ec", 0, 5)
    sink.delete_record("eval-cases", "e3", "t.ec", 0, 6)
    assert sink.flush() == {("t.ec", 0): 7}
    assert fetch(archive, "SELECT eval_case_id, expected FROM eval_cases") == [("e2", "deny")]


TRY_TO_READ = textwrap.dedent(
    """
    import duckdb, sys
    try:
        duckdb.connect(sys.argv[1], read_only=True).close()
        print("opened")
    except duckdb.Error:
        print("locked")
    """
)


def _reader_sees(path: Path) -> str:
    """What a reader in another process gets when it opens the archive now."""
    done = subprocess.run(
        [sys.executable, "-c", TRY_TO_READ, str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_batches_that_follow_each_other_keep_the_file_open_until_the_sink_is_idle(
    tmp_path: Path,
) -> None:
    """Closing the file checkpoints it, which costs as much as the inserts, so a backlog is
    written through one open file; a second without a write closes it for the readers."""
    path = tmp_path / "a.duckdb"
    archive = Archive(path, build_tables(Codec.load()), hold_seconds=60)
    sink = make_sink(archive)
    sink.add_record("inputs", input_event("i1", "c1", at(0)), "t.inputs", 0, 0)
    sink.flush()
    assert _reader_sees(path) == "locked"
    sink.add_record("inputs", input_event("i2", "c2", at(0)), "t.inputs", 0, 1)
    sink.flush()
    sink.idle()  # the last write ended less than a second ago
    assert _reader_sees(path) == "locked"
    time.sleep(1.1)
    sink.idle()
    assert _reader_sees(path) == "opened"
    assert fetch(archive, "SELECT event_id FROM inputs ORDER BY 1") == [("i1",), ("i2",)]


def test_an_archive_has_an_id_of_its_own_and_one_made_before_ids_keeps_none(
    tmp_path: Path,
) -> None:
    first = make_archive(tmp_path / "a.duckdb")
    made = first.initialise()
    assert re.fullmatch(r"[0-9a-f]{12}", made)
    assert make_archive(tmp_path / "a.duckdb").initialise() == made  # kept in the file
    assert make_archive(tmp_path / "b.duckdb").initialise() not in ("", made)
    schema_first = make_archive(tmp_path / "c.duckdb")
    schema_first.write({})  # a sink's first write makes the schema too
    (written,) = fetch(schema_first, f"SELECT id FROM {IDENTITY_TABLE}")
    assert schema_first.initialise() == written[0] not in ("", made)
    older = make_archive(tmp_path / "older.duckdb")
    older.initialise()
    with older.connect() as con:  # its tables, without an id: made before ids were
        con.execute(f"DROP TABLE {IDENTITY_TABLE}")
    assert older.initialise() == ""
    assert older.initialise() == ""  # and keeps it


def test_the_schema_is_made_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's start makes the id, the tables and the views in one transaction: a reader
    (a test's, ``loopline query``) found the file with its id table and no `inputs` (CI)."""
    archive = make_archive(tmp_path / "a.duckdb")
    broken = "CREATE OR REPLACE VIEW v_broken AS SELECT * FROM no_such_table"
    monkeypatch.setattr("sinks.archive.store.views_sql", lambda: broken)
    with pytest.raises(ArchiveError, match="no_such_table"):
        archive.initialise()  # fails after every table was made
    listed = "SELECT table_name FROM information_schema.tables"
    assert fetch(archive, listed) == []
    with pytest.raises(ArchiveError, match="no_such_table"):
        archive.write({})  # a first write that makes the schema: in its transaction
    assert fetch(archive, listed) == []
    monkeypatch.undo()
    made = archive.initialise()
    assert {IDENTITY_TABLE, "inputs", "resolutions"} <= {t for (t,) in fetch(archive, listed)}
    assert fetch(archive, f"SELECT id FROM {IDENTITY_TABLE}") == [(made,)]
