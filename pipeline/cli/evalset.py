"""``loopline evalset`` (the eval set on loopline.eval-cases) and ``loopline rules``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import core_config, err, on_kafka, output_option, settings_of
from pipeline.topics import ensure_topics


@click.group("rules")
def rules_group() -> None:
    """loopline's alert rules (LOOPLINE_RULES) for other tools."""


@rules_group.command("prometheus")
@output_option("Write here (e.g. deploy/prometheus/rules.yml); default: stdout.")
@click.pass_context
def rules_prometheus(ctx: click.Context, output: Path | None) -> None:
    """Write Prometheus alerting rules with the thresholds of LOOPLINE_RULES.

    Loops with their own [loops.<loop>] values get alerts of their own; run it again after
    changing the rules file, so Prometheus and the workers alert on the same numbers.
    """
    from pipeline.promrules import render

    settings = settings_of(ctx)
    text = render(
        core_config(settings).rules,
        f"LOOPLINE_RULES={settings.rules}" if settings.rules else "loopline's default rules",
    )
    with click.open_file(str(output or "-"), "w") as out:
        out.write(text)
    if output is not None:
        err(f"rules prometheus: wrote {output}")


@click.group("evalset")
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

    settings = settings_of(ctx)

    async def run() -> Any:
        await ensure_topics(settings)
        return await import_eval_cases(settings, file, err)

    report = on_kafka(settings, run())
    err(
        f"evalset import: {report.imported:,} eval cases imported, "
        f"{len(report.rejected):,} rejected"
    )
    if report.rejected:
        ctx.exit(2)


@evalset.command("export")
@output_option("Write here (.parquet for Parquet, else JSON Lines); default: stdout.")
@click.pass_context
def evalset_export(ctx: click.Context, output: Path | None) -> None:
    """Write the current eval set (the latest record of every eval_case_id) out."""
    from pipeline.evalset import read_eval_set, write_eval_set

    settings = settings_of(ctx)
    cases = on_kafka(settings, read_eval_set(settings))
    if output is not None and output.suffix == ".parquet":
        write_eval_set(cases, output, parquet=True)
    else:
        with click.open_file(str(output or "-"), "w") as out:
            write_eval_set(cases, out, parquet=False)
    err(f"evalset export: {len(cases):,} eval cases")


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
    settings = settings_of(ctx)
    deleted, missing = on_kafka(settings, delete_eval_cases(settings, wanted))
    for eval_case_id in missing:
        err(f"evalset delete: {eval_case_id}: not in the eval set")
    err(f"evalset delete: {len(deleted):,} eval cases deleted, {len(missing):,} not found")
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

    settings = settings_of(ctx)
    days = current_days or core_config(settings).rules.current_days
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    moved = on_kafka(settings, age_eval_set(settings, now_ms, days))
    err(f"evalset age: {moved:,} eval cases older than {days} days moved to HISTORICAL")
