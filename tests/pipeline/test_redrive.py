"""Dead letters published again (pipeline.redrive): which, and on the real broker, with a worker
that counts them."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from pipeline.codec import Codec, CodecError
from pipeline.deadletter import REASONS, dead_letter
from pipeline.generator import TrafficGenerator
from pipeline.publisher import Publisher
from pipeline.redrive import REDRIVE_HEADER, Selection, plan
from pipeline.settings import Settings
from pipeline.topics import ensure_topics, key_of
from tests.conftest import (
    WorkerProcess,
    consume_messages,
    delete_first_records,
    settings_env,
    wait_for,
)
from tests.pipeline.test_cli import loopline

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
CODEC = Codec.load()
UNKNOWN = b"\xc3\x01" + bytes(8) + b"\x00"  # single-object encoding of a schema nobody knows


def _inputs(count: int, start: datetime) -> list[dict[str, Any]]:
    events = (record for topic, record in TrafficGenerator(5, start) if topic == "inputs")
    return [next(events) for _ in range(count)]


def _letter(
    offset: int, value: bytes | None, reason: str, topic: str = "loopline.inputs", **kw: Any
) -> dict[str, Any]:
    return dead_letter(
        topic=topic,
        partition=0,
        offset=offset,
        key=b"case-1",
        value=value,
        reason=reason,
        error="as it failed then",
        now=kw.get("now", NOW - timedelta(minutes=5)),
    )


def test_only_what_now_passes_is_published_each_source_position_once() -> None:
    settings = Settings()
    good = [CODEC.encode("InputEvent", record) for record in _inputs(2, NOW)]
    ahead = _inputs(1, NOW + timedelta(hours=2))[0]  # still 2 h ahead of now: future_ts again
    past = CODEC.encode("InputEvent", _inputs(1, NOW - timedelta(hours=2))[0])
    letters: list[tuple[str, dict[str, Any] | CodecError]] = [
        ("dlq[0]@0", _letter(10, good[0], "unknown_schema")),  # its schema was added since
        ("dlq[0]@1", _letter(10, good[0], "processing_error")),  # the sink's, same position
        ("dlq[0]@2", _letter(11, good[1], "future_ts")),  # its producer's clock set right
        ("dlq[0]@3", _letter(12, UNKNOWN, "unknown_schema")),  # still unknown
        ("dlq[0]@4", _letter(13, CODEC.encode("InputEvent", ahead), "future_ts")),
        ("dlq[0]@5", _letter(14, good[1], "too_many_events")),  # left out unless named
        ("dlq[0]@6", _letter(15, None, "bad_value")),  # too large to copy: still at its source
        ("dlq[0]@7", _letter(16, good[0], "bad_value", topic="elsewhere.inputs")),
        ("dlq[0]@8", CodecError("bad_header", "not a DeadLetter")),
        ("dlq[0]@9", _letter(17, past, "processing_error")),  # 2 h old: a worker's too_late
    ]
    done = plan(letters, CODEC, settings, Selection(), NOW_MS)
    assert done.publish == [
        ("loopline.inputs", b"case-1", good[0], "dlq[0]@0"),
        ("loopline.inputs", b"case-1", good[1], "dlq[0]@2"),
        ("loopline.inputs", b"case-1", past, "dlq[0]@9"),
    ]
    assert dict(done.published) == {"inputs": 3}
    assert done.late == 1  # over the allowed lateness (1 h) before now
    assert dict(done.failing) == {"unknown_schema": 1, "future_ts": 1}
    assert done.first_error["unknown_schema"] == (
        "unknown writer schema fingerprint 0000000000000000"
    )
    assert done.first_error["future_ts"].startswith("ts 2026-11-29T14:00:00")
    assert (done.copies, done.not_selected, done.unreadable) == (1, 1, 1)
    assert done.not_kept == ["loopline.inputs[0]@15"]
    assert dict(done.foreign) == {"elsewhere.inputs": 1}

    # named, the left-out reason is taken (and only it); by time, the window is [since, until)
    named = plan(
        letters, CODEC, settings, Selection(reasons=frozenset({"too_many_events"})), NOW_MS
    )
    assert [p[3] for p in named.publish] == ["dlq[0]@5"]
    later = Selection(since_ms=NOW_MS - 5 * 60_000 + 1)
    assert plan(letters, CODEC, settings, later, NOW_MS).publish == []
    window = Selection(since_ms=NOW_MS - 5 * 60_000, until_ms=NOW_MS - 5 * 60_000 + 1)
    assert len(plan(letters, CODEC, settings, window, NOW_MS).publish) == 3
    assert (
        plan(letters, CODEC, settings, Selection(topics=frozenset({"alerts"})), NOW_MS).publish
        == []
    )


def test_every_reason_of_the_dead_letter_schema_can_be_chosen() -> None:
    doc = {f["name"]: f.get("doc", "") for f in CODEC.schema("DeadLetter")["fields"]}["reason"]
    listed = doc.split(":", 1)[1].replace(" ", "").split(",")
    assert set(REASONS) == {*listed, "bad_key"}  # bad_key: the archive sink's, of tombstones


@pytest.mark.broker
def test_dead_letters_of_a_wrong_clock_are_counted_once_redriven(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    """A producer whose clock ran 3 h behind stamped its messages so: the worker refused the
    events as future_ts (their ts ahead of their messages' time). Its clock set right, a
    redrive publishes them again with a message time of now, and the worker counts them."""
    settings = make_settings()
    inputs = _inputs(8, datetime.now(UTC) - timedelta(minutes=10))
    asyncio.run(_publish(settings, inputs[:5], behind_ms=0))
    asyncio.run(_publish(settings, inputs[5:], behind_ms=3 * 3600_000))
    asyncio.run(_publish_raw(settings, [UNKNOWN]))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs", "dead_letter") == 4, 60, "4 dead letters")
    assert worker.processed("inputs") == 5
    env = settings_env(settings)

    shown = loopline("dlq", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    dlq, inputs_topic = settings.topic("dlq"), settings.topic("inputs")
    lines = shown.stdout.splitlines()
    assert lines[:4] == [
        f"{dlq}: 4 dead letters, 4 selected",
        f"  {inputs_topic}  future_ts                3",
        f"  {inputs_topic}  unknown_schema           1",
        "the newest 4:",
    ]
    assert sorted(line.split("  ")[3].split(":")[0] for line in lines[4:]) == [
        *["future_ts"] * 3,
        "unknown_schema",
    ]
    assert all(re.search(rf"  {re.escape(inputs_topic)}\[\d\]@\d+  ", ln) for ln in lines[4:])
    narrowed = loopline("dlq", "show", "--reason", "future_ts", "--limit", "2", env=env)
    lines = narrowed.stdout.splitlines()
    assert lines[:3] == [
        f"{dlq}: 4 dead letters, 3 selected",
        f"  {inputs_topic}  future_ts                3",
        "the newest 2:",
    ]
    assert [line.split("  ")[3].split(":")[0] for line in lines[3:]] == ["future_ts"] * 2

    dry = loopline("dlq", "redrive", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"read 4 dead letters of {settings.topic('dlq')} (offsets ")
    assert lines[1] == "would publish 3 again: inputs 3"
    assert lines[2] == (
        "still failing, left in the DLQ: unknown_schema 1 (first: unknown writer schema "
        "fingerprint 0000000000000000)"
    )
    assert lines[-1] == "dry run: nothing published, and the next redrive reads the same"

    done = loopline("dlq", "redrive", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "published 3 again: inputs 3"
    wait_for(lambda: worker.processed("inputs") == 8, 60, "the 3 redriven inputs counted")
    time.sleep(2)  # nothing more: the still-failing one was not published again
    assert worker.processed("inputs", "dead_letter") == 4
    assert worker.processed("inputs") == 8

    # published with their keys (so to the partitions of their cases) and the header
    messages = asyncio.run(consume_messages(settings, "inputs", 12))  # 5 + 3 + 1 + 3 again
    redriven = [m for m in messages if m.headers]
    originals = {m.value: m for m in messages if not m.headers}
    assert len(redriven) == 3
    for message in redriven:
        original = originals[message.value]
        assert (message.key, message.partition) == (original.key, original.partition)
        ((name, where),) = message.headers
        assert name == REDRIVE_HEADER
        assert re.fullmatch(rf"{re.escape(settings.topic('dlq'))}\[\d\]@\d+", where.decode())

    again = loopline("dlq", "redrive", env=env)
    assert again.stdout.splitlines()[:2] == [
        f"read 0 dead letters of {settings.topic('dlq')}, none new since the last redrive, if any",
        "published 0 again",
    ]
    # `loopline status` sees the same: 12 input messages, the DLQ's 4, the workers caught up
    # and the redrive group at the DLQ's end
    said = loopline("status", env=env)
    assert said.returncode == 0, said.stderr
    lines = said.stdout.splitlines()
    assert re.search(rf"^  {re.escape(inputs_topic)} +4 +12 +0$", said.stdout, re.M), lines
    assert re.search(rf"^  {re.escape(dlq)} +4 +4 +0$", said.stdout, re.M), lines
    group = settings.app_id
    workers = lines.index(f"  {group} (workers): Stable, 1 member")
    redrives = lines.index(f"  {group}-dlq-redrive (dlq redrive): Empty, 0 members")
    assert re.fullmatch(rf"    {re.escape(dlq)} +lag +0", lines[redrives + 1]), lines
    # groups by name: the workers' (the app id) before the redrive's
    (inputs_lag,) = [line for line in lines[workers + 1 : redrives] if f" {inputs_topic} " in line]
    assert re.fullmatch(rf"    {re.escape(inputs_topic)} +lag +0", inputs_lag), lines

    replayed = loopline("dlq", "redrive", "--from-beginning", "--dry-run", env=env)
    assert replayed.stdout.splitlines()[1] == "would publish 3 again: inputs 3"


async def _publish(settings: Settings, records: list[dict[str, Any]], behind_ms: int) -> None:
    """Publish with the messages' time ``behind_ms`` before now, as a clock behind does."""
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for record in records:
            key, value = key_of("inputs", record), CODEC.encode("InputEvent", record)
            stamp = int(time.time() * 1000) - behind_ms
            await producer.send_and_wait(
                settings.topic("inputs"), value, key=key, timestamp_ms=stamp
            )
    finally:
        await producer.stop()


async def _publish_raw(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.topic("inputs"), value, key=b"raw")
    finally:
        await producer.stop()


@pytest.mark.broker
def test_dead_letters_kafka_deleted_before_a_redrive_read_them_are_said(
    make_settings: Callable[..., Settings],
) -> None:
    """Dead letters go by the DLQ's retention: those deleted before any redrive read them
    cannot be published again, and nothing said so (the redrive's consumer moved on to the
    log's start). Now the redrive and show count them."""
    settings = make_settings()
    asyncio.run(ensure_topics(settings))
    env = settings_env(settings)
    letters = [_letter(n, UNKNOWN, "unknown_schema") for n in range(10)]

    async def publish(records: list[dict[str, Any]]) -> None:
        async with Publisher(settings) as publisher:
            await publisher.publish_many("dlq", records)

    asyncio.run(publish(letters[:5]))
    first = loopline("dlq", "redrive", "--dry-run", env=env)  # reads, commits nothing
    assert first.returncode == 0 and "deleted by Kafka" not in first.stdout, first.stdout
    done = loopline("dlq", "redrive", env=env)  # the group has read 5
    assert done.returncode == 0 and "deleted by Kafka" not in done.stdout, done.stdout
    asyncio.run(publish(letters[5:8]))  # 3 no redrive reads before Kafka deletes all 8
    everything = dict.fromkeys(range(settings.partitions), 1.0)
    dlq = settings.topic("dlq")
    assert sum(asyncio.run(delete_first_records(settings, dlq, everything, False)).values()) == 8
    asyncio.run(publish(letters[8:]))

    again = loopline("dlq", "redrive", "--dry-run", env=env)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0].startswith(f"read 2 dead letters of {dlq} (offsets "), lines
    assert lines[1] == (
        "3 dead letters were deleted by Kafka (the topic's retention) before a redrive read "
        "them: they cannot be published again (the archive keeps those it read; a longer "
        "retention.ms on the topic gives more time to redrive)"
    )
    said = loopline("status", env=env)  # 2 kept, 8 deleted
    assert said.returncode == 0, said.stderr
    assert re.search(rf"^  {re.escape(dlq)} +\d+ +2 +8$", said.stdout, re.M), said.stdout
    shown = loopline("dlq", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [
        f"{dlq}: 2 dead letters, 2 selected",
        "8 older dead letters were deleted by Kafka (the topic's retention) and are not "
        "counted here; the archive keeps those it read",
    ]
