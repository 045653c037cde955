"""``loopline dlq redrive``: dead letters published again once their cause is fixed."""

from __future__ import annotations

import click

from pipeline.cli.common import err, on_kafka, settings_of
from pipeline.clitypes import parse_iso
from pipeline.deadletter import REASONS
from pipeline.redrive import (
    LEFT_OUT,
    REDRIVABLE,
    RedriveError,
    Redriven,
    Selection,
    group_id,
    redrive,
)


@click.group()
def dlq() -> None:
    """The dead-letter topic (loopline.dlq)."""


@dlq.command("redrive")
@click.option(
    "--reason",
    "reasons",
    multiple=True,
    type=click.Choice(REASONS),
    help="Only dead letters of this reason (repeatable). Default: every reason but "
    f"{', '.join(sorted(LEFT_OUT))}, whose bytes fail the same way again.",
)
@click.option(
    "--topic",
    "topics",
    multiple=True,
    type=click.Choice(REDRIVABLE),
    help="Only dead letters of this source topic (logical name; repeatable).",
)
@click.option("--since", default=None, help="Only those dead-lettered at or after (ISO-8601).")
@click.option("--until", default=None, help="Only those dead-lettered before (ISO-8601).")
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
    reason. Reads the DLQ from where the last redrive ended to its end."""
    settings = settings_of(ctx)
    selection = Selection(
        frozenset(reasons),
        frozenset(topics),
        None if since is None else int(parse_iso(since, "--since").timestamp() * 1000),
        None if until is None else int(parse_iso(until, "--until").timestamp() * 1000),
    )
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
