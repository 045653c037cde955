"""Archive benchmark: rows/s into DuckDB through the sink vs DuckDB's own Parquet bulk load.

Publishes N generated events once, then measures in the same run:
  (a) the archive sink (the same code as `loopline archive run`: consume, decode, batch,
      idempotent INSERT OR IGNORE into keyed tables, commit) until every event is a row;
  (b) baseline: DuckDB loading the very same rows from Parquet files (exported from (a)'s
      archive, untimed) into an empty archive with the same keyed tables, in one transaction;
and prints rows/s of each, the ratio a/b, and how the sink's time splits (decode and batching
vs. the DuckDB writes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from throughput import bench_settings, log, publish

from pipeline.codec import Codec
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from sinks.archive.sink import ArchiveSink
from sinks.archive.store import Archive
from sinks.archive.tables import build_tables
from sinks.base import BatchPolicy
from sinks.runner import SinkRunner


class TimedSink(ArchiveSink):
    """The archive sink, timing its DuckDB writes."""

    write_seconds = 0.0

    def write(self, batch):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        super().write(batch)
        self.write_seconds += time.perf_counter() - started


async def run_sink(settings: Settings, archive: Archive, events: int) -> tuple[TimedSink, float]:
    sink = TimedSink(archive, archive.by_topic, BatchPolicy(50_000, 5.0))
    runner = SinkRunner(settings, sink, SOURCE_TOPICS, f"{settings.app_id}-archive", report=log)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    started = time.monotonic()  # the sink starts from a cold consumer, as a restarted one does
    while runner.progress.consumed < events:
        await asyncio.sleep(0.05)
        if task.done():
            task.result()
    stop.set()
    await task  # the last batch is flushed and committed before run() returns
    return sink, time.monotonic() - started


def bulk_load(source: Archive, target: Archive, parquet_dir: Path) -> tuple[int, float]:
    names = ["inputs", "resolutions", "eval_results"]
    with source.connect(read_only=True) as con:
        for name in names:
            con.execute(f"COPY {name} TO '{parquet_dir / name}.parquet' (FORMAT parquet)")
    target.initialise()
    with target.connect() as con:
        started = time.perf_counter()
        con.execute("BEGIN TRANSACTION")
        for name in names:
            source_file = parquet_dir / f"{name}.parquet"
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM read_parquet('{source_file}')")
        con.execute("COMMIT")
        elapsed = time.perf_counter() - started
        rows = sum(con.execute(f"SELECT count(*) FROM {n}").fetchall()[0][0] for n in names)
    return rows, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--port", type=int, default=39092, help="local broker port")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loopline-bench-archive-"))
    with bench_settings(args.port) as settings:
        tables = build_tables(Codec.load())
        log(f"publishing {args.events:,} events to {settings.topic_prefix}* ...")
        asyncio.run(publish(settings, args.events))
        log("sink: consume, decode, batch, INSERT OR IGNORE, commit ...")
        archive = Archive(work / "sink.duckdb", tables, settings.archive_hold_seconds)
        sink, sink_seconds = asyncio.run(run_sink(settings, archive, args.events))
        rows = sum(sink.written.values())
        log(f"sink: {rows:,} rows in {sink_seconds:,.1f} s")
        log("baseline: DuckDB bulk load of the same rows from Parquet ...")
        (work / "parquet").mkdir()
        bulk_rows, bulk_seconds = bulk_load(
            archive, Archive(work / "bulk.duckdb", tables), work / "parquet"
        )
        assert bulk_rows == rows, (bulk_rows, rows)
        sink_rate, bulk_rate = rows / sink_seconds, rows / bulk_seconds
        print(
            json.dumps(
                {
                    "events": args.events,
                    "rows": rows,
                    "sink_rows_per_s": round(sink_rate),
                    "bulk_parquet_rows_per_s": round(bulk_rate),
                    "ratio": round(sink_rate / bulk_rate, 3),
                    "sink_seconds": round(sink_seconds, 2),
                    "sink_duckdb_write_share": round(sink.write_seconds / sink_seconds, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
