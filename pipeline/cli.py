"""The ``loopline`` command line: the edge where settings are read and side effects start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from aiokafka.errors import KafkaError

from pipeline.core import CoreConfig
from pipeline.generator import EVENTS_PER_CASE, Scenario, TrafficGenerator
from pipeline.kafka_local import BrokerError, LocalBroker
from pipeline.rules import RulesError
from pipeline.settings import Settings, SettingsError
from pipeline.topics import ensure_topics
from pipeline.traffic import Limits, publish_traffic, write_jsonl


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """loopline: telemetry for AI-native operational loops, on Kafka."""
    try:
        ctx.obj = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def kafka() -> None:
    """A real local Kafka broker (KRaft, single node) from Maven Central jars."""


def _broker(ctx: click.Context, port: int | None, home: Path | None) -> LocalBroker:
    settings = _settings(ctx)
    return LocalBroker(home or settings.kafka_home, port or settings.bootstrap_port)


_port_opt = click.option(
    "--port",
    type=click.IntRange(1, 65534),
    default=None,
    help="Broker port (controller uses port+1). Default: from "
    "LOOPLINE_BOOTSTRAP_SERVERS, else 9092.",
)
_home_opt = click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=None,
    help="Cache folder for jars and broker data (LOOPLINE_KAFKA_HOME).",
)


@kafka.command("up")
@_port_opt
@_home_opt
@click.option(
    "--secure",
    is_flag=True,
    help="Also listen with SASL (SCRAM-SHA-512, PLAIN) over TLS on port+2 (a certificate and a "
    "client password are made for the broker). Choose it when the broker is first started.",
)
@click.pass_context
def kafka_up(ctx: click.Context, port: int | None, home: Path | None, secure: bool) -> None:
    """Start the broker (no-op when it is up) and wait until it answers."""
    broker = dataclasses.replace(_broker(ctx, port, home), secure=secure)
    was_up = broker.status().running
    try:
        status = broker.up(echo=_err)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    prefix = "already up: " if was_up else ""
    click.echo(prefix + status.describe())
    if secure and broker.secure_env_path.exists():
        click.echo(
            f"SASL_SSL listener on {broker.host}:{broker.secure_port}; the client settings "
            f"(password included) are in {broker.secure_env_path}: "
            f"set -a; . {broker.secure_env_path}; set +a"
        )


@kafka.command("down")
@_port_opt
@_home_opt
@click.pass_context
def kafka_down(ctx: click.Context, port: int | None, home: Path | None) -> None:
    """Stop the broker cleanly (no-op when it is down)."""
    broker = _broker(ctx, port, home)
    stopped = broker.down()
    click.echo(
        f"kafka stopped ({broker.bootstrap})"
        if stopped
        else f"kafka was not running ({broker.bootstrap})"
    )


@kafka.command("status")
@_port_opt
@_home_opt
@click.pass_context
def kafka_status(ctx: click.Context, port: int | None, home: Path | None) -> None:
    """Say whether the broker is up and where its log is; exit 3 when it is down."""
    status = _broker(ctx, port, home).status()
    click.echo(status.describe())
    if not status.running:
        ctx.exit(3)


@main.command("topics")
@click.pass_context
def topics(ctx: click.Context) -> None:
    """Create loopline's topics (partition count: LOOPLINE_PARTITIONS)."""
    settings = _settings(ctx)
    try:
        created = asyncio.run(ensure_topics(settings))
    except KafkaError as exc:
        raise click.ClickException(_kafka_failure(settings, exc)) from None
    click.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@main.command("worker")
@click.option(
    "--web-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of /metrics (LOOPLINE_WEB_PORT, default 6066).",
)
@click.pass_context
def worker(ctx: click.Context, web_port: int | None) -> None:
    """Run a stream-processing worker until Ctrl-C / SIGTERM."""
    from pipeline.worker import run_worker

    settings = _settings(ctx)
    if web_port is not None:
        settings = dataclasses.replace(settings, web_port=web_port)
    _core_config(settings)  # a bad rules file stops the worker here, with the reason
    try:
        run_worker(settings)
    except KafkaError as exc:
        raise click.ClickException(_kafka_failure(settings, exc)) from None


def _kafka_failure(settings: Settings, exc: Exception) -> str:
    """Why Kafka refused, without the password."""
    who = f" as {settings.sasl_username}" if settings.sasl_username else ""
    return (
        f"cannot use Kafka at {settings.bootstrap_servers} "
        f"({settings.security_protocol}{who}): {type(exc).__name__}: {exc}"
    )


def _core_config(settings: Settings) -> CoreConfig:
    try:
        return settings.core_config()
    except RulesError as exc:
        raise click.ClickException(f"LOOPLINE_RULES: {exc}") from None


def _parse_start(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise click.BadParameter("give a timezone, e.g. 2026-11-25T12:00:00Z", param_hint="--start")
    return parsed


@main.command("generate")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Events to emit.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to run (JSON Lines: seconds of event time).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Events per second (default: as fast as possible).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--start", default=None, help="Event time of the first case (ISO-8601); default now.")
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the replay format to this file ('-' for stdout) instead of Kafka.",
)
@click.option(
    "--drift-at",
    type=float,
    default=None,
    help="Seconds after start when category mix and order_value drift.",
)
@click.option(
    "--cost-spike-at",
    type=float,
    default=None,
    help="Seconds after start when model cost jumps 5x.",
)
@click.option(
    "--latency-regression-at",
    type=float,
    default=None,
    help="Seconds after start when SYSTEM latency grows 4x.",
)
@click.option(
    "--quality-drop-at",
    type=float,
    default=None,
    help="Seconds after start when the --quality-drop-release ships (pass rate 0.6).",
)
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
    events = TrafficGenerator(seed, begin, cases_per_second, scenario)
    by_topic: dict[str, Any]
    if jsonl is not None:
        target = sys.stdout if str(jsonl) == "-" else jsonl
        by_topic = write_jsonl(target, events, limits, int(begin.timestamp() * 1000), _err)
    else:
        settings = _settings(ctx)

        async def run() -> Any:
            await ensure_topics(settings)
            return await publish_traffic(settings, events, limits, _err)

        by_topic = asyncio.run(run())
    _err(
        f"generated {sum(by_topic.values()):,} events: {json.dumps(dict(sorted(by_topic.items())))}"
    )


@main.command("replay")
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
    type=click.Path(dir_okay=False, path_type=Path),
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

    It uses the workers' configuration (LOOPLINE_HOURLY_RATES, SLAs, horizons), so replay and
    the live numbers agree.
    """
    from pipeline.core import to_ms
    from pipeline.processor import Processor
    from pipeline.replay import replay

    settings = _settings(ctx)
    if bucket_seconds is not None:
        settings = dataclasses.replace(settings, bucket_seconds=bucket_seconds)
    config = _core_config(settings)
    try:
        processor = Processor(config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bucket-seconds") from None
    try:
        as_of_ms = None if as_of is None else to_ms(int(as_of) if as_of.isdigit() else as_of)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--as-of") from None
    report = replay(list(files), processor, reject=lambda m: _err(f"rejected {m}"))
    click.echo(json.dumps(processor.snapshot(as_of_ms), indent=2))
    if alerts is not None:
        with click.open_file(str(alerts), "w") as out:
            for record in processor.alerts:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
    counts = ", ".join(f"{n:,} {s}" for s, n in sorted(report.statuses.items()))
    _err(
        f"replay: {counts or 'no events'}; {len(report.rejected):,} rejected; "
        f"{processor.evaluations:,} alert evaluations, {len(processor.alerts):,} alert records"
    )


def _output_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--output/-o FILE``: where a command writes (default: stdout)."""
    return click.option(
        "--output",
        "-o",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


@main.group("rules")
def rules_group() -> None:
    """loopline's alert rules (LOOPLINE_RULES) for other tools."""


@rules_group.command("prometheus")
@_output_option("Write here (e.g. deploy/prometheus/rules.yml); default: stdout.")
@click.pass_context
def rules_prometheus(ctx: click.Context, output: Path | None) -> None:
    """Write Prometheus alerting rules with the thresholds of LOOPLINE_RULES.

    Loops with their own [loops.<loop>] values get alerts of their own; run it again after
    changing the rules file, so Prometheus and the workers alert on the same numbers.
    """
    from pipeline.promrules import render

    settings = _settings(ctx)
    text = render(
        _core_config(settings).rules,
        f"LOOPLINE_RULES={settings.rules}" if settings.rules else "loopline's default rules",
    )
    with click.open_file(str(output or "-"), "w") as out:
        out.write(text)
    if output is not None:
        _err(f"rules prometheus: wrote {output}")


@main.group("evalset")
def evalset() -> None:
    """The eval set on loopline.eval-cases (the drift baseline): import, export, delete, age."""


@evalset.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def evalset_import(ctx: click.Context, file: Path) -> None:
    """Publish the eval cases of a JSON Lines or Parquet FILE (one EvalCase a row).

    Every row is validated; a bad row is reported with its line (or row) number and the good
    rows are still imported. Missing suite / origin / ts default to CURRENT / IMPORTED / now.
    Exits with status 2 when some rows were rejected.
    """
    from pipeline.evalset import import_eval_cases

    settings = _settings(ctx)

    async def run() -> Any:
        await ensure_topics(settings)
        return await import_eval_cases(settings, file, _err)

    report = asyncio.run(run())
    _err(
        f"evalset import: {report.imported:,} eval cases imported, "
        f"{len(report.rejected):,} rejected"
    )
    if report.rejected:
        ctx.exit(2)


@evalset.command("export")
@_output_option("Write here (.parquet for Parquet, else JSON Lines); default: stdout.")
@click.pass_context
def evalset_export(ctx: click.Context, output: Path | None) -> None:
    """Write the current eval set (the latest record of every eval_case_id) out."""
    from pipeline.evalset import read_eval_set, write_eval_set

    cases = asyncio.run(read_eval_set(_settings(ctx)))
    if output is not None and output.suffix == ".parquet":
        write_eval_set(cases, output, parquet=True)
    else:
        with click.open_file(str(output or "-"), "w") as out:
            write_eval_set(cases, out, parquet=False)
    _err(f"evalset export: {len(cases):,} eval cases")


@evalset.command("delete")
@click.argument("ids", nargs=-1)
@click.option(
    "--file",
    "id_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also delete the eval case ids in this file (one per line).",
)
@click.pass_context
def evalset_delete(ctx: click.Context, ids: tuple[str, ...], id_file: Path | None) -> None:
    """Delete eval cases by id (a tombstone each on the compacted topic).

    The workers drop them from their loops' baselines and the archive drops their rows. Ids not
    in the eval set are reported and the command exits with status 2; the others are deleted.
    """
    from pipeline.evalset import delete_eval_cases

    wanted = [*ids, *(id_file.read_text().split() if id_file is not None else [])]
    if not wanted:
        raise click.UsageError("name the eval case ids to delete (arguments or --file)")
    deleted, missing = asyncio.run(delete_eval_cases(_settings(ctx), wanted))
    for eval_case_id in missing:
        _err(f"evalset delete: {eval_case_id}: not in the eval set")
    _err(f"evalset delete: {len(deleted):,} eval cases deleted, {len(missing):,} not found")
    if missing:
        ctx.exit(2)


@evalset.command("age")
@click.option(
    "--current-days",
    type=click.IntRange(min=1),
    default=None,
    help="Age limit of the CURRENT suite (default: eval_set.current_days of LOOPLINE_RULES, 30).",
)
@click.pass_context
def evalset_age(ctx: click.Context, current_days: int | None) -> None:
    """Move CURRENT eval cases older than the limit to the HISTORICAL suite (run it daily)."""
    from pipeline.evalset import age_eval_set

    settings = _settings(ctx)
    days = current_days or _core_config(settings).rules.current_days
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    moved = asyncio.run(age_eval_set(settings, now_ms, days))
    _err(f"evalset age: {moved:,} eval cases older than {days} days moved to HISTORICAL")


@main.command("review")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="LOOPLINE_REVIEW_PORT (6070)."
)
@click.pass_context
def review(ctx: click.Context, port: int | None) -> None:
    """The reviewers' page: the eval-candidate queue, decisions to loopline.reviews.

    Needs LOOPLINE_REVIEW_TOKEN (the login token; never printed). Sessions are signed with
    LOOPLINE_REVIEW_SECRET, or a random key per process (then a restart logs everyone out).
    """
    import uvicorn

    from pipeline.review.web import create_review_app

    settings = _settings(ctx)
    try:
        app = create_review_app(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(ensure_topics(settings))
    chosen = port or settings.review_port
    _err(f"review page on http://{settings.web_host}:{chosen}/ (log in with the review token)")
    uvicorn.run(app, host=settings.web_host, port=chosen, log_level=settings.log_level)


@main.command("demo")
@click.option(
    "--duration", type=float, default=30.0, show_default=True, help="Seconds of generated traffic."
)
@click.option("--rate", type=float, default=500.0, show_default=True, help="Events per second.")
@click.option("--keep-kafka", is_flag=True, help="Leave the local broker running afterwards.")
@click.option(
    "--stay", is_flag=True, help="After the traffic, keep everything running until Ctrl-C."
)
@click.pass_context
def demo(ctx: click.Context, duration: float, rate: float, keep_kafka: bool, stay: bool) -> None:
    """The local demo: Kafka, topics, a worker, the archive sink, the review page and the
    generator (drift onset and cost spike half-way); Ctrl-C stops it all cleanly."""
    from pipeline.demo import run_demo

    try:
        run_demo(
            _settings(ctx),
            duration=duration,
            rate=rate,
            keep_kafka=keep_kafka,
            echo=_err,
            stay=stay,
        )
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None


def _register_archive_commands() -> None:
    from sinks.archive.cli import register

    register(main)


_register_archive_commands()

if __name__ == "__main__":
    main()
