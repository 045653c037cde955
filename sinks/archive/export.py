"""Parquet export for data lakes: each table partitioned by loop and UTC day (Hive layout)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sinks.archive.store import Archive


def export_parquet(
    archive: Archive, out_dir: Path, tables: Iterable[str] | None = None
) -> dict[str, int]:
    """Write ``out_dir/<table>/loop=<loop>/day=<YYYY-MM-DD>/*.parquet`` (dead_letters, which
    have no loop, by day only); returns the rows written per table."""
    names = list(tables) if tables is not None else sorted(archive.tables)
    unknown = [n for n in names if n not in archive.tables]
    if unknown:
        raise ValueError(
            f"unknown table(s) {', '.join(unknown)}; one of {', '.join(sorted(archive.tables))}"
        )
    counts: dict[str, int] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with archive.connect(read_only=True, wait_seconds=15.0) as con:
        for name in names:
            has_loop = any(c.name == "loop" for c in archive.tables[name].columns)
            partitions = "loop, day" if has_loop else "day"
            target = str(out_dir / name).replace("'", "''")
            (count,) = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0]
            counts[name] = int(count)
            if not count:
                continue
            con.execute(
                f"COPY (SELECT *, CAST(ts AT TIME ZONE 'UTC' AS DATE) AS day FROM {name}) "
                f"TO '{target}' (FORMAT parquet, PARTITION_BY ({partitions}), "
                "OVERWRITE_OR_IGNORE true)"
            )
    return counts
