"""The ``loopline`` command line: the edge where settings are read and side effects start.

``main`` reads the LOOPLINE_* settings once; each module here holds a group of its commands,
and the archive's commands come from sinks.archive.cli.
"""

from __future__ import annotations

import click

from pipeline.cli import evalset, kafka, services, traffic
from pipeline.settings import Settings, SettingsError
from sinks.archive.cli import register as register_archive_commands


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """loopline: telemetry for AI-native operational loops, on Kafka."""
    try:
        ctx.obj = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


for command in (
    kafka.kafka,
    kafka.topics,
    services.worker,
    services.review,
    services.demo,
    traffic.generate,
    traffic.replay_cmd,
    evalset.rules_group,
    evalset.evalset,
):
    main.add_command(command)
register_archive_commands(main)
