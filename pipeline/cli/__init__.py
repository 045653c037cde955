"""The ``loopline`` command line: the edge where settings are read and side effects start.

``main`` reads the LOOPLINE_* settings once; each module here holds a group of its commands,
and the archive's commands come from sinks.archive.cli.
"""

from __future__ import annotations

import sys

import click

# faust's own import reads its event-loop and data-dir options (-L/--loop, --datadir) out of
# sys.argv, so `loopline gate --loop refunds` had it import a module named "refunds" and fail.
# It is imported here first, before any command module does, with the arguments hidden from it.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import faust  # noqa: F401
finally:
    sys.argv = _argv

from pipeline import kafka_outage  # noqa: E402
from pipeline.cli import dlq, evalset, kafka, services, traffic  # noqa: E402
from pipeline.settings import Settings, SettingsError  # noqa: E402
from sinks.archive.cli import register as register_archive_commands  # noqa: E402


@click.group()
@click.version_option(package_name="loopline", prog_name="loopline")
@click.pass_context
def main(ctx: click.Context) -> None:
    """loopline: telemetry for AI-native operational loops, on Kafka."""
    kafka_outage.install()
    try:
        ctx.obj = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    for warning in Settings.unknown_variables():
        click.echo(f"warning: {warning}", err=True)


for command in (
    kafka.kafka,
    kafka.topics,
    kafka.status,
    services.worker,
    services.review,
    services.demo,
    traffic.generate,
    traffic.replay_cmd,
    evalset.rules_group,
    evalset.evalset,
    dlq.dlq,
):
    main.add_command(command)
register_archive_commands(main)
