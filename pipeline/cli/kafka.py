"""``loopline kafka up|down|status|wipe`` (the local broker) and ``loopline topics``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from pipeline.cli.common import err, on_kafka, settings_of
from pipeline.kafka_local import BrokerError, LocalBroker
from pipeline.status import describe as describe_status
from pipeline.status import read_status
from pipeline.topics import ensure_topics, grow_source_topics


@click.group()
def kafka() -> None:
    """A real local Kafka broker (KRaft, single node) from Maven Central jars."""


def _broker(ctx: click.Context, port: int | None, home: Path | None) -> LocalBroker:
    settings = settings_of(ctx)
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
        status = broker.up(echo=err)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    if not was_up:
        broker.own(demo=False)  # a demo no longer empties it: its data may be yours now
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


@kafka.command("wipe")
@_port_opt
@_home_opt
@click.pass_context
def kafka_wipe(ctx: click.Context, port: int | None, home: Path | None) -> None:
    """Delete a stopped broker's topics, offsets and cluster id: it starts empty next time."""
    broker = _broker(ctx, port, home)
    try:
        broker.wipe()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"kafka data deleted ({broker.instance_dir}); the next 'up' starts empty")


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


@click.command("topics")
@click.option(
    "--partitions",
    type=click.IntRange(1, 100_000),
    default=None,
    help="The source topics' partition count: they are created with it, or given partitions "
    "up to it (all four in one request; Kafka cannot take any away). To scale out past the "
    "partition count, or to mend source topics grown one by one.",
)
@click.pass_context
def topics(ctx: click.Context, partitions: int | None) -> None:
    """Create loopline's topics (partition count: LOOPLINE_PARTITIONS, or --partitions) and
    give existing ones loopline's settings where they go by the broker's defaults."""
    settings = settings_of(ctx)
    if partitions is None:
        click.echo(f"topics: {on_kafka(settings, ensure_topics(settings)).describe()}")
        return
    grown = on_kafka(settings, grow_source_topics(settings, partitions))
    click.echo(f"topics: {grown.describe()}")
    if grown.before:
        click.echo(
            "cases open now may be split (their events mapped to other partitions: an input "
            "left unresolved, a resolution without its input, until they expire); running "
            "workers take the new partitions within 30 s"
            + (
                ""
                if partitions == settings.partitions
                else f"; set LOOPLINE_PARTITIONS={partitions} where loopline runs"
            )
        )


@click.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """The loopline topics (partitions, records) and this deployment's consumer groups (state,
    members, lag by topic), as Kafka sees them."""
    settings = settings_of(ctx)
    click.echo(describe_status(on_kafka(settings, read_status(settings))))
