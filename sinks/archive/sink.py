"""The archive sink: loopline records in, idempotent DuckDB batch writes out."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sinks.archive.store import Archive
from sinks.archive.tables import Table
from sinks.base import BatchingSink, BatchPolicy, Segments, segment_rows

log = logging.getLogger(__name__)


def _repeats_a_key(column: pa.ChunkedArray) -> bool:
    """Whether some map of the column holds one key twice (valid Avro binary, not a dict)."""
    for chunk in column.chunks:
        # The keys of each map as a list array: a map's own .keys ignore a slice, and compute
        # functions on a map array may abort the process (pyarrow's list_parent_indices does).
        keys = pa.ListArray.from_arrays(chunk.offsets, chunk.keys)
        pairs = pa.table({"row": pc.list_parent_indices(keys), "key": pc.list_flatten(keys)})
        if pairs.group_by(["row", "key"]).aggregate([]).num_rows != pairs.num_rows:
            return True
    return False


class ArchiveSink(BatchingSink):
    """Turns each record into the rows of its table and writes whole batches to the archive."""

    def __init__(
        self, archive: Archive, tables: Mapping[str, Table], policy: BatchPolicy | None = None
    ) -> None:
        super().__init__(policy)
        self.archive = archive
        self.tables = dict(tables)
        self.written: Counter[str] = Counter()  # rows new to the archive, per table
        self.skipped: Counter[str] = Counter()  # rows already there (redelivered copies)

    def add_record(
        self, topic: str, record: Mapping[str, Any], source: str, partition: int, offset: int
    ) -> None:
        """Buffer a decoded record of the logical ``topic`` read at ``source[partition]@offset``."""
        table = self.tables[topic]
        for row in table.rows_of(record):
            self.add(table.name, row, source, partition, offset)
        self.advance(source, partition, offset)  # also when a record yields no row

    def delete_record(self, topic: str, key: str, source: str, partition: int, offset: int) -> None:
        """A tombstone of a compacted ``topic``: the row with this key goes."""
        table = self.tables[topic]
        if len(table.key) != 1:
            raise ValueError(f"{table.name}: rows are not deleted by one key")
        self.delete(table.name, key, source, partition, offset)

    def idle(self) -> None:
        # Batches that follow each other keep the file open (a backlog); a second without a
        # write closes it, so readers can open the file between the writes of live traffic.
        self.archive.release(idle_for=1.0)

    def close(self) -> None:
        self.archive.release()

    def columnar(self, topic: str) -> bool:
        return self.tables[topic].columnar

    def add_records(
        self, topic: str, records: pa.Table, source: str, partition: int, last_offset: int
    ) -> None:
        """Buffer many decoded records of ``topic`` (an Arrow table of the record's fields)
        read from ``source[partition]`` up to ``last_offset``. Raises ValueError for a map
        holding a key twice, which DuckDB refuses (the whole batch's write would fail, again
        after every restart); the caller then adds the records one by one, as the codec
        decodes them (the last value of a key)."""
        for name, column in zip(records.column_names, records.columns, strict=True):
            if pa.types.is_map(column.type) and _repeats_a_key(column):
                raise ValueError(f"{topic}.{name}: a map holds a key twice")
        table = self.tables[topic]
        self.add_arrow(table.name, table.rows_of_batch(records), source, partition, last_offset)

    def write(self, batch: Mapping[str, Segments]) -> None:
        added = self.archive.write(batch)
        for table, segments in batch.items():
            self.written[table] += added[table]
            self.skipped[table] += segment_rows(segments) - added[table]
        size = sum(segment_rows(s) for s in batch.values())
        log.info("archived a batch of %d rows (%d new)", size, sum(added.values()))
