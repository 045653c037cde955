"""``loopline generate`` (synthetic traffic) and ``loopline replay`` (the numbers of files)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.cli.common import core_config, err, on_kafka, settings_of
from pipeline.clitypes import FiniteFloat, OutputFile, parse_iso, positive_number
from pipeline.generator import EVENTS_PER_CASE, Scenario, TrafficGenerator
from pipeline.topics import ensure_topics
from pipeline.traffic import Limits, ending_now, publish_traffic, write_jsonl

FC = TypeVar("FC", bound=Callable[..., Any])


def _parse_start(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    return parse_iso(value, "--start")


def _seconds_after_start(flag: str, what: str) -> Callable[[FC], FC]:
    """One of the scenario's changes: when, in seconds of event time after --start."""
    return click.option(
        flag, type=FiniteFloat(min=0), default=None, help=f"Seconds after start when {what}."
    )


@click.command("generate")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Events to emit.")
@click.option(
    "--duration",
    type=positive_number(),
    default=None,
    help="Seconds to run (JSON Lines: seconds of event time).",
)
@click.option(
    "--rate",
    type=positive_number(),
    default=None,
    help="Events per second (default: as fast as possible).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--start",
    default=None,
    help="Event time of the first case (ISO-8601); default now, or, published unpaced with "
    "--count, so that the events end about now.",
)
@click.option(
    "--jsonl",
    type=OutputFile(),
    default=None,
    help="Write the replay format to this file ('-' for stdout) instead of Kafka.",
)
@_seconds_after_start("--drift-at", "category mix and order_value drift")
@_seconds_after_start("--cost-spike-at", "model cost jumps 5x")
@_seconds_after_start("--latency-regression-at", "SYSTEM latency grows 4x")
@_seconds_after_start("--quality-drop-at", "the --quality-drop-release ships (pass rate 0.6)")
@click.option("--quality-drop-release", default="2026.11.1", show_default=True)
@click.pass_context
def generate(
    ctx: click.Context,
    count: int | None,
    duration: float | None,
    rate: float | None,
    seed: int,
    start: str | None,
    jsonl: Path | None,
    drift_at: float | None,
    cost_spike_at: float | None,
    latency_regression_at: float | None,
    quality_drop_at: float | None,
    quality_drop_release: str,
) -> None:
    """Publish realistic synthetic traffic for several loops (deterministic for a seed)."""
    try:
        limits = Limits(count=count, duration=duration, rate=rate)
    except ValueError as exc:
        raise click.UsageError(f"{exc} (--count N or --duration S)") from None
    begin = _parse_start(start)
    scenario = Scenario(
        drift_at=drift_at,
        cost_spike_at=cost_spike_at,
        latency_regression_at=latency_regression_at,
        quality_drop_at=quality_drop_at,
        quality_drop_release=quality_drop_release,
    )
    cases_per_second = rate / EVENTS_PER_CASE if rate else 20.0
    if jsonl is None and rate is None and start is None and count is not None:
        begin = ending_now(begin, count, cases_per_second)
    elif jsonl is None and rate is None and start is None:
        err(
            "generate: unpaced, event time runs ahead of the clock, and the workers refuse "
            "events stamped more than LOOPLINE_MAX_AHEAD_SECONDS ahead (future_ts): "
            "give --rate, --count or an earlier --start"
        )
    events = TrafficGenerator(seed, begin, cases_per_second, scenario)
    by_topic: dict[str, Any]
    if jsonl is not None:
        target = sys.stdout if str(jsonl) == "-" else jsonl
        by_topic = write_jsonl(target, events, limits, int(begin.timestamp() * 1000), err)
    else:
        settings = settings_of(ctx)

        async def run() -> Any:
            await ensure_topics(settings)
            return await publish_traffic(settings, events, limits, err)

        by_topic = on_kafka(settings, run())
    err(
        f"generated {sum(by_topic.values()):,} events: {json.dumps(dict(sorted(by_topic.items())))}"
    )


@click.command("replay")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--as-of",
    default=None,
    help="Snapshot time (ISO-8601 or epoch ms); default: the end of the last event.",
)
@click.option(
    "--bucket-seconds",
    type=click.IntRange(min=1),
    default=None,
    help="Bucket size (default: LOOPLINE_BUCKET_SECONDS, 10).",
)
@click.option(
    "--alerts",
    type=OutputFile(),
    default=None,
    help="Write the Alert records the rules raised (JSON Lines; - for stdout).",
)
@click.pass_context
def replay_cmd(
    ctx: click.Context,
    files: tuple[Path, ...],
    as_of: str | None,
    bucket_seconds: int | None,
    alerts: Path | None,
) -> None:
    """Run the five-numbers processing over JSON Lines / Avro files and print the snapshot.

    A line that cannot be read or counted is reported on stderr with its file and line, the
    rest still counts, and the exit status is 2, as for `evalset import` (0 when every line
    was read).

    It uses the workers' configuration (LOOPLINE_HOURLY_RATES, SLAs, horizons), so replay and
    the live numbers agree; all but LOOPLINE_MAX_CASES_PER_PARTITION: replay is the reference,
    and holds every case until its horizon.
    """
    from pipeline.core import to_ms
    from pipeline.processor import Processor
    from pipeline.progress import Meter
    from pipeline.replay import replay

    settings = settings_of(ctx)
    if bucket_seconds is not None:
        settings = dataclasses.replace(settings, bucket_seconds=bucket_seconds)
    config = dataclasses.replace(core_config(settings), max_cases_per_partition=0)
    try:
        processor = Processor(config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bucket-seconds") from None
    try:
        as_of_ms = None if as_of is None else to_ms(int(as_of) if as_of.isdigit() else as_of)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--as-of") from None
    meter = Meter("replay", err)  # every 2 s on stderr: a backfill may take an hour
    report = replay(list(files), processor, reject=lambda m: err(f"rejected {m}"), meter=meter)
    click.echo(json.dumps(processor.snapshot(as_of_ms), indent=2))
    if alerts is not None:
        with click.open_file(str(alerts), "w") as out:
            for record in processor.alerts:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
    counts = ", ".join(f"{n:,} {s}" for s, n in sorted(report.statuses.items()))
    err(
        f"replay: {counts or 'no events'}; {len(report.rejected):,} rejected; "
        f"{processor.evaluations:,} alert evaluations, {len(processor.alerts):,} alert records"
    )
    if report.rejected:  # the snapshot stands for the rest; a script must still notice
        err(f"replay: exit status 2: {len(report.rejected):,} rejected (listed above)")
        ctx.exit(2)
