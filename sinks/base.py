"""The sink contract: ``add`` records, ``flush`` them in one durable write, then commit.

Batching is done here once for every sink: a sink only says how to write a whole batch
(``write``). ``flush`` returns the source positions that the batch covers, and the caller
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

#: (topic, partition) -> the next offset to consume, i.e. the offset to commit.
Positions = dict[tuple[str, int], int]


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


class BatchingSink(ABC):
    """Collects records per table with their source positions; ``write`` stores a batch."""

    def __init__(self, policy: BatchPolicy | None = None) -> None:
        self.policy = policy or BatchPolicy()
        self._rows: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        self._positions: Positions = {}
        self._count = 0
        self._opened = 0.0

    def add(
        self, table: str, row: Mapping[str, Any], topic: str, partition: int, offset: int
    ) -> None:
        """Buffer one row that came from ``topic[partition]@offset``."""
        if not self._count:
            self._opened = time.monotonic()
        self._rows[table].append(row)
        self._positions[(topic, partition)] = offset + 1
        self._count += 1

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

    def flush(self) -> Positions:
        """Write the batch durably; returns the positions to commit. On SinkBackpressure the
        batch is kept as it was, to be flushed again."""
        if not self._positions:
            return {}
        if self._count:
            self.write({table: rows for table, rows in self._rows.items() if rows})
        positions = self._positions
        self._rows = defaultdict(list)
        self._positions = {}
        self._count = 0
        return positions

    @abstractmethod
    def write(self, batch: Mapping[str, list[Mapping[str, Any]]]) -> None:
        """Store every row of ``batch`` (table -> rows) in one atomic, idempotent write."""
