"""The worker's live numbers on the real broker equal replay of the same events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice

import pytest

from pipeline.core import to_ms
from pipeline.generator import Scenario, TrafficGenerator
from pipeline.metrics import QUANTILE_LABELS, parse_exposition
from pipeline.processor import Processor
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, consume, wait_for

pytestmark = pytest.mark.broker
START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _gauge(worker: WorkerProcess, name: str, **labels: str) -> float | None:
    from pipeline.metrics import parse_exposition

    samples = parse_exposition(worker.metrics_text() or "")
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def test_one_worker_exports_the_replay_numbers(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    settings = make_settings(hourly_rates={"refunds": 30.0})
    events = list(islice(TrafficGenerator(11, START, 20.0, Scenario(cost_spike_at=60)), 4000))
    # A few redelivered copies: the worker must count them once, as replay does.
    events += events[100:110]
    expected = asyncio.run(_publish(settings, events))
    replayed = Processor(settings.core_config())
    for topic, record in events:
        replayed.process(topic, record)
    snapshot = replayed.snapshot()

    worker = start_worker(settings)
    wait_for(
        lambda: all(
            worker.processed(t) + worker.processed(t, "duplicate") >= expected[t]
            for t in SOURCE_TOPICS
        ),
        120,
        "all events processed",
    )
    assert sum(worker.processed(t, "duplicate") for t in SOURCE_TOPICS) == 10
    loops = snapshot["loops"]

    def caught_up() -> bool:
        # Every loop's p50 over 5m (the most recent data), 7d coverage (all of it) and pass
        # rates over both agree: the snapshot behind the gauges saw every partial, the eval
        # results' too (a topic's last batch may be read after the others').
        return all(
            _gauge(
                worker,
                "loopline_latency_quantile_seconds",
                loop=loop,
                window="5m",
                quantile="0.5",
            )
            == data["windows"]["5m"]["latency_seconds"]["p50"]
            and _gauge(worker, "loopline_coverage_ratio", loop=loop, window="7d")
            == data["windows"]["7d"]["coverage"]
            and all(
                _gauge(worker, "loopline_eval_pass_rate", suite=suite, loop=loop, window=w) == value
                for w in ("5m", "7d")
                for suite, value in data["windows"][w]["quality"].items()
            )
            for loop, data in loops.items()
        )

    wait_for(
        caught_up,
        30,
        "the worker's snapshot to catch up",
    )
    for loop, data in loops.items():
        for window, numbers in data["windows"].items():
            lw = {"loop": loop, "window": window}
            assert _gauge(worker, "loopline_coverage_ratio", **lw) == numbers["coverage"]
            assert _gauge(worker, "loopline_assisted_ratio", **lw) == numbers["assisted"]
            for suite, value in numbers["quality"].items():
                assert _gauge(worker, "loopline_eval_pass_rate", suite=suite, **lw) == value
            for key, value in numbers["latency_seconds"].items():
                assert (
                    _gauge(
                        worker,
                        "loopline_latency_quantile_seconds",
                        quantile=QUANTILE_LABELS[key],
                        **lw,
                    )
                    == value
                )
            assert _gauge(worker, "loopline_cost_per_resolution_usd", **lw) == pytest.approx(
                numbers["cost_per_resolution_usd"], rel=1e-9
            )
            assert _gauge(worker, "loopline_toil_hours", **lw) == pytest.approx(
                numbers["toil_hours"], rel=1e-9
            )
            assert (
                _gauge(worker, "loopline_uncovered_input_ratio", **lw) == numbers["uncovered_ratio"]
            )
    # Raw-fact counters agree with the replay's 7d window (it holds every event).
    for loop, data in loops.items():
        resolved = worker.metric("loopline_resolutions_total", loop=loop)
        assert resolved == data["windows"]["7d"]["resolved"]
    histogram_count = worker.metric("loopline_resolution_latency_seconds_count")
    assert histogram_count == sum(
        1
        for t, r in {r["event_id"]: (t, r) for t, r in events}.values()
        if t == "resolutions"
        and any(t2 == "inputs" and r2["case_id"] == r["case_id"] for t2, r2 in events)
    )
    published = [r for _, r in asyncio.run(consume(settings, "metrics", len(loops)))]
    assert {s["loop"] for s in published} == set(loops)
    # Every case is still held (the events span minutes, the state horizon is 2 h): one per
    # case id, and per eval case id of the eval results of eval cases.
    held = {r["case_id"] for t, r in events if t in ("inputs", "resolutions")}
    held |= {r.get("case_id") or r["eval_case_id"] for t, r in events if t == "eval-results"}
    assert worker.metric("loopline_held_cases") == len(held)
    newest = max(to_ms(r["ts"]) for _, r in events)  # every topic read: the newest event
    watermarks = parse_exposition(worker.metrics_text() or "")
    assert max(v for (n, _), v in watermarks.items() if n == "loopline_watermark_seconds") == (
        newest / 1000
    )
    assert worker.metric("process_resident_memory_bytes") > 0


def test_a_backlog_read_topic_by_topic_loses_nothing_to_lateness(
    make_settings: Callable[..., Settings], start_worker: Callable[[Settings], WorkerProcess]
) -> None:
    """Twenty minutes of events already on the topics, a minute of allowed lateness: the
    worker reads each partition's topics at their own speed (a batch holds all of one topic's
    backlog before the next's), yet no event is too late and the numbers are replay's."""
    settings = make_settings(allowed_lateness_seconds=60)
    events = list(islice(TrafficGenerator(13, START, 2.0), 6000))
    assert events[-1][1]["ts"] - events[0][1]["ts"] > 20 * 60_000
    expected = asyncio.run(_publish(settings, events))
    replayed = Processor(settings.core_config())
    for topic, record in events:
        replayed.process(topic, record)
    loops = replayed.snapshot()["loops"]

    worker = start_worker(settings)
    wait_for(
        lambda: (
            sum(
                worker.processed(t, status)
                for t in SOURCE_TOPICS
                for status in ("ok", "duplicate", "too_late", "dead_letter")
            )
            >= len(events)
        ),
        120,
        "all events processed",
    )
    statuses = {
        (t, status): worker.processed(t, status)
        for t in SOURCE_TOPICS
        for status in ("ok", "duplicate", "too_late", "dead_letter")
    }
    assert {t: worker.processed(t) for t in expected} == dict(expected), repr(statuses)
    for loop, data in loops.items():
        resolved = worker.metric("loopline_resolutions_total", loop=loop)
        assert resolved == data["windows"]["7d"]["resolved"]

    def p90s_agree() -> bool:  # the snapshot behind the gauges saw every partial
        return all(
            _gauge(
                worker,
                "loopline_latency_quantile_seconds",
                loop=loop,
                window="7d",
                quantile="0.9",
            )
            == data["windows"]["7d"]["latency_seconds"]["p90"]
            for loop, data in loops.items()
        )

    wait_for(p90s_agree, 30, "every loop's 7d p90 latency to be replay's")
