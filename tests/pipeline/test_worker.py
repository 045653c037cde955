"""The worker process's Faust set-up (pipeline.worker), without a broker."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from faust.types import TP

from agents.fetch import FetchLoop
from pipeline.app import create_app
from pipeline.codec import Codec
from pipeline.metrics import PipelineMetrics, parse_exposition
from pipeline.settings import Settings
from pipeline.worker import make_worker, worker_event_loop


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield loop
    root.handlers[:], root.level = handlers, level  # the worker configures the root logger
    asyncio.set_event_loop(None)
    loop.close()


@pytest.mark.parametrize("log_level", ["warning", "info"])
def test_debug_records_are_not_built_at_a_higher_level(
    loop: asyncio.AbstractEventLoop, tmp_path: Path, log_level: str
) -> None:
    settings = Settings.from_env({}, data_dir=tmp_path, log_level=log_level)
    app = create_app(settings, PipelineMetrics.create(), Codec.load())
    worker = make_worker(app, settings, loop)
    worker._setup_logging()  # as the worker does when it starts
    # aiokafka logs every message it sends at debug level
    assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.getLevelName(
        log_level.upper()
    )
    # but aiokafka says an offset reset at INFO only (agents.fetch.OffsetResets hears it)
    assert logging.getLogger("aiokafka.consumer.fetcher").isEnabledFor(logging.INFO)


def test_the_consumer_hands_messages_over_on_the_fast_path(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    settings = Settings.from_env({}, data_dir=tmp_path)
    app = create_app(settings, PipelineMetrics.create(), Codec.load())
    make_worker(app, settings, loop)
    consumer: Any = app.consumer
    assert consumer.wait_first.__module__ == "agents.dispatch"
    assert isinstance(consumer._drain_messages.__self__, FetchLoop)  # whole fetches
    # the end-of-rebalance seek covers partitions never committed (agents.seek)
    assert consumer._thread.seek_to_committed.__qualname__ == "install.<locals>.seek"
    assert consumer._thread.seek_to_committed.__module__ == "agents.seek"


def test_metrics_show_how_many_changelog_records_are_left_to_restore(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    settings = Settings.from_env({}, data_dir=tmp_path)
    metrics = PipelineMetrics.create()
    app = create_app(settings, metrics, Codec.load())
    recovery: Any = cast(Any, app.tables).recovery
    changelog = TP(f"{settings.app_id}-partition-state-changelog", 0)
    recovery.active_highwaters[changelog] = 4_999  # Faust's: the last offset to read
    recovery.active_offsets[changelog] = 1_999  # and the last one read
    recovery.in_recovery = True
    gauge = ("loopline_restore_remaining_records", frozenset[tuple[str, str]]())
    assert parse_exposition(metrics.exposition().decode())[gauge] == 3_000
    recovery.in_recovery = False  # restored
    assert parse_exposition(metrics.exposition().decode())[gauge] == 0


def test_the_worker_and_the_loops_of_its_threads_are_uvloop() -> None:
    policy = asyncio.get_event_loop_policy()
    made: list[asyncio.AbstractEventLoop] = []
    try:
        made.append(worker_event_loop())
        # as mode's ServiceThread makes the loop of Faust's consumer thread
        thread = threading.Thread(target=lambda: made.append(asyncio.new_event_loop()))
        thread.start()
        thread.join()
        assert [type(loop) for loop in made] == [uvloop.Loop, uvloop.Loop]
    finally:
        asyncio.set_event_loop_policy(policy)
        for loop in made:
            loop.close()


def test_the_group_session_and_static_membership_come_from_the_settings() -> None:
    from pipeline.app import faust_app

    conf = faust_app(Settings(session_timeout_seconds=120, instance_id="worker-a")).conf
    assert conf.broker_session_timeout == 120
    assert conf.broker_heartbeat_interval == 3.0
    assert conf.broker_request_timeout == 120  # Faust refuses a session longer than a request
    assert conf.consumer_group_instance_id == "worker-a"
    short = faust_app(Settings(session_timeout_seconds=6)).conf
    assert (short.broker_heartbeat_interval, short.broker_request_timeout) == (2.0, 90.0)
    assert short.consumer_group_instance_id is None


def test_tables_have_no_standby_copies() -> None:
    # Faust's default is one: every worker would read every other's changelog records, one
    # message at a time, into a copy the memory store never uses (pipeline.app).
    from pipeline.app import faust_app

    app = faust_app(Settings())
    assert app.conf.table_standby_replicas == 0
    assert app.assignor.replicas == 0  # type: ignore[attr-defined]
