"""The pause between metadata refreshes that reach no broker, and the filter of repeated
aiokafka log lines (pipeline.kafka_outage); tests/agents/test_broker_restart.py runs them
through a real broker's restart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.client import AIOKafkaClient

from pipeline import kafka_outage
from pipeline.kafka_outage import RepeatFilter, backoff_seconds, with_backoff


class _Client:
    """What the wrapper reads of an AIOKafkaClient (which it remembers weakly)."""

    def __init__(self, retry_backoff: float) -> None:
        self._retry_backoff = retry_backoff


def test_the_pause_doubles_from_the_clients_backoff_to_a_second() -> None:
    assert [backoff_seconds(0.1, n) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert backoff_seconds(2.0, 1) == 1.0  # a client configured slower still tries each second


def test_a_failed_refresh_waits_before_it_returns_and_a_success_starts_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes = iter([False, False, False, False, True])
    slept: list[float] = []

    async def refresh(client: Any, cluster: Any, topics: Any) -> bool:
        return next(outcomes)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(kafka_outage.asyncio, "sleep", sleep)
    client, other = _Client(0.1), _Client(0.5)
    refreshed = with_backoff(refresh)

    async def run() -> list[bool]:
        results = [await refreshed(client, None, None) for _ in range(3)]
        results.append(await refreshed(other, None, None))  # its own count: a first failure
        results.append(await refreshed(client, None, None))
        return results

    assert asyncio.run(run()) == [False, False, False, False, True]
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.5])
    outcomes = iter([False])
    asyncio.run(refreshed(client, None, None))  # after the success: the first pause again
    assert slept[-1] == pytest.approx(0.1)


def _record(text: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", level, __file__, 1, text, args, None)


def test_a_repeated_line_passes_once_per_window_and_then_says_how_often_it_came() -> None:
    now = [0.0]
    repeats = RepeatFilter(window=10.0, clock=lambda: now[0])
    refused = ("Unable connect to node with id %s: %s", 1, "[Errno 111] Connection refused")
    passed = []
    for tick in range(25):  # every 0.5 s for 12 s
        now[0] = tick * 0.5
        record = _record(*refused)
        if repeats.filter(record):
            passed.append((now[0], record.getMessage()))
    assert passed == [
        (0.0, "Unable connect to node with id 1: [Errno 111] Connection refused"),
        (
            10.0,
            "Unable connect to node with id 1: [Errno 111] Connection refused"
            " (repeated 19 times since last logged)",
        ),
    ]
    # Another text, another level or an info line is not held back by it.
    assert repeats.filter(_record("Unable to update metadata from %s", [1]))
    assert repeats.filter(_record(*refused, level=logging.WARNING))
    assert repeats.filter(_record(*refused, level=logging.INFO))
    assert repeats.filter(_record(*refused, level=logging.INFO))


def test_a_line_with_a_percent_sign_is_told_as_it_was() -> None:
    now = [0.0]
    repeats = RepeatFilter(window=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 11.0):
        now[0] = t
        record = _record("%s", "disk at 100% of its quota")
        kept = repeats.filter(record)
    assert kept
    assert record.getMessage() == "disk at 100% of its quota (repeated 1 times since last logged)"


@pytest.fixture
def pristine_aiokafka() -> Iterator[None]:
    """aiokafka as it is before install() (which a CLI test in this process may have run),
    and as the process had it again after the test."""
    refresh = AIOKafkaClient._metadata_update
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name == "aiokafka" or name.startswith("aiokafka.")
    ]
    filters = {logger.name: list(logger.filters) for logger in loggers}
    AIOKafkaClient._metadata_update = getattr(refresh, "__wrapped__", refresh)  # type: ignore[method-assign]
    for logger in loggers:
        logger.filters = [f for f in logger.filters if not isinstance(f, RepeatFilter)]
    yield
    AIOKafkaClient._metadata_update = refresh  # type: ignore[method-assign]
    for logger in loggers:
        logger.filters = filters[logger.name]


def test_install_wraps_the_refresh_once_and_filters_every_aiokafka_logger(
    pristine_aiokafka: None,
) -> None:
    original = AIOKafkaClient._metadata_update
    kafka_outage.install()
    wrapped = AIOKafkaClient._metadata_update
    assert wrapped is not original
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    kafka_outage.install()
    assert AIOKafkaClient._metadata_update is wrapped
    # aiokafka's client logs as "aiokafka", the others by module
    for name in ("aiokafka", "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RepeatFilter) for f in filters) == 1, name


class _Consumer:
    """A consumer whose stop() raises what aiokafka's does with a fetch in flight."""

    def __init__(self, started: asyncio.Event | None = None) -> None:
        self.started = started

    async def stop(self) -> None:
        if self.started is not None:  # a stop that takes a while: the caller may be cancelled
            self.started.set()
            await asyncio.sleep(10)
        raise asyncio.CancelledError


def test_a_consumer_stopped_with_its_fetches_unfinished_stops_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(kafka_outage.stop_consumer(_Consumer()))  # type: ignore[arg-type]
    assert "stopped with fetches to the broker unfinished" in caplog.text


def test_a_cancelled_caller_is_still_cancelled() -> None:
    async def run() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(kafka_outage.stop_consumer(_Consumer(started)))  # type: ignore[arg-type]
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
