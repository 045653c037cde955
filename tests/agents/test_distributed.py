"""Exact across partitions and workers, and across a SIGKILL: on the real broker, the snapshots
the workers publish equal replay of the same events, number for number."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.batches import FENCED_EXIT_CODE
from pipeline.codec import Codec
from pipeline.generator import Scenario, TrafficGenerator
from pipeline.processor import Processor
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from pipeline.worker import STOP_GRACE_SECONDS
from tests.agents.test_five_numbers_live import _gauge
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, free_port, wait_for

pytestmark = pytest.mark.broker
START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
Events = list[tuple[str, dict[str, Any]]]


def _traffic(seed: int, count: int) -> Events:
    scenario = Scenario(cost_spike_at=60, latency_regression_at=30)
    events = list(islice(TrafficGenerator(seed, START, 20.0, scenario), count))
    return events + events[200:215]  # redelivered copies count once


async def _latest_snapshots(settings: Settings) -> dict[str, dict[str, Any]]:
    """The newest MetricSnapshot of each loop on loopline.metrics."""
    consumer = AIOKafkaConsumer(
        settings.topic("metrics"),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    codec, latest = Codec.load(), {}
    try:
        ends: dict[Any, int] = {}
        async with asyncio.timeout(30):
            while True:
                for messages in (await consumer.getmany(timeout_ms=300)).values():
                    for m in messages:
                        record = codec.decode(m.value).record
                        latest[record["loop"]] = record
                tps = list(consumer.assignment())
                if tps and not ends:
                    ends = await consumer.end_offsets(tps)
                if ends and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    break
    finally:
        await consumer.stop()
    return latest


async def _written_partitions(settings: Settings, topic: str) -> list[int]:
    """The partitions of ``topic`` that hold records."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return [tp.partition for tp in tps if ends[tp] > 0]


def _mismatch(settings: Settings, events: Events) -> str | None:
    """None when every loop's latest published snapshot equals replay at the same as_of."""
    published = asyncio.run(_latest_snapshots(settings))
    replayed = Processor(settings.core_config())
    for topic, record in events:
        replayed.process(topic, record)
    loops = replayed.snapshot()["loops"]
    if set(published) != set(loops):
        return f"loops {sorted(published)} != {sorted(loops)}"
    for loop, record in published.items():
        as_of = int(record["ts"].timestamp() * 1000)
        expected = replayed.snapshot(as_of)["loops"][loop]["windows"]
        got = json.loads(record["windows_json"])
        if got != expected:  # said number by number, so that a failure in CI can be read
            differ = [
                f"{window}.{name}: {got.get(window, {}).get(name)} != {value}"
                for window, numbers in expected.items()
                for name, value in numbers.items()
                if got.get(window, {}).get(name) != value
            ]
            return f"{loop} as of {record['ts']}: windows differ: " + "; ".join(differ[:6])
        if record["unresolved_cases"] != replayed.unresolved(as_of)[loop]:
            return f"{loop}: unresolved {record['unresolved_cases']}"
    return None


def _wait_exact(settings: Settings, events: Events, workers: list[WorkerProcess]) -> None:
    state: dict[str, str | None] = {"last": "nothing read yet"}

    def exact() -> bool:
        assert not any(w.exited() for w in workers), [w.log_tail() for w in workers]
        state["last"] = _mismatch(settings, events)
        return state["last"] is None

    try:
        wait_for(exact, 180, "published snapshots equal to replay", every=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last difference: {state['last']}") from None


def _another(
    settings: Settings, start_worker: Callable[[Settings], WorkerProcess]
) -> WorkerProcess:
    """One more worker of the same group, with a /metrics port of its own."""
    return start_worker(dataclasses.replace(settings, web_port=free_port()))


def _counting(
    settings: Settings,
    start_worker: Callable[[Settings], WorkerProcess],
    backlog: Events,
    inputs: int,
) -> WorkerProcess:
    """A worker started on ``backlog`` (published first), once it has counted ``inputs``
    inputs of it."""
    asyncio.run(_publish(settings, backlog))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs") >= inputs, 120, "a worker to count")
    return worker


def _publishing_slowly(settings: Settings, events: Events) -> threading.Thread:
    """A thread publishing ``events`` 300 a second, started."""

    def publish() -> None:
        for start in range(0, len(events), 300):
            asyncio.run(_publish(settings, events[start : start + 300]))
            time.sleep(1.0)

    publisher = threading.Thread(target=publish)
    publisher.start()
    return publisher


@pytest.mark.parametrize("workers", [1, 2])
def test_one_and_two_workers_publish_the_replay_snapshot(
    workers: int,
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    settings = make_settings(hourly_rates={"refunds": 30.0})
    events = _traffic(21, 4000)
    asyncio.run(_publish(settings, events))
    running = [start_worker(settings)]
    for _ in range(workers - 1):
        running.append(_another(settings, start_worker))
    _wait_exact(settings, events, running)
    # /metrics: each loop's gauges come from exactly one worker, with the replay's values.
    replayed = Processor(settings.core_config())
    for topic, record in events:
        replayed.process(topic, record)
    published = asyncio.run(_latest_snapshots(settings))
    seen: dict[str, list[float | None]] = {}

    def exported_once() -> bool:
        # Right after a rebalance a loop's new owner may still be loading it: wait for that.
        for loop, record in published.items():
            window = json.loads(record["windows_json"])["1h"]
            values = [_gauge(w, "loopline_coverage_ratio", loop=loop, window="1h") for w in running]
            seen[loop] = values
            if [v for v in values if v is not None] != [window["coverage"]]:
                return False
        return True

    try:
        wait_for(exported_once, 60, "each loop's gauges from exactly one worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}") from None
    if workers == 2:
        exporting = [
            w
            for w in running
            if _gauge(w, "loopline_toil_hours", window="7d", loop="refunds") is not None
        ]
        assert len(exporting) == 1


def test_a_worker_killed_midway_recovers_without_counting_twice(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    settings = make_settings()
    events = _traffic(33, 12_000)
    first, second = events[:6000], events[6000:]
    worker = _counting(settings, start_worker, first, 1000)
    worker.stop(signal.SIGKILL)
    changelog = f"{settings.app_id}-partition-state-changelog"
    written = asyncio.run(_written_partitions(settings, changelog))
    assert written, "the killed worker wrote no state to restore"
    asyncio.run(_publish(settings, second))
    restarted = start_worker(settings)
    _wait_exact(settings, events, [restarted])
    # Stage 1's state came back a fetch at a time (agents.restore), every partition the killed
    # worker wrote (one it had not checkpointed yet has nothing to restore, and logs nothing)
    restored = {
        line.split(" restored ")[1].split(":")[0]
        for line in restarted.log().splitlines()
        if " restored " in line
    }
    assert {f"{changelog}[{p}]" for p in written} <= restored, (written, restored)
    # Killed again with nothing new to read: the next process exports every loop all the same.
    restarted.stop(signal.SIGKILL)
    again = start_worker(settings)
    published = asyncio.run(_latest_snapshots(settings))
    wait_for(
        lambda: all(
            _gauge(again, "loopline_toil_hours", loop=loop, window="7d")
            == pytest.approx(json.loads(record["windows_json"])["7d"]["toil_hours"])
            for loop, record in published.items()
        ),
        120,  # the killed member holds its partitions until its session times out (15 s)
        "the restarted worker's gauges without new traffic",
    )


def test_a_static_member_killed_takes_its_partitions_back_without_a_rebalance(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    # LOOPLINE_INSTANCE_ID: the restarted worker replaces the killed one in the group at once
    # (the group stays at its first generation) instead of waiting out its session.
    settings = make_settings(instance_id="worker-a")
    events = _traffic(34, 6000)
    worker = _counting(settings, start_worker, events[:3000], 500)
    worker.stop(signal.SIGKILL)
    asyncio.run(_publish(settings, events[3000:]))
    restarted = start_worker(settings)
    _wait_exact(settings, events, [restarted])
    joined = [line for line in restarted.log().splitlines() if "Joined group" in line]
    assert joined and all("(generation 1)" in line for line in joined), joined


def test_a_worker_joining_under_traffic_takes_partitions_with_their_state(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    # The partitions that move to the second worker are restored from their changelogs
    # (agents.restore) while events keep coming: every event is counted once, by one worker
    # or the other, and the numbers equal replay's.
    settings = make_settings()
    events = _traffic(35, 12_000)
    first = _counting(settings, start_worker, events[:6000], 1000)

    publisher = _publishing_slowly(settings, events[6000:])  # ~20 s, across the rebalance
    second = _another(settings, start_worker)
    publisher.join()
    workers = [first, second]
    _wait_exact(settings, events, workers)

    def counted(status: str) -> int:
        return sum(w.processed(t, status) for w in workers for t in SOURCE_TOPICS)

    assert second.processed("inputs") > 0  # it took partitions over
    assert (counted("ok"), counted("duplicate")) == (12_000, 15)  # _traffic's 15 copies
    # The first worker went on with the partitions it kept (agents.state.settle): it restored
    # none of them from their changelogs, which it had written from empty.
    changelog = f"{settings.app_id}-partition-state-changelog"
    kept = [line for line in first.log().splitlines() if f" kept {changelog}[" in line]
    assert kept, first.log_tail()
    assert " restored " not in first.log()


def test_a_worker_leaving_under_traffic_hands_its_partitions_back(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    # Scaling in: of two workers, one is stopped (SIGTERM, as a deployment scaled down stops
    # it) while events keep coming. The other takes its partitions back, restored from the
    # changelogs the leaving one wrote, and the numbers equal replay's.
    settings = make_settings()
    events = _traffic(36, 12_000)
    staying = _counting(settings, start_worker, events[:4000], 1000)
    publisher = _publishing_slowly(settings, events[4000:])  # ~27 s, across both rebalances
    leaving = _another(settings, start_worker)
    wait_for(lambda: leaving.processed("inputs") >= 200, 120, "the second worker to count")
    assert leaving.stop(signal.SIGTERM) == 0, leaving.log_tail()
    publisher.join()
    _wait_exact(settings, events, [staying])
    # the partitions it had came back from their changelogs, not from the staying worker's
    # memory of them (the leaving worker wrote them meanwhile: agents.state.settle)
    changelog = f"{settings.app_id}-partition-state-changelog"
    assert f" restored {changelog}[" in staying.log(), staying.log_tail()


def test_a_worker_asked_to_stop_while_it_joins_its_group_stops_cleanly(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    # A rolling deployment stops workers while others join: a SIGTERM that lands inside the
    # join (after the revoke, before "Joined group") goes through Faust's stop in the middle of
    # the rebalance, which was suspected of hanging until the 20 s deadline (exit 1). It stops
    # in seconds with status 0, and the staying worker counts every event once.
    settings = make_settings()
    events = _traffic(42, 12_000)
    staying = _counting(settings, start_worker, events[:8000], 500)
    publisher = _publishing_slowly(settings, events[8000:])  # ~14 s, across the joins
    for _ in range(3):  # until a stop lands inside a join (the first one does, nearly always)
        joining = _another(settings, start_worker)
        wait_for(
            lambda worker=joining: "Revoking previously assigned partitions" in worker.log(),
            60,
            "the second worker to begin joining",
            every=0.02,
        )
        began = time.monotonic()
        assert joining.stop(signal.SIGTERM) == 0, joining.log_tail()
        took = time.monotonic() - began
        log = joining.log()
        joined = log.find("Joined group")
        if joined < 0 or log.index("Signal received") < joined:
            break
    else:
        pytest.fail("no stop landed inside a join in three tries")
    assert took < STOP_GRACE_SECONDS, took
    publisher.join()
    _wait_exact(settings, events, [staying])


def test_workers_joining_leaving_and_killed_in_quick_succession_count_every_event_once(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    # Churn under traffic: rebalances that begin while the last one's restores still run, a
    # clean leave, a SIGKILL (its partitions wait out its session) and a replacement.
    settings = make_settings()
    events = _traffic(41, 16_000)
    first = _counting(settings, start_worker, events[:3000], 500)
    publisher = _publishing_slowly(settings, events[3000:])  # ~43 s

    time.sleep(3)
    second = _another(settings, start_worker)
    time.sleep(1)
    third = _another(settings, start_worker)
    time.sleep(1.5)
    assert second.stop(signal.SIGTERM) == 0, second.log_tail()
    time.sleep(1)
    third.stop(signal.SIGKILL)
    time.sleep(3)
    fourth = _another(settings, start_worker)
    publisher.join()
    _wait_exact(settings, events, [first, fourth])


async def _marker_generations(settings: Settings, topic: str) -> dict[int, list[int]]:
    """Each partition's checkpoint markers' generations, in the order the changelog holds them."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    found: dict[int, list[int]] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async with asyncio.timeout(60):
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    for m in messages:
                        if m.key is not None and m.key.endswith(b"~checkpoint") and m.value:
                            found.setdefault(tp.partition, []).append(json.loads(m.value)["g"])
    finally:
        await consumer.stop()
    return found


def _stopped(worker: WorkerProcess) -> bool:
    """Whether the worker's process is stopped (SIGSTOP): its state in /proc is T."""
    stat = f"/proc/{worker.proc.pid}/stat"
    with open(stat) as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_worker_that_stood_still_past_its_session_timeout_writes_nothing_after_it(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    """A worker stops (SIGSTOP, from LOOPLINE_FAULT_STALL_AT_CHECK) with a batch in hand and
    nothing of it written, as a VM freeze would stop it; another worker takes its partitions
    over once the group drops it (15 s) and counts everything; then it gets SIGCONT. It must
    not write its batch after the new owner's writes (agents.fence): it stops. A write of it
    would show as a checkpoint marker older than the one before it in its changelog partition,
    which a later restore would take for the newest state (before the fence: markers [1, 2,
    3, 4, 5, 7, ..., 11, 6], and once [2, ..., 7, 1] from a store forgotten in a rebalance)."""
    settings = make_settings()
    events = _traffic(37, 20_000)
    asyncio.run(_publish(settings, events))
    stalled = start_worker(dataclasses.replace(settings, fault_stall_at_check=20))
    wait_for(lambda: stalled.exited() or _stopped(stalled), 120, "the worker to stop itself")
    assert not stalled.exited(), stalled.log_tail()
    try:
        taker = _another(settings, start_worker)
        _wait_exact(settings, events, [taker])  # it took every partition over and went on
    finally:
        log_size = len(stalled.log())
        stalled.proc.send_signal(signal.SIGCONT)
    wait_for(
        lambda: stalled.exited() or "Successfully synced group" in stalled.log()[log_size:],
        60,
        "the stalled worker to stop or rejoin",
        every=1,
    )
    time.sleep(3)  # what it would still write, it has written by now
    # Stage 1's changelog: the stall came with its writes delivered (agents.fence); stage 2's
    # may have had writes in flight, which only transactions fence (README, "Fenced").
    changelog = f"{settings.app_id}-partition-state-changelog"
    generations = asyncio.run(_marker_generations(settings, changelog))
    assert generations, changelog
    for partition, gs in generations.items():
        assert gs == sorted(set(gs)), f"{changelog}[{partition}] markers {gs}"
    assert stalled.proc.wait(timeout=30) == FENCED_EXIT_CODE, stalled.log_tail()
    assert "writes nothing of the batch" in stalled.log(), stalled.log_tail()
    _wait_exact(settings, events, [taker])
