"""The archive sink against the real broker: rows equal the events, once, through redelivery,
restart, SIGKILL mid-batch and a locked archive file."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from pipeline.demo import fetch_metrics
from pipeline.generator import TrafficGenerator
from pipeline.metrics import parse_exposition, sample_sum
from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from sinks.archive.cli import open_archive
from tests.conftest import (
    CliProcess,
    consume,
    delete_first_records,
    free_port,
    process_factory,
    publish_in_transactions,
    read_topic,
    wait_for,
)
from tests.sinks import factories as f
from tests.sinks.test_store import locked_by_another_process

pytestmark = pytest.mark.broker
START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def archive_process(settings: Settings, log_path: Path) -> CliProcess:
    """A ``loopline archive run`` subprocess writing to the settings' archive file."""
    return CliProcess(settings, log_path, ("archive", "run"))


@pytest.fixture
def start_archive(tmp_path: Path) -> Iterator[Callable[[Settings], CliProcess]]:
    yield from process_factory(tmp_path, "archive", archive_process, signal.SIGKILL)


def _events(count: int, skip: int = 0) -> list[tuple[str, dict[str, Any]]]:
    generator = iter(TrafficGenerator(5, START))
    return [next(generator) for _ in range(skip + count)][skip:]


def _others() -> list[tuple[str, dict[str, Any]]]:
    """One or two records of every topic the workers and the review page produce."""
    return [
        ("eval-cases", f.eval_case("e1", f.at(7))),
        ("eval-cases", f.eval_case("e2", f.at(7))),
        ("alerts", f.alert("FIRING", f.at(7, 60), f.at(7, 60))),
        ("alerts", f.alert("RESOLVED", f.at(7, 600), f.at(7, 60))),
        ("eval-candidates", f.candidate("k1", f.at(7))),
        ("reviews", f.review("k1", "ACCEPTED", f.at(7, 30), eval_case_id="e1")),
        ("metrics", f.snapshot(f.at(7))),
    ]


async def _publish(settings: Settings, events: list[tuple[str, dict[str, Any]]]) -> None:
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        for topic, record in events:
            await publisher.publish(topic, record)


async def _publish_raw(
    settings: Settings, topic: str, value: bytes | None, key: bytes | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(topic), value, key=key)
    finally:
        await producer.stop()


def _query(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    with open_archive(settings).connect(read_only=True, wait_seconds=30) as con:
        rows: list[tuple[Any, ...]] = con.execute(sql).fetchall()
        return rows


def _count(settings: Settings, table: str) -> int:
    if not settings.archive_file.exists():
        return 0
    return int(_query(settings, f"SELECT count(*) FROM {table}")[0][0])


def _ids(events: list[tuple[str, dict[str, Any]]], topic: str) -> set[str]:
    return {r["event_id"] for t, r in events if t == topic}


async def _lag_while_open(settings: Settings, events: list[tuple[str, dict[str, Any]]]) -> float:
    """The sink's lag once it counts the events of a transaction left open (then aborted)."""
    encoder = Publisher(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id="left-open"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for topic, record in events:
            key, value = encoder.encode(topic, record)
            await producer.send(settings.topic(topic), value=value, key=key)
        await producer.flush()
        for _ in range(300):
            lag = await asyncio.to_thread(
                _sink_metric, settings, "loopline_sink_consumer_lag_messages"
            )
            if lag == len(events):
                break
            await asyncio.sleep(0.1)
        await producer.abort_transaction()
        return lag
    finally:
        await producer.stop()


def _sink_metric(settings: Settings, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{settings.archive_metrics_port}/metrics"
    return sample_sum(parse_exposition(fetch_metrics(url) or ""), name, sink="archive", **labels)


def _wait_rows(settings: Settings, expected: dict[str, int], process: CliProcess) -> None:
    wait_for(
        lambda: all(_count(settings, t) >= n for t, n in expected.items()),
        120,
        f"archive rows {expected}; log:\n{process.log()[-2000:]}",
        every=1.0,
    )


def test_rows_equal_the_events_once_through_redelivery_and_restart(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=1500, archive_batch_seconds=0.5
    )
    first, second = _events(4000), _events(2000, skip=4000)
    asyncio.run(_publish(settings, first + _others()))
    asyncio.run(_publish_raw(settings, "alerts", b"not avro"))
    asyncio.run(_publish_raw(settings, "eval-cases", None, key=b"e2"))  # deletes e2
    archive = start_archive(settings)
    expected = {
        "inputs": len(_ids(first, "inputs")),
        "resolutions": len(_ids(first, "resolutions")),
        "eval_results": len(_ids(first, "eval-results")),
    }
    _wait_rows(settings, {**expected, "metric_snapshots": 25, "dead_letters": 1}, archive)

    # Its /metrics: what it read, wrote and dead-lettered, and no lag once all is read.
    inputs_topic = settings.topic("inputs")
    read = len([t for t, _ in first if t == "inputs"])
    wait_for(
        lambda: (
            _sink_metric(settings, "loopline_sink_records_total", topic=inputs_topic) == read
            and _sink_metric(settings, "loopline_sink_consumer_lag_messages") == 0
        ),
        30,
        "the archive's /metrics to show every input read and no lag",
    )
    assert _sink_metric(settings, "loopline_sink_dead_letters_total", reason="bad_header") == 1
    assert (
        _sink_metric(
            settings,
            "loopline_sink_dead_letters_total",
            topic=settings.topic("alerts"),
            reason="bad_header",
        )
        == 1
    )
    assert _sink_metric(settings, "loopline_sink_batches_total") >= 1
    last_write = _sink_metric(settings, "loopline_sink_last_write_timestamp_seconds")
    assert 0 < time.time() - last_write < 120

    # Redelivered copies of everything, then new events; the sink restarts in between.
    asyncio.run(_publish(settings, first[:1500]))
    assert archive.stop() == 0, archive.log()[-2000:]
    asyncio.run(_publish(settings, second + first[1500:]))
    archive = start_archive(settings)
    both = first + second
    expected = {
        t.replace("-", "_"): len(_ids(both, t)) for t in ("inputs", "resolutions", "eval-results")
    }
    _wait_rows(settings, expected, archive)
    assert archive.stop() == 0, archive.log_tail()

    for topic in ("inputs", "resolutions", "eval-results"):
        table = topic.replace("-", "_")
        assert _query(settings, f"SELECT count(*), count(DISTINCT event_id) FROM {table}") == [
            (len(_ids(both, topic)), len(_ids(both, topic)))
        ]
    # Field by field, the archived inputs are the published ones.
    published = sorted(
        (r["event_id"], r["case_id"], r["loop"], r["ts"], r["category"], r["tokens"])
        for t, r in both
        if t == "inputs"
    )
    archived = _query(
        settings,
        "SELECT event_id, case_id, loop, epoch_ms(ts), category, tokens "
        "FROM inputs ORDER BY event_id",
    )
    assert archived == published
    assert _query(settings, "SELECT rule, state FROM alerts ORDER BY ts") == [
        ("quality_floor", "FIRING"),
        ("quality_floor", "RESOLVED"),
    ]
    assert _query(settings, "SELECT candidate_id, decision FROM reviews") == [("k1", "ACCEPTED")]
    assert _query(settings, "SELECT eval_case_id FROM eval_cases") == [("e1",)]  # e2 deleted
    assert _query(settings, "SELECT source_topic, reason FROM dead_letters") == [
        (settings.topic("alerts"), "bad_header")
    ]
    # The bad alert also went to the DLQ topic (no worker validates alerts).
    dlq = asyncio.run(consume(settings, "dlq", 1))
    assert [r["reason"] for _, r in dlq] == ["bad_header"]


def test_a_sink_killed_mid_batch_loses_nothing_once_restarted(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=500, archive_batch_seconds=0.2
    )
    events = _events(30_000)
    asyncio.run(_publish(settings, events))
    tables = {"inputs": "inputs", "resolutions": "resolutions", "eval_results": "eval-results"}
    expected = {table: len(_ids(events, topic)) for table, topic in tables.items()}
    archive = start_archive(settings)
    # Kill right after the first batch is durable (the log says so; polling the archive itself
    # would take its lock and slow the sink down).
    wait_for(lambda: "archived a batch" in archive.log(), 120, "a first batch", every=0.02)
    archive.stop(signal.SIGKILL)
    at_kill = sum(_count(settings, table) for table in tables)
    assert 0 < at_kill < sum(expected.values()), "the kill should land while the sink writes"

    archive = start_archive(settings)
    _wait_rows(settings, expected, archive)
    assert archive.stop() == 0, archive.log_tail()
    for table, n in expected.items():
        assert _query(settings, f"SELECT count(*), count(DISTINCT event_id) FROM {table}") == [
            (n, n)
        ]


def test_records_deleted_before_the_sink_read_them_are_said(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    """The sink was down while Kafka deleted inputs it had not read (retention): it goes on from
    the earliest offset left and says, per partition, which offsets it will never archive."""
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=500, archive_batch_seconds=0.2
    )
    read, unread, later = _events(1000), _events(1000, skip=1000), _events(1000, skip=2000)
    asyncio.run(_publish(settings, read))
    archive = start_archive(settings)
    _wait_rows(settings, {"inputs": len(_ids(read, "inputs"))}, archive)
    assert archive.stop() == 0, archive.log_tail()
    asyncio.run(_publish(settings, unread))
    inputs = settings.topic("inputs")
    everything = dict.fromkeys(range(settings.partitions), 1.0)
    asyncio.run(delete_first_records(settings, inputs, everything, compacted=False))
    asyncio.run(_publish(settings, later))

    archive = start_archive(settings)
    kept = read + later
    _wait_rows(settings, {"inputs": len(_ids(kept, "inputs"))}, archive)
    # the resolutions of all three parts are archived, the inputs of two
    _wait_rows(settings, {"resolutions": len(_ids(read + unread + later, "resolutions"))}, archive)
    assert archive.stop() == 0, archive.log_tail()
    said = re.findall(
        rf"{re.escape(inputs)}\[\d\]: (\d+) records \(offsets \d+-\d+\) were deleted by Kafka "
        r"before this process read them",
        archive.log(),
    )
    assert sum(map(int, said)) == len(_ids(unread, "inputs")) > 0, archive.log()[-2000:]
    assert _query(settings, "SELECT count(*) FROM inputs") == [(len(_ids(kept, "inputs")),)]


def test_each_archive_file_gets_every_record_kafka_holds(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    """Each archive file has a consumer group of its own: two archive files written at once
    each get every record (one group would split the partitions between them), and an archive
    file made anew reads every record Kafka still holds (one group would start it where the
    old file's sink had committed, with none of the history)."""
    first = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=500, archive_batch_seconds=0.2
    )
    second = dataclasses.replace(
        first, archive_path=tmp_path / "b.duckdb", archive_metrics_port=free_port()
    )
    events = _events(1000)
    asyncio.run(_publish(first, events))
    every = {t.replace("-", "_"): len(_ids(events, t)) for t in ("inputs", "resolutions")}
    archives = [start_archive(first), start_archive(second)]
    for settings, archive in zip((first, second), archives, strict=True):
        _wait_rows(settings, every, archive)
        assert archive.stop() == 0, archive.log_tail()
        assert _query(settings, "SELECT count(*) FROM inputs") == [(every["inputs"],)]
    first.archive_file.unlink()  # made anew, as after `make clean`
    archive = start_archive(first)
    _wait_rows(first, every, archive)
    assert archive.stop() == 0, archive.log_tail()
    assert _query(first, "SELECT count(*) FROM resolutions") == [(every["resolutions"],)]


def test_the_records_of_an_aborted_transaction_are_not_archived(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    """What the workers count is what the archive holds: neither takes the records a
    producer's aborted transaction left in the log (nor does `read_to_end`, behind `evalset
    export`)."""
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=500, archive_batch_seconds=0.2
    )
    aborted, committed = _events(500), _events(500, skip=500)
    asyncio.run(publish_in_transactions(settings, [(aborted, False), (committed, True)]))
    archive = start_archive(settings)
    expected = {t.replace("-", "_"): len(_ids(committed, t)) for t in ("inputs", "resolutions")}
    _wait_rows(settings, expected, archive)
    # Nothing left to read: each transaction's marker, past its last record, is no lag (a lag
    # counted from the last record read stayed at a marker a partition).
    wait_for(
        lambda: _sink_metric(settings, "loopline_sink_consumer_lag_messages") == 0,
        30,
        "no lag once every committed record is read",
    )
    # The records of a transaction still open are lag: the sink waits on them.
    assert asyncio.run(_lag_while_open(settings, _events(5, skip=1000))) == 5
    assert archive.stop() == 0, archive.log_tail()
    for table, topic in (("inputs", "inputs"), ("resolutions", "resolutions")):
        assert {r[0] for r in _query(settings, f"SELECT event_id FROM {table}")} == _ids(
            committed, topic
        )
    read = asyncio.run(read_topic(settings, "inputs"))
    assert {record["event_id"] for _, record in read} == _ids(committed, "inputs")


def test_a_locked_archive_is_retried_without_losing_records(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=1000, archive_batch_seconds=0.2
    )
    open_archive(settings).initialise()
    with locked_by_another_process(settings.archive_file):
        events = _events(3000)
        asyncio.run(_publish(settings, events))
        archive = start_archive(settings)
        wait_for(lambda: "retrying in" in archive.log(), 60, "a lock error from a flush")
    _wait_rows(settings, {"inputs": len(_ids(events, "inputs"))}, archive)
    assert archive.stop() == 0, archive.log_tail()
    assert "is locked by another process" in archive.log()
    assert _count(settings, "inputs") == len(_ids(events, "inputs"))


def test_the_lag_counts_what_is_published_while_the_archive_cannot_be_written(
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    """Paused while its archive is locked, the sink fetches nothing: its lag still counts what
    is published meanwhile (it stood still at its last fetch's, 0 here, before)."""
    settings = make_settings(
        archive_path=tmp_path / "a.duckdb", archive_batch_rows=200, archive_batch_seconds=0.2
    )
    first, second, third = _events(600), _events(300, skip=600), _events(300, skip=900)
    asyncio.run(_publish(settings, first))
    archive = start_archive(settings)
    _wait_rows(settings, {"inputs": len(_ids(first, "inputs"))}, archive)
    with locked_by_another_process(settings.archive_file):
        asyncio.run(_publish(settings, second))
        wait_for(lambda: "retrying in" in archive.log(), 60, "a lock error from a flush")
        asyncio.run(_publish(settings, third))  # while its partitions are paused
        seen: list[tuple[float, float]] = []  # (lag, records not read)

        def lag_is_what_is_unread() -> bool:
            read = _sink_metric(settings, "loopline_sink_records_total")
            lag = _sink_metric(settings, "loopline_sink_consumer_lag_messages")
            seen.append((lag, len(first) + len(second) + len(third) - read))
            return lag == seen[-1][1]

        try:
            wait_for(lag_is_what_is_unread, 30, "the lag of what is not read yet")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: (lag, unread) {seen[-5:]}") from None
        assert seen[-1][0] >= len(third)
        assert "writable again" not in archive.log()  # still paused when measured
    every = first + second + third
    _wait_rows(settings, {"inputs": len(_ids(every, "inputs"))}, archive)
    wait_for(
        lambda: _sink_metric(settings, "loopline_sink_consumer_lag_messages") == 0,
        30,
        "no lag once written",
    )
    assert archive.stop() == 0, archive.log_tail()
    assert _count(settings, "inputs") == len(_ids(every, "inputs"))
