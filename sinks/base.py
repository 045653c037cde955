"""The sink contract: ``add`` records, ``flush`` them in one durable write, then commit.

Batching is done here once for every sink: a sink only says how to write a whole batch
(``write``). Rows arrive one by one (``add``, as dicts) or many at once (``add_arrow``, an
Arrow table decoded straight from a batch of messages); a batch keeps both, per table, in the
order they arrived, so that "the last version wins" holds across them.

``flush`` returns the source positions that the batch covers, and the caller
commits those offsets only after ``flush`` returned, so a crash at any point loses nothing:
what was not durable is consumed again, and the sinks are idempotent on the record's id.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

#: (topic, partition) -> the next offset to consume, i.e. the offset to commit.
Positions = dict[tuple[str, int], int]


@dataclass
class Deletion:
    """Keys whose records were deleted (tombstones of a compacted topic), in their place among
    the rows of a batch."""

    keys: list[str]


#: One table's part of a batch, in arrival order: runs of dict rows, Arrow tables, deletions.
Segments = list[list[Mapping[str, Any]] | pa.Table | Deletion]


def segment_rows(segments: Segments) -> int:
    """The rows (not deletions) that ``segments`` hold."""
    return sum(
        len(s) if isinstance(s, list) else s.num_rows
        for s in segments
        if not isinstance(s, Deletion)
    )


class SinkBackpressure(Exception):
    """The destination cannot take the batch now (locked, disk full); nothing was written.

    The caller keeps the batch, stops consuming, waits ``retry_after`` seconds and flushes
    again; offsets stay uncommitted meanwhile, so even a crash during the wait loses nothing.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchPolicy:
    """Flush when a batch holds ``max_records`` records or is ``max_seconds`` old."""

    max_records: int = 50_000
    max_seconds: float = 5.0


@dataclass
class Batch:
    """A batch taken out of a sink to be written: its rows per table and the positions that
    become committable once it is durable."""

    segments: dict[str, Segments]
    positions: Positions
    count: int
    opened: float


class BatchingSink(ABC):
    """Collects records per table with their source positions; ``write`` stores a batch."""

    def __init__(self, policy: BatchPolicy | None = None) -> None:
        self.policy = policy or BatchPolicy()
        self._segments: dict[str, Segments] = defaultdict(list)
        self._positions: Positions = {}
        self._count = 0
        self._opened = 0.0

    def add(
        self, table: str, row: Mapping[str, Any], topic: str, partition: int, offset: int
    ) -> None:
        """Buffer one row that came from ``topic[partition]@offset``."""
        segments = self._segments[table]
        run = segments[-1] if segments else None
        if not isinstance(run, list):
            run = []
            segments.append(run)
        run.append(row)
        self._buffered(topic, partition, offset, 1)

    def add_arrow(
        self, table: str, rows: pa.Table, topic: str, partition: int, last_offset: int
    ) -> None:
        """Buffer the rows of many records of ``topic[partition]``, read up to ``last_offset``."""
        if not rows.num_rows:
            return
        self._segments[table].append(rows)
        self._buffered(topic, partition, last_offset, rows.num_rows)

    def delete(self, table: str, key: str, topic: str, partition: int, offset: int) -> None:
        """Buffer the deletion of ``table``'s record with this key (a tombstone read at
        ``topic[partition]@offset``), after the rows that came before it."""
        segments = self._segments[table]
        last = segments[-1] if segments else None
        if not isinstance(last, Deletion):
            last = Deletion([])
            segments.append(last)
        last.keys.append(key)
        self._buffered(topic, partition, offset, 1)

    def _buffered(self, topic: str, partition: int, last_offset: int, count: int) -> None:
        """Book ``count`` buffered items read up to ``topic[partition]@last_offset``."""
        if not self._count:
            self._opened = time.monotonic()
        self._positions[(topic, partition)] = last_offset + 1
        self._count += count

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """Mark a source record as handled without a row (it will be committed with the batch)."""
        if not self._count and not self._positions:
            self._opened = time.monotonic()
        self._positions[(topic, partition)] = offset + 1

    @property
    def pending(self) -> int:
        return self._count

    def due(self) -> bool:
        """True when the batch should be flushed now."""
        if not self._positions:
            return False
        return (
            self._count >= self.policy.max_records
            or time.monotonic() - self._opened >= self.policy.max_seconds
        )

    def drop(self, partitions: set[tuple[str, int]]) -> None:
        """Forget the positions of revoked partitions; their records are consumed again by the
        new owner (rows already buffered stay: writing them twice is harmless)."""
        for key in partitions:
            self._positions.pop(key, None)

    def take(self) -> Batch | None:
        """Detach the pending batch (None when there is nothing to commit); new records start
        a new one, so the taken batch can be written while consuming goes on."""
        if not self._positions:
            return None
        segments = {table: parts for table, parts in self._segments.items() if parts}
        batch = Batch(segments, self._positions, self._count, self._opened)
        self._segments = defaultdict(list)
        self._positions = {}
        self._count = 0
        return batch

    def restore(self, batch: Batch) -> None:
        """Put back a taken batch that could not be written, ahead of what came since."""
        for table, parts in batch.segments.items():
            self._segments[table][:0] = parts
        self._positions = {**batch.positions, **self._positions}
        self._opened = min(self._opened, batch.opened) if self._count else batch.opened
        self._count += batch.count

    def write_batch(self, batch: Batch) -> Positions:
        """Write a taken batch durably; returns the positions to commit."""
        if batch.count:
            self.write(batch.segments)
        return batch.positions

    def flush(self) -> Positions:
        """Write the pending batch durably; returns the positions to commit. On
        SinkBackpressure the batch is kept as it was, to be flushed again."""
        batch = self.take()
        if batch is None:
            return {}
        try:
            return self.write_batch(batch)
        except SinkBackpressure:
            self.restore(batch)
            raise

    def idle(self) -> None:
        """Nothing is due and nothing is being written: a sink may release what it holds
        between writes once it has been idle a while (the archive's open file)."""
        return None

    def close(self) -> None:
        """The runner stops: release everything held between writes."""
        return None

    @abstractmethod
    def write(self, batch: Mapping[str, Segments]) -> None:
        """Store every row of ``batch`` (table -> its segments) in one atomic, idempotent
        write."""
