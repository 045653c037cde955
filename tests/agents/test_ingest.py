"""The ingest agent against the real broker: exact counts, dead letters, restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP

from agents.batches import client_may_hold, client_position
from pipeline.codec import Codec
from pipeline.core import iso, to_ms
from pipeline.formats import FORMAT_VERSION
from pipeline.generator import TrafficGenerator
from pipeline.metrics import parse_exposition
from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS, ensure_topics
from tests.conftest import (
    WorkerProcess,
    commit_offsets,
    consume,
    delete_first_records,
    publish_in_transactions,
    read_topic,
    wait_for,
)

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
LAG = "loopline_consumer_lag_messages"
pytestmark = pytest.mark.broker


def _events(seed: int, count: int, skip: int = 0) -> list[tuple[str, dict[str, Any]]]:
    generator = iter(TrafficGenerator(seed, START))
    return [next(generator) for _ in range(skip + count)][skip:]


async def _publish(settings: Settings, events: list[tuple[str, dict[str, Any]]]) -> Counter[str]:
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        for topic, record in events:
            await publisher.publish(topic, record)
    return Counter(topic for topic, _ in events)


def _wait_counts(worker: WorkerProcess, expected: Counter[str], timeout: float = 120) -> None:
    wait_for(
        lambda: all(worker.processed(t) >= expected[t] for t in SOURCE_TOPICS),
        timeout,
        f"processed counts {dict(expected)} (log: {worker.log_path})",
    )


def _counted_then_stopped(
    settings: Settings,
    start_worker: Callable[[Settings], WorkerProcess],
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    """Publish ``events``, run a worker until it counted them all, and stop it cleanly (a
    clean stop commits the offsets it read, as a rule: CI once saw a partition's commit
    behind; the checkpoint has those records, and the restarted worker skips them)."""
    expected = asyncio.run(_publish(settings, events))
    worker = start_worker(settings)
    _wait_counts(worker, expected)
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()  # stopped within its grace


def test_readyz_is_503_until_the_worker_has_joined_and_restored_then_200(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """/healthz answers while the event loop runs; /readyz says why a worker does not count
    yet (joining its group, rebalancing, restoring) and 200 once it holds its partitions.
    The second worker's wait is certain: the group's rebalance waits out the session of the
    first, killed while it held every partition (15 s)."""
    settings = make_settings()
    held = settings.partitions * len(SOURCE_TOPICS)  # every partition of the four topics

    def answers_until_ready(worker: WorkerProcess) -> list[tuple[int, dict[str, Any]]]:
        answers: list[tuple[int, dict[str, Any]]] = []

        def ready() -> bool:
            assert not worker.exited(), worker.log_tail()
            answer = worker.probe("/readyz")
            if answer is not None:
                answers.append(answer)
            return answer is not None and answer[0] == 200

        worker.launch()  # not start_worker's: it waits for /metrics, by when it may have joined
        try:
            wait_for(ready, 90, f"/readyz 200 (log {worker.log_path})", every=0.1)
            assert worker.probe("/healthz") == (200, {"status": "alive"})
        finally:
            worker.stop(signal.SIGKILL)
        return answers

    first = answers_until_ready(WorkerProcess(settings, tmp_path / "first.log"))
    assert first[-1] == (200, {"status": "ready", "source_partitions": held})
    second = answers_until_ready(WorkerProcess(settings, tmp_path / "second.log"))
    waited = [body["status"] for status, body in second[:-1] if status == 503]
    assert len(waited) == len(second) - 1 >= 10, second  # 503 for a second and more
    assert set(waited) <= {"joining", "rebalancing", "restoring"}
    assert "rebalancing" in waited
    assert second[-1] == (200, {"status": "ready", "source_partitions": held})


def test_counts_exactly_and_a_restart_does_not_recount(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings()
    events = _events(seed=7, count=10_000)
    expected = asyncio.run(_publish(settings, events))
    assert sum(expected.values()) == 10_000

    worker = start_worker(settings)
    _wait_counts(worker, expected)
    time.sleep(2)  # settle: nothing beyond the 10,000 may arrive later
    assert {t: worker.processed(t) for t in SOURCE_TOPICS} == {
        t: expected[t] for t in SOURCE_TOPICS
    }
    assert worker.metric("loopline_dead_letters_total") == 0
    # a clean stop commits the consumed offsets
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()

    restarted = start_worker(settings)
    # The stream goes on (restored state remembers ids and event time, so a different stream
    # starting at the same time would rightly count as duplicates and late events).
    more = _events(seed=7, count=300, skip=10_000)
    expected_more = asyncio.run(_publish(settings, more))
    _wait_counts(restarted, expected_more)
    assert {t: restarted.processed(t) for t in SOURCE_TOPICS} == {
        t: expected_more[t] for t in SOURCE_TOPICS
    }

    # Consumer lag is of the stages' topics only: the tables' changelogs are assigned too, but
    # read only to restore, so they would show the worker's own writes since as a backlog.
    def lag_topics() -> set[str]:
        samples = parse_exposition(restarted.metrics_text() or "")
        return {
            dict(labels)["topic"]
            for name, labels in samples
            if name == "loopline_consumer_lag_messages"
        }

    consumed = {settings.topic(t) for t in (*SOURCE_TOPICS, "partials")}
    wait_for(lambda: lag_topics() == consumed, 30, "the consumer lag of the stages' topics")


def test_a_changelog_cut_by_retention_is_restored_without_hanging(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """faust-streaming #597 (an emptied changelog partition) and #651 / #176 (its first
    segments gone): Faust's recovery waited forever for records no longer there. Here one
    partition of the state's changelog is emptied and one cut in half while the worker is
    down; the restarted worker recovers, says what it lost, and counts new traffic."""
    settings = make_settings()
    _counted_then_stopped(settings, start_worker, _events(seed=11, count=4_000))
    changelog = f"{settings.app_id}-partition-state-changelog"
    ends = asyncio.run(delete_first_records(settings, changelog, {0: 1.0, 1: 0.5}))
    assert min(ends.values()) > 1, ends  # both held records to lose

    restarted = start_worker(settings)
    more = _events(seed=11, count=500, skip=4_000)
    expected_more = asyncio.run(_publish(settings, more))
    _wait_counts(restarted, expected_more)
    log = restarted.log()
    assert "Error in recovery" not in log
    for partition in ends:
        assert f"{changelog}[{partition}] starts at offset " in log, restarted.log_tail()
    assert f"{changelog}[2] starts at offset " not in log


def test_source_records_deleted_before_they_were_read_are_said_and_counted(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """Kafka deleted inputs (retention; here a delete-records request) while the worker was
    down, past its committed offsets: the consumer goes on from the earliest offset left, and
    those events are counted nowhere. The restarted worker says how many each partition lost
    and counts them in loopline_records_deleted_unread_total; the rest counts as before.

    Two partitions' committed offsets are behind what the worker counted (as a crash, or a
    stop before its last batch was acked, leaves them): the records between, deleted too, were
    counted, and are not said lost (CI once counted 1,298 for 1,034)."""
    settings = make_settings()
    _counted_then_stopped(settings, start_worker, _events(seed=13, count=2_000))
    inputs = settings.topic("inputs")
    behind = {TopicPartition(inputs, p): 0 for p in (0, 1)}
    asyncio.run(commit_offsets(settings, settings.app_id, behind))
    unread = _events(seed=13, count=2_000, skip=2_000)
    lost = Counter(topic for topic, _ in unread)
    asyncio.run(_publish(settings, unread))
    everything = dict.fromkeys(range(settings.partitions), 1.0)
    asyncio.run(delete_first_records(settings, inputs, everything, compacted=False))
    later = _events(seed=13, count=2_000, skip=4_000)
    expected_later = asyncio.run(_publish(settings, later))

    restarted = start_worker(settings)
    # the resolutions and eval results of all three parts are read; the inputs of two
    _wait_counts(restarted, expected_later + lost - Counter({"inputs": lost["inputs"]}))
    deleted = "loopline_records_deleted_unread_total"
    wait_for(lambda: restarted.metric(deleted) > 0, 30, "the deleted records counted")
    assert restarted.metric(deleted, topic=inputs) == lost["inputs"] > 0
    assert restarted.metric(deleted) == lost["inputs"]  # no other topic lost any
    said = re.findall(
        rf"{re.escape(inputs)}\[(\d)\]: (\d+) records \(offsets (\d+)-(\d+)\) were deleted by "
        r"Kafka before this process read them",
        restarted.log(),
    )
    assert sum(int(n) for _, n, _, _ in said) == lost["inputs"], restarted.log_tail()
    assert all(int(n) == int(last) - int(first) + 1 for _, n, first, last in said)
    assert len({p for p, _, _, _ in said}) == len(said)  # once per partition
    assert "out of range" not in restarted.log()  # aiokafka's own line, said better above
    assert restarted.processed("inputs") == expected_later["inputs"]


def test_events_of_an_aborted_transaction_are_not_counted(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """A producer that aborts a transaction leaves its records in the log, marked aborted:
    read uncommitted (Faust's default without exactly-once), they were counted as events."""
    settings = make_settings()
    events = _events(seed=17, count=1_200)
    aborted, committed, after = events[:400], events[400:800], events[800:]
    asyncio.run(publish_in_transactions(settings, [(aborted, False), (committed, True)]))
    worker = start_worker(settings)
    expected = Counter(topic for topic, _ in committed)
    _wait_counts(worker, expected)
    asyncio.run(publish_in_transactions(settings, [(aborted, False), (after, True)]))
    expected += Counter(topic for topic, _ in after)
    _wait_counts(worker, expected)
    time.sleep(3)  # anything more would have been counted by now
    assert {t: worker.processed(t) for t in SOURCE_TOPICS} == {
        t: expected[t] for t in SOURCE_TOPICS
    }
    assert sum(worker.processed(t, "duplicate") for t in SOURCE_TOPICS) == 0

    def lags(topic: str) -> list[float]:
        samples = parse_exposition(worker.metrics_text() or "")
        wanted = ("topic", settings.topic(topic))
        return [v for (n, ls), v in samples.items() if n == LAG and wanted in ls]

    # The transactions' markers are read past as well: no source topic is left behind, which
    # would hold its partitions' watermark (agents.batches.client_may_hold) for good.
    wait_for(
        lambda: all(lags(t) and sum(lags(t)) == 0 for t in ("inputs", "resolutions")),
        30,
        "no consumer lag left on the source topics",
    )


async def _send_raw(settings: Settings, topic: str, key: bytes, value: bytes) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(
            settings.topic(topic), value=value, key=key, partition=0
        )
        return int(metadata.offset)
    finally:
        await producer.stop()


def test_the_cap_on_cases_evicts_and_counts_what_it_evicts(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    cap = 30
    settings = make_settings(max_cases_per_partition=cap)
    # Inputs only, one per case: no case comes back after its eviction, so each partition
    # ends holding min(cap, its cases) and the rest are evicted.
    inputs = {r["case_id"]: ("inputs", r) for t, r in _events(seed=5, count=1500) if t == "inputs"}
    events = list(inputs.values())
    assert len(events) > 4 * cap
    expected = asyncio.run(_publish(settings, events))
    partitioner = DefaultPartitioner()
    everyone = list(range(settings.partitions))
    per_partition = Counter(partitioner(key.encode(), everyone, everyone) for key in inputs)
    held = {p: min(cap, per_partition[p]) for p in everyone}

    worker = start_worker(settings)
    _wait_counts(worker, expected)
    wait_for(
        lambda: worker.metric("loopline_held_cases") == sum(held.values()),
        30,
        f"held cases {held}",
    )
    for partition, count in held.items():
        assert worker.metric("loopline_held_cases", partition=str(partition)) == count
    evicted = worker.metric("loopline_evicted_cases_total")
    assert evicted == len(events) - sum(held.values())
    loops = Counter(r["loop"] for _, r in events)
    assert evicted == sum(worker.metric("loopline_evicted_cases_total", loop=k) for k in loops)


def test_malformed_records_go_to_the_dlq_and_the_stream_goes_on(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings()
    worker = start_worker(settings)
    before = _events(seed=1, count=200)
    after = _events(seed=2, count=200)
    asyncio.run(_publish(settings, before))

    not_avro = b'{"event_id": "x"}'
    good = Codec.load().encode("ResolutionEvent", next(r for t, r in before if t == "resolutions"))
    truncated = good[:14]
    # Valid Avro, but an amount that cannot be summed: invalid, and counted nowhere else.
    template = next(r for t, r in before if t == "resolutions")
    not_finite = Codec.load().encode(
        "ResolutionEvent", {**template, "event_id": "nan-cost", "model_cost_usd": float("nan")}
    )
    # Valid, but stamped a day ahead of its message's time (a clock gone wrong): followed, it
    # would carry its partition's watermark a day ahead and make the events after it too late.
    an_input = next(r for t, r in before if t == "inputs")
    ahead = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    future = Codec.load().encode("InputEvent", {**an_input, "event_id": "ahead", "ts": ahead})
    bad_offset = asyncio.run(_send_raw(settings, "inputs", b"case-x", not_avro))
    cut_offset = asyncio.run(_send_raw(settings, "resolutions", b"case-y", truncated))
    asyncio.run(_send_raw(settings, "resolutions", b"case-z", not_finite))
    asyncio.run(_send_raw(settings, "inputs", str(an_input["case_id"]).encode(), future))
    expected = asyncio.run(_publish(settings, after)) + Counter(t for t, _ in before)

    _wait_counts(worker, expected)
    wait_for(lambda: worker.metric("loopline_dead_letters_total") >= 4, 60, "4 dead letters")
    assert worker.processed("inputs", "dead_letter") == 2
    assert worker.processed("resolutions", "dead_letter") == 2
    assert (
        worker.metric(
            "loopline_dead_letters_total", topic=settings.topic("resolutions"), reason="invalid"
        )
        == 1
    )
    assert (
        worker.metric(
            "loopline_dead_letters_total", topic=settings.topic("inputs"), reason="bad_header"
        )
        == 1
    )
    assert (
        worker.metric(
            "loopline_dead_letters_total", topic=settings.topic("resolutions"), reason="truncated"
        )
        == 1
    )

    assert (
        worker.metric(
            "loopline_dead_letters_total", topic=settings.topic("inputs"), reason="future_ts"
        )
        == 1
    )

    dead = [d for _, d in asyncio.run(consume(settings, "dlq", 4))]
    (nan,) = [d for d in dead if d["reason"] == "invalid"]
    assert nan["error"] == "Resolution.model_cost_usd: nan is not a finite amount"
    (early,) = [d for d in dead if d["reason"] == "future_ts"]
    stamped = re.escape(iso(to_ms(ahead)))
    assert re.fullmatch(  # a day less the moments between stamping and sending it
        rf"ts {stamped} is 86,[34]\d\d s ahead of its message's time \S+; "
        r"at most 3,600 s is allowed \(LOOPLINE_MAX_AHEAD_SECONDS\)",
        early["error"],
    ), early["error"]
    letters = {d["source_topic"]: d for d in dead if d["reason"] not in ("invalid", "future_ts")}
    header = letters[settings.topic("inputs")]
    assert (header["source_partition"], header["source_offset"]) == (0, bad_offset)
    assert header["event_id"] == f"{settings.topic('inputs')}:0:{bad_offset}"
    assert header["reason"] == "bad_header"
    assert header["value"] == not_avro and header["key"] == b"case-x"
    cut = letters[settings.topic("resolutions")]
    assert (cut["source_partition"], cut["source_offset"]) == (0, cut_offset)
    assert cut["reason"] == "truncated"
    assert "ResolutionEvent.event_id" in cut["error"]  # 4 body bytes: event_id is cut short
    assert cut["value"] == truncated


def test_client_may_hold_what_aiokafka_has_not_handed_over_or_not_fetched(
    make_settings: Callable[..., Settings],
) -> None:
    """agents.batches.client_may_hold and client_position read aiokafka's own state: checked
    against a real client. The position moves as records are handed over and with a seek."""
    settings = make_settings()
    topic = settings.topic("inputs")

    positions: list[int | None] = []

    async def scenario() -> list[bool]:
        await ensure_topics(settings)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            for n in range(10):
                await producer.send_and_wait(topic, b"%d" % n, partition=0)
        finally:
            await producer.stop()
        client = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
        await client.start()
        faust_consumer = SimpleNamespace(_thread=SimpleNamespace(_ensure_consumer=lambda: client))
        tp = TopicPartition(topic, 0)
        try:
            client.assign([tp])
            await client.seek_to_beginning(tp)
            holds = [client_may_hold(faust_consumer, TP(topic, 0))]  # not fetched yet: may hold any
            handed = await client.getmany(tp, timeout_ms=10_000, max_records=3)
            assert [m.offset for m in handed[tp]] == [0, 1, 2]
            holds.append(client_may_hold(faust_consumer, TP(topic, 0)))
            positions.append(client_position(faust_consumer, TP(topic, 0)))
            client.seek(tp, 1)
            positions.append(client_position(faust_consumer, TP(topic, 0)))
            positions.append(client_position(faust_consumer, TP(topic, 1)))  # not assigned
            while sum(len(ms) for ms in (await client.getmany(tp, timeout_ms=1000)).values()):
                pass
            holds.append(client_may_hold(faust_consumer, TP(topic, 0)))
            holds.append(client_may_hold(faust_consumer, TP(topic, 1)))  # not assigned
            return holds
        finally:
            await client.stop()

    assert asyncio.run(scenario()) == [True, True, False, False]
    assert positions == [3, 1, None]


def test_a_partial_in_a_newer_format_stops_the_worker_instead_of_being_misread(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """What a newer loopline's stage 1 wrote (a mixed rollout) is neither merged as this version
    understands it nor dead-lettered (its counts would be lost): the worker stops, saying why,
    and nothing of it reaches the DLQ."""
    settings = make_settings()
    worker = start_worker(settings)
    asyncio.run(_publish(settings, _events(seed=3, count=50)))
    newer = {"kind": "partial", "v": FORMAT_VERSION + 1, "p": 0, "loop": "refunds", "wm": 0}
    asyncio.run(_send_raw(settings, "partials", b"refunds", json.dumps(newer).encode()))
    wait_for(worker.exited, 60, f"the worker to stop (log {worker.log_path})")
    assert (
        f"a stage-1 message written in format {FORMAT_VERSION + 1} by a newer loopline; "
        f"this worker reads format {FORMAT_VERSION} at most" in worker.log()
    )
    assert "bad partial" not in worker.log()
    assert asyncio.run(read_topic(settings, "dlq")) == []


def test_a_partial_that_cannot_be_read_is_a_dead_letter_and_merging_goes_on(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """Stage 2 never stops over one bad message of the partials topic: it goes to the DLQ with
    reason processing_error, its bytes and position, and the loops' numbers still come."""
    settings = make_settings()
    worker = start_worker(settings)
    broken = b'{"kind": "partial", "v": 1}'  # no partition, loop or buckets
    offset = asyncio.run(_send_raw(settings, "partials", b"refunds", broken))
    events = _events(seed=4, count=200)
    asyncio.run(_publish(settings, events))
    wait_for(lambda: worker.processed("inputs") > 0, 90, "the worker to count inputs")
    ((_, letter),) = asyncio.run(consume(settings, "dlq", 1))
    assert letter["reason"] == "processing_error"
    assert letter["error"].startswith("KeyError: "), letter["error"]
    assert letter["source_topic"] == settings.topic("partials")
    assert (letter["source_partition"], letter["source_offset"]) == (0, offset)
    assert letter["value"] == broken and letter["key"] == b"refunds"
    wait_for(
        lambda: "loopline_coverage_ratio{" in (worker.metrics_text() or ""),
        90,
        "the loops' numbers on /metrics",
    )
    assert not worker.exited()


def test_the_records_a_stuck_stage_holds_count_as_consumer_lag(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """Stage 1 stuck with a batch in hand, the process alive (LOOPLINE_FAULT_HANG_AT_CHECK: its
    third membership check, in its second batch; each batch checks twice). Its fetches go on
    until its buffer holds 20,000 records, so counted from the consumer's position the records
    it fetched were no lag (0 here), and LooplineConsumerLagGrowing stayed quiet for as many.
    Counted from the first record it has not processed, the lag is every event not counted."""
    settings = dataclasses.replace(make_settings(), fault_hang_at_check=3)
    published = asyncio.run(_publish(settings, _events(seed=23, count=200)))
    worker = start_worker(settings)
    wait_for(lambda: sum(worker.processed(t) for t in SOURCE_TOPICS) > 0, 60, "a first batch")
    published += asyncio.run(_publish(settings, _events(seed=23, count=600, skip=200)))
    wait_for(lambda: "LOOPLINE_FAULT_HANG_AT_CHECK" in worker.log(), 60, "stage 1 to hang")
    not_counted = sum(published.values()) - sum(worker.processed(t) for t in SOURCE_TOPICS)
    assert 0 < not_counted < 800

    def source_lag() -> float:
        samples = parse_exposition(worker.metrics_text() or "")
        sources = {settings.topic(t) for t in SOURCE_TOPICS}
        return sum(
            value
            for (name, labels), value in samples.items()
            if name == LAG and dict(labels)["topic"] in sources
        )

    wait_for(lambda: source_lag() == not_counted, 30, f"a lag of {not_counted} unprocessed")
    time.sleep(2)  # it stays: the stage takes nothing more
    assert source_lag() == not_counted
    assert sum(worker.processed(t) for t in SOURCE_TOPICS) == sum(published.values()) - not_counted
