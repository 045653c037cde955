"""``loopline dlq show|redrive``: the dead letters, and publishing them again once their cause
is fixed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pipeline.cli.common import err, on_kafka, settings_of
from pipeline.clitypes import parse_iso
from pipeline.core import iso, to_ms
from pipeline.deadletter import REASONS
from pipeline.redrive import (
    LEFT_OUT,
    REDRIVABLE,
    RedriveError,
    Redriven,
    Selection,
    Shown,
    group_id,
    redrive,
    show,
)

#: How much of a dead letter's error ``show`` prints on its line.
ERROR_CHARS = 160


@click.group()
def dlq() -> None:
    """The dead-letter topic (loopline.dlq)."""


def _selected(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that select dead letters: --reason, --topic, --since, --until."""
    options = [
        click.option(
            "--reason",
            "reasons",
            multiple=True,
            type=click.Choice(REASONS),
            help="Only dead letters of this reason (repeatable).",
        ),
        click.option(
            "--topic",
            "topics",
            multiple=True,
            type=click.Choice(REDRIVABLE),
            help="Only dead letters of this source topic (logical name; repeatable).",
        ),
        click.option("--since", help="Only those dead-lettered at or after (ISO-8601)."),
        click.option("--until", help="Only those dead-lettered before (ISO-8601)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selection(
    reasons: tuple[str, ...],
    topics: tuple[str, ...],
    since: str | None,
    until: str | None,
    left_out: frozenset[str],
) -> Selection:
    def ms(value: str | None, flag: str) -> int | None:
        return None if value is None else int(parse_iso(value, flag).timestamp() * 1000)

    return Selection(
        frozenset(reasons), frozenset(topics), ms(since, "--since"), ms(until, "--until"), left_out
    )


@dlq.command("show")
@_selected
@click.option("--limit", type=click.IntRange(min=1), default=20, help="How many to list.")
@click.pass_context
def show_cmd(
    ctx: click.Context,
    reasons: tuple[str, ...],
    topics: tuple[str, ...],
    since: str | None,
    until: str | None,
    limit: int,
) -> None:
    """Count the dead letters by source topic and reason, and list the newest with their
    errors (the whole DLQ is read; nothing is committed)."""
    settings = settings_of(ctx)
    selection = _selection(reasons, topics, since, until, frozenset())
    try:
        shown = on_kafka(settings, show(settings, selection, limit, progress=err))
    except RedriveError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(describe_shown(shown, settings.topic("dlq")))


def describe_shown(shown: Shown, dlq: str) -> str:
    selected = shown.counts.total()
    lines = [f"{dlq}: {shown.read:,} dead letters, {selected:,} selected"]
    if shown.unreadable:
        lines[0] += f" ({shown.unreadable:,} unreadable as DeadLetter records)"
    if shown.deleted:
        lines.append(
            f"{shown.deleted:,} older dead letters were deleted by Kafka (the topic's "
            "retention) and are not counted here; the archive keeps those it read"
        )
    width = max((len(source) for source, _ in shown.counts), default=0)
    for (source, reason), count in sorted(shown.counts.items()):
        lines.append(f"  {source:<{width}}  {reason:<16} {count:>9,}")
    if shown.newest:
        lines.append(f"the newest {len(shown.newest):,}:")
    for letter in shown.newest:
        error = " ".join(str(letter["error"]).split())
        error = error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."
        where = f"{letter['source_topic']}[{letter['source_partition']}]@{letter['source_offset']}"
        lines.append(f"  {iso(to_ms(letter['ts']))}  {where}  {letter['reason']}: {error}")
    return "\n".join(lines)


@dlq.command("redrive")
@_selected
@click.option("--dry-run", is_flag=True, help="Say what would be published; publish nothing.")
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Read the DLQ from its beginning, not from where the last redrive ended (dead letters "
    "published before are published again: counted once within the dedupe horizon only).",
)
@click.pass_context
def redrive_cmd(
    ctx: click.Context,
    reasons: tuple[str, ...],
    topics: tuple[str, ...],
    since: str | None,
    until: str | None,
    dry_run: bool,
    from_beginning: bool,
) -> None:
    """Publish dead letters again to their topics, those that now pass a worker's checks
    (after a schema was added, a clock set right, a bug fixed); the others stay, counted by
    reason. Reads the DLQ from where the last redrive ended to its end. --reason: by default
    every reason but too_many_events, whose bytes fail the same way again."""
    settings = settings_of(ctx)
    selection = _selection(reasons, topics, since, until, LEFT_OUT)
    try:
        done = on_kafka(
            settings,
            redrive(
                settings,
                selection,
                dry_run=dry_run,
                from_beginning=from_beginning,
                progress=err,
            ),
        )
    except RedriveError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(describe(done, settings.topic("dlq"), group_id(settings)))


def describe(done: Redriven, dlq: str, group: str) -> str:
    """What a redrive read and did, a line each."""
    plan = done.plan
    read = ", ".join(
        f"[{p}] {done.first[p]}-{done.end[p] - 1}"
        for p in sorted(done.end)
        if done.end[p] > done.first[p]
    )
    lines = [
        f"read {done.read:,} dead letters of {dlq}"
        + (f" (offsets {read})" if read else ", none new since the last redrive, if any")
    ]
    if done.deleted:
        lines.append(
            f"{done.deleted:,} dead letters were deleted by Kafka (the topic's retention) "
            "before a redrive read them: they cannot be published again (the archive keeps "
            "those it read; a longer retention.ms on the topic gives more time to redrive)"
        )
    verb = "would publish" if done.dry_run else "published"
    by_topic = ", ".join(f"{t} {n:,}" for t, n in sorted(plan.published.items()))
    lines.append(f"{verb} {plan.published.total():,} again" + (f": {by_topic}" if by_topic else ""))
    if plan.late:
        lines.append(
            f"{plan.late:,} of them are events older than the allowed lateness: a worker counts "
            "them too_late, outside the windows (the archive keeps them)"
        )
    for reason, count in sorted(plan.failing.items()):
        first = plan.first_error[reason]
        lines.append(f"still failing, left in the DLQ: {reason} {count:,} (first: {first})")
    if plan.not_kept:
        lines.append(
            f"{len(plan.not_kept):,} without bytes in the DLQ (too large to copy, or a "
            f"tombstone), at their source: {', '.join(plan.not_kept[:5])}"
            + (" ..." if len(plan.not_kept) > 5 else "")
        )
    counted = [
        (plan.not_selected, "not selected (--reason, --topic, --since, --until)"),
        (plan.copies, "copies of a source position already taken"),
        (plan.unreadable, "unreadable as DeadLetter records"),
    ]
    lines += [f"{n:,} {what}" for n, what in counted if n]
    lines += [f"{n:,} of {topic}, not a topic to publish to" for topic, n in plan.foreign.items()]
    if done.dry_run:
        lines.append("dry run: nothing published, and the next redrive reads the same")
    elif done.end:
        lines.append(f"the next redrive goes on from here (consumer group {group})")
    return "\n".join(lines)
