"""``loopline archive``, ``query``, ``report`` and ``gate``: the archive's command line edge."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import signal
import sys
import time
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.clitypes import FiniteFloat, OutputFile
from pipeline.settings import Settings

if TYPE_CHECKING:
    from sinks.archive.store import Archive

log = logging.getLogger(__name__)

_db_opt = click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The DuckDB archive (default: LOOPLINE_ARCHIVE_PATH, else <data_dir>/archive.duckdb).",
)


def _settings(ctx: click.Context, db: Path | None = None) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    if db is not None:
        from dataclasses import replace

        settings = replace(settings, archive_path=db)
    return settings


def open_archive(settings: Settings) -> Any:
    from pipeline.codec import Codec
    from sinks.archive.store import Archive
    from sinks.archive.tables import build_tables

    return Archive(
        settings.archive_file,
        build_tables(Codec.load(), settings.hourly_rates),
        settings.archive_hold_seconds,
    )


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group("archive")
def archive_group() -> None:
    """The DuckDB archive: run the sink, export Parquet."""


@archive_group.command("run")
@_db_opt
@click.option(
    "--demo-owned",
    is_flag=True,
    hidden=True,
    help="Run by 'loopline demo' on its own broker: the archive stays the demo's to empty.",
)
@click.pass_context
def archive_run(ctx: click.Context, db: Path | None, demo_owned: bool) -> None:
    """Archive every loopline topic into DuckDB until Ctrl-C (one sink per archive file)."""
    from pipeline.cli.common import on_kafka, require_free_port
    from pipeline.topics import CONTRACT_TOPICS, ensure_topics
    from sinks.archive.sink import ArchiveSink
    from sinks.archive.store import ArchiveError, demo_marker
    from sinks.base import BatchPolicy
    from sinks.metrics import SinkMetrics, serve
    from sinks.runner import SinkRunner

    settings = _settings(ctx, db)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(message)s")
    where = (settings.web_host, settings.archive_metrics_port)
    require_free_port(*where, "the archive's /metrics", "LOOPLINE_ARCHIVE_METRICS_PORT")
    archive = open_archive(settings)
    settings.archive_file.parent.mkdir(parents=True, exist_ok=True)
    policy = BatchPolicy(settings.archive_batch_rows, settings.archive_batch_seconds)
    sink = ArchiveSink(archive, archive.by_topic, policy)
    try:
        group = _consumer_group(settings, archive)
    except ArchiveError as exc:  # not a DuckDB file, unreadable, ...: said, no traceback
        raise _fail(exc) from None
    if not demo_owned:  # rows of another broker come: no demo may empty this archive now
        demo_marker(settings.archive_file).unlink(missing_ok=True)
    metrics = SinkMetrics("archive")
    runner = SinkRunner(settings, sink, CONTRACT_TOPICS, group, report=click.echo, metrics=metrics)

    async def main() -> None:
        await ensure_topics(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        click.echo(
            f"archiving {len(CONTRACT_TOPICS)} topics into {settings.archive_file}; metrics at "
            f"http://{where[0]}:{where[1]}/metrics"
        )
        await runner.run(stop)

    stop_serving = serve(metrics, *where)
    try:
        on_kafka(settings, main())
    except ArchiveError as exc:
        raise _fail(exc) from None
    finally:
        stop_serving()
    written = ", ".join(f"{n:,} {t}" for t, n in sorted(sink.written.items()))
    click.echo(
        f"archive stopped: {written or 'no new rows'}; {sum(sink.skipped.values()):,} "
        "copies already stored were skipped"
    )


def _consumer_group(settings: Settings, archive: Archive) -> str:
    """The archive's own consumer group, its id read once the file can be opened and its
    schema made (``Archive.initialise``): a locked or full archive is waited for, as its
    writes are."""
    from sinks.base import SinkBackpressure

    while True:
        try:
            archive_id = archive.initialise()
            break
        except SinkBackpressure as exc:
            click.echo(f"{exc}; retrying in {exc.retry_after:.0f} s", err=True)
            time.sleep(exc.retry_after)
    return f"{settings.app_id}-archive" + (f"-{archive_id}" if archive_id else "")


@archive_group.command("export-parquet")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--table", "tables", multiple=True, help="Tables to export (default: all).")
@_db_opt
@click.pass_context
def export_parquet(
    ctx: click.Context, out_dir: Path, tables: tuple[str, ...], db: Path | None
) -> None:
    """Write tables as Parquet under OUT_DIR/<table>/loop=<loop>/day=<YYYY-MM-DD>/."""
    from sinks.archive.export import export_parquet as export
    from sinks.archive.store import ArchiveError

    archive = open_archive(_settings(ctx, db))
    try:
        counts = export(archive, out_dir, tables or None)
    except (ArchiveError, ValueError) as exc:
        raise _fail(exc) from None
    for table, n in counts.items():
        click.echo(f"{table}: {n:,} rows -> {out_dir / table}")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


@click.command("query")
@click.argument("sql")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@_db_opt
@click.pass_context
def query(ctx: click.Context, sql: str, fmt: str, db: Path | None) -> None:
    """Run SQL read-only against the archive (tables and v_* views; see the README)."""
    from sinks.archive.store import ArchiveError

    archive = open_archive(_settings(ctx, db))
    try:
        with archive.connect(read_only=True, wait_seconds=15.0) as con:
            if fmt == "table":
                relation = con.sql(sql)
                if relation is None:
                    return
                relation.show(max_width=100_000, max_rows=10_000, max_col_width=80)
                return
            cursor = con.execute(sql)
            names = [d[0] for d in cursor.description or []]
            rows = cursor.fetchall()
    except ArchiveError as exc:
        raise _fail(exc) from None
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows([[_plain(v) for v in row] for row in rows])
    else:
        for row in rows:
            click.echo(json.dumps({n: _plain(v) for n, v in zip(names, row, strict=True)}))


@click.command("gate")
@click.option("--loop", "loop_name", required=True, help="The loop the release serves.")
@click.option("--release", required=True, help="The release to judge.")
@click.option("--min-pass-rate", type=FiniteFloat(0, 1), default=0.9, show_default=True)
@click.option(
    "--min-cases",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Distinct eval cases each suite needs.",
)
@_db_opt
@click.pass_context
def gate(
    ctx: click.Context,
    loop_name: str,
    release: str,
    min_pass_rate: float,
    min_cases: int,
    db: Path | None,
) -> None:
    """Exit 0 if RELEASE passes CURRENT and HISTORICAL evals, 1 if it fails, 2 if the archive
    holds too little evidence; prints why."""
    from sinks.archive.gate import (
        GATE_QUERY,
        KNOWN_QUERY,
        SuiteEvidence,
        evaluate_gate,
        unknown_hint,
    )
    from sinks.archive.store import ArchiveError

    archive = open_archive(_settings(ctx, db))
    try:
        with archive.connect(read_only=True, wait_seconds=15.0) as con:
            rows = con.execute(GATE_QUERY, [loop_name, release]).fetchall()
            known = [] if rows else con.execute(KNOWN_QUERY).fetchall()
    except ArchiveError as exc:
        click.echo(f"gate: cannot read the archive: {exc}", err=True)
        sys.exit(2)
    evidence = {
        row[0]: SuiteEvidence(row[0], int(row[1]), int(row[2]), int(row[3])) for row in rows
    }
    result = evaluate_gate(evidence, min_pass_rate, min_cases)
    click.echo(f"{result.verdict}: release {release} of loop {loop_name}")
    for reason in result.reasons:
        click.echo(f"  {reason}")
    hint = None if rows else unknown_hint(loop_name, release, [(a, b) for a, b in known])
    if hint is not None:
        click.echo(f"  {hint}")
    sys.exit(result.code)


@click.command("report")
@click.option("--week", required=True, help="ISO week, e.g. 2026-W47.")
@click.option("--loop", "loop_name", default=None, help="One loop (default: every loop).")
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    default=Path("report.html"),
    show_default=True,
)
@_db_opt
@click.pass_context
def report(
    ctx: click.Context, week: str, loop_name: str | None, output: Path, db: Path | None
) -> None:
    """Write the weekly scorecard as one self-contained HTML file."""
    from sinks.archive.report import UnknownLoop, parse_week, render_report
    from sinks.archive.store import ArchiveError

    try:
        parse_week(week)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--week") from None
    try:
        html = render_report(open_archive(_settings(ctx, db)), week, loop_name)
    except UnknownLoop as exc:
        raise click.BadParameter(str(exc), param_hint="--loop") from None
    except ArchiveError as exc:
        raise _fail(exc) from None
    output.write_text(html, encoding="utf-8")
    click.echo(f"wrote {output} ({len(html) / 1024:,.0f} KiB)")


def register(main: click.Group) -> None:
    for command in (archive_group, query, gate, report):
        main.add_command(command)
