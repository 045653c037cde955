"""The DuckDB archive file: schema, idempotent batch writes, read-only access, clear errors.

DuckDB lets one process write a database file at a time, and a reader in another process
cannot open it while a writer holds it. So the archive is opened only for the length of one
batch write (or one query) and closed again: analysts can query while the sink runs, and a
writer that finds the file locked gets ArchiveLocked and tries again later, losing nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sinks.archive.tables import Table
from sinks.archive.views import views_sql
from sinks.base import Deletion, Segments, SinkBackpressure

log = logging.getLogger(__name__)


#: After holding the file for ``hold_seconds``, the writer leaves it closed this long.
READER_GAP_SECONDS = 0.5
#: The table that names an archive (made and read by ``Archive.initialise``).
IDENTITY_TABLE = "archive_identity"


def demo_marker(archive_file: Path) -> Path:
    """Beside an archive while its rows are only demos' (``loopline demo`` empties it with its
    broker, whose alert state its episodes need); ``loopline archive run`` removes it."""
    return archive_file.with_name(archive_file.name + ".made-by-demo")


class ArchiveError(RuntimeError):
    """The archive cannot be used (not a DuckDB file, a query failed, ...)."""


class ArchiveLocked(SinkBackpressure):
    """Another process holds the DuckDB file; try again shortly."""


class ArchiveFull(SinkBackpressure):
    """The file system refused to grow the DuckDB file (disk full, quota, file size limit)."""


#: How the operating system's ENOSPC, EDQUOT and EFBIG read inside DuckDB's messages (a
#: generic "could not write" may be a permission problem, which retrying does not fix).
_FULL = ("no space left on device", "disk quota exceeded", "file too large")


def _classify(path: Path, exc: BaseException) -> BaseException:
    text = str(exc)
    lower = text.lower()
    if "could not set lock" in lower or "conflicting lock" in lower:
        holder = re.search(r"held in (.+?) \(PID (\d+)\)", text)
        detail = f" ({holder.group(1)}, PID {holder.group(2)})" if holder else ""
        return ArchiveLocked(f"archive {path} is locked by another process{detail}", 2.0)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ArchiveFull(f"archive {path}: the disk is full ({exc.strerror})", 10.0)
    if isinstance(exc, duckdb.Error) and any(marker in lower for marker in _FULL):
        return ArchiveFull(f"archive {path}: cannot write, the disk is full: {text}", 10.0)
    return ArchiveError(f"archive {path}: {text}")


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction: committed if the block ends, rolled back if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # already rolled back by a failed COMMIT
            con.execute("ROLLBACK")
        raise


def _identity(con: duckdb.DuckDBPyConnection, contract: Mapping[str, Table]) -> str:
    """The archive's id, made if it has none: a new one for a new file, "" for a file that has
    the contract's tables already (made before ids were)."""
    listed = "SELECT table_name FROM information_schema.tables WHERE table_type = ?"
    tables = {row[0] for row in con.execute(listed, ["BASE TABLE"]).fetchall()}
    if IDENTITY_TABLE in tables:
        row = con.execute(f"SELECT id FROM {IDENTITY_TABLE}").fetchone()
        return "" if row is None else str(row[0])
    made = "" if tables & set(contract) else uuid.uuid4().hex[:12]
    con.execute(f"CREATE TABLE {IDENTITY_TABLE} AS SELECT ? AS id", [made])
    return made


class Archive:
    """One DuckDB archive file and the tables it holds."""

    def __init__(self, path: Path, tables: Mapping[str, Table], hold_seconds: float = 0.0) -> None:
        """``tables`` by contract topic, as sinks.archive.tables.build_tables gives them.
        ``hold_seconds``: how long ``write`` may keep the file open for the next write."""
        self.path = Path(path)
        self.by_topic = dict(tables)
        self.tables = {t.name: t for t in tables.values()}
        self.hold_seconds = hold_seconds
        self._schema_ready = False
        self._held: duckdb.DuckDBPyConnection | None = None
        self._held_since = 0.0
        self._last_write = 0.0

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise ArchiveError(f"archive {self.path} does not exist (has the sink run yet?)")
        try:
            con = duckdb.connect(str(self.path), read_only=read_only)
            con.execute("SET TimeZone = 'UTC'")
            return con
        except (duckdb.Error, OSError) as exc:
            raise _classify(self.path, exc) from exc

    @contextmanager
    def connect(
        self, read_only: bool = False, wait_seconds: float = 0.0
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one unit of work; DuckDB errors become Archive* errors. A locked
        file is retried for up to ``wait_seconds`` (the sink holds it only while it flushes)."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                con = self._open(read_only)
                break
            except ArchiveLocked:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        try:
            yield con
        except (duckdb.Error, OSError) as exc:
            raise _classify(self.path, exc) from exc
        finally:
            try:
                con.close()
            except duckdb.Error as exc:  # the checkpoint at close can hit a full disk too
                log.warning("closing archive %s: %s", self.path, exc)

    def ensure_schema(self, con: duckdb.DuckDBPyConnection) -> str:
        """Create missing tables (the archive's id first: ``initialise``), add columns that
        newer schemas brought, (re)create views; returns the archive's id."""
        archive_id = _identity(con, self.tables)
        for table in self.tables.values():
            con.execute(table.ddl())
            have = {
                row[0]
                for row in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                    [table.name],
                ).fetchall()
            }
            for column in table.columns:
                if column.name not in have:
                    con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {column.sql}')
        con.execute(views_sql())
        return archive_id

    @contextmanager
    def _writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection for one write. With ``hold_seconds``, it stays open for the writes
        that follow within that time (closing checkpoints the file, which cost as much as the
        inserts when batches follow each other); ``release`` closes it when the writer is
        idle, so that readers get their turn."""
        if self._held is not None and time.monotonic() - self._held_since >= self.hold_seconds:
            self.release()
            time.sleep(READER_GAP_SECONDS)  # a reader waiting for the file gets its turn
        if self._held is None:
            self._held = self._open(read_only=False)
            self._held_since = time.monotonic()
        try:
            yield self._held
        except (duckdb.Error, OSError) as exc:
            self.release()
            raise _classify(self.path, exc) from exc
        except BaseException:
            self.release()
            raise
        self._last_write = time.monotonic()
        if not self.hold_seconds:
            self.release()

    def release(self, idle_for: float = 0.0) -> None:
        """Close the writer's connection (this checkpoints the file), if one is held and no
        write ended within the last ``idle_for`` seconds."""
        if self._held is None or time.monotonic() - self._last_write < idle_for:
            return
        con, self._held = self._held, None
        try:
            con.close()
        except duckdb.Error as exc:  # the checkpoint at close can hit a full disk too
            log.warning("closing archive %s: %s", self.path, exc)

    def initialise(self) -> str:
        """Make the schema, all of it in one transaction (a reader never sees the file with
        some tables and not others), and return this archive's id, made with the file and kept
        in it: the sink's consumer group is the archive's own (sinks.archive.cli), so that a
        new archive file reads every record Kafka still holds and two archive files each get
        all of them. An archive made before ids were gets "" (its sink keeps the group it had,
        and with it its committed offsets)."""
        with self.connect() as con, _transaction(con):
            archive_id = self.ensure_schema(con)
        self._schema_ready = True
        return archive_id

    def write(self, batch: Mapping[str, Segments]) -> dict[str, int]:
        """Insert every row and apply every deletion in one transaction, in batch order; rows
        whose key is already stored are skipped (replaced, for tables that keep the latest
        version). Returns the rows new per table."""
        steps = {name: self._steps(self.tables[name], segments) for name, segments in batch.items()}
        added: dict[str, int] = {}
        with self._writer() as con, _transaction(con):
            if not self._schema_ready:  # in the write's transaction: whole or not at all
                self.ensure_schema(con)
            for name, table_steps in steps.items():
                table = self.tables[name]
                added[name] = 0
                for step in table_steps:
                    if isinstance(step, Deletion):
                        self._delete(con, table, step)
                        continue
                    before = self._count(con, name)
                    verb = "INSERT OR REPLACE" if table.replace else "INSERT OR IGNORE"
                    con.register("loopline_batch", step)
                    con.execute(f"{verb} INTO {name} BY NAME SELECT * FROM loopline_batch")
                    con.unregister("loopline_batch")
                    added[name] += self._count(con, name) - before
        self._schema_ready = True
        return added

    def _steps(self, table: Table, segments: Segments) -> list[pa.Table | Deletion]:
        """Consecutive rows as one Arrow table each, with the deletions between them."""
        steps: list[pa.Table | Deletion] = []
        rows: list[list[Mapping[str, Any]] | pa.Table] = []
        for part in [*segments, Deletion([])]:
            if isinstance(part, Deletion):
                if rows:
                    steps.append(self._arrow(table, rows))
                    rows = []
                if part.keys:
                    steps.append(part)
            else:
                rows.append(part)
        return steps

    @staticmethod
    def _delete(con: duckdb.DuckDBPyConnection, table: Table, deletion: Deletion) -> None:
        (key,) = table.key
        con.register("loopline_deleted", pa.table({key: pa.array(deletion.keys, pa.string())}))
        con.execute(
            f'DELETE FROM {table.name} WHERE "{key}" IN (SELECT "{key}" FROM loopline_deleted)'
        )
        con.unregister("loopline_deleted")

    @staticmethod
    def _count(con: duckdb.DuckDBPyConnection, name: str) -> int:
        row = con.execute(f"SELECT count(*) FROM {name}").fetchall()
        return int(row[0][0])

    @staticmethod
    def _arrow(table: Table, segments: list[list[Mapping[str, Any]] | pa.Table]) -> pa.Table:
        """Rows as one Arrow table, one row per key (the last one wins, as on a compacted
        topic)."""
        schema = table.arrow_schema
        parts = [
            pa.Table.from_pylist(part, schema=schema)
            if isinstance(part, list)
            else part.select(schema.names).cast(schema)
            for part in segments
        ]
        return _last_per_key(pa.concat_tables(parts), table.key)


def _last_per_key(data: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """Drop every row whose key appears again later in ``data``."""
    if len(key) == 1:
        distinct = pc.count_distinct(data.column(key[0])).as_py()
    else:
        distinct = data.group_by(list(key)).aggregate([]).num_rows
    if distinct == data.num_rows:
        return data
    numbered = data.append_column("row_number", pa.array(np.arange(data.num_rows)))
    last = numbered.group_by(list(key), use_threads=False).aggregate([("row_number", "max")])
    return data.take(np.sort(last.column("row_number_max").to_numpy()))
