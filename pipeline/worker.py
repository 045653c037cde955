"""Run one loopline worker process (the Faust worker) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import faust
import uvloop

from agents import dispatch, fetch, seek
from agents.state import applied_offset
from pipeline import kafka_outage
from pipeline.app import create_app
from pipeline.codec import Codec
from pipeline.metrics import PipelineMetrics
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

log = logging.getLogger(__name__)

#: Collector thresholds for the worker. Its state is hundreds of thousands of long-lived
#: objects (cases, buckets), and at the defaults (700, 10, 10) the collector went through
#: them so often that it cost a sixth of the worker's time (bench/throughput: 6,768 -> 8,011
#: events/s). The state holds no reference cycles; Faust's few are still collected.
GC_THRESHOLDS = (50_000, 20, 100)

#: How long a worker may take to stop cleanly (leave its group, close its clients), asked to
#: (SIGTERM, Ctrl-C) or crashed. Faust's stop can hang in its wait for the streams: a failed
#: batch stays in hand, never acked, and with the broker away a batch waits for its writes
#: (Faust gives the producer 20 min). Past this the process exits as SIGKILL would stop it,
#: which its checkpoints are made for: a supervisor restarts a crashed worker instead of it
#: holding its partitions idle, and an operator's stop stops.
STOP_GRACE_SECONDS = 20.0
PRE_START_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
UNSTOPPED_EXIT_CODE = 1


def run_worker(settings: Settings) -> None:
    metrics = PipelineMetrics.create()
    run_app(settings, lambda s: create_app(s, metrics, Codec.load()), metrics)


def run_app(
    settings: Settings,
    build: Callable[[Settings], faust.App],
    metrics: PipelineMetrics | None = None,
) -> None:
    """Run the Faust app that ``build`` makes as the worker runs: on uvloop, with the topics
    created, the collector thresholds below and fewer per-message costs (``make_worker``).
    ``build`` gets the settings with the source topics' partition count, which is what the
    worker reads whatever LOOPLINE_PARTITIONS says (an operator may have added partitions)."""
    (settings.data_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    # Lines logged before Faust sets up its logging (which replaces this handler) were dropped.
    logging.basicConfig(level=settings.log_level.upper(), format=PRE_START_LOG_FORMAT)
    kafka_outage.install()
    loop = worker_event_loop()
    asyncio.set_event_loop(loop)
    ensured = loop.run_until_complete(ensure_topics(settings))
    if ensured.changed:
        log.info("topics: %s", ensured.describe())
    if ensured.partitions != settings.partitions:
        log.warning(
            "the source topics have %d partitions, LOOPLINE_PARTITIONS says %d: the worker "
            "goes by the topics",
            ensured.partitions,
            settings.partitions,
        )
        settings = dataclasses.replace(settings, partitions=ensured.partitions)
    app = build(settings)
    gc.freeze()  # what start-up loaded stays: no collection needs to look at it again
    gc.set_threshold(*GC_THRESHOLDS)
    make_worker(app, settings, loop, metrics).execute_from_commandline()


def worker_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop, and uvloop for the loops the worker's threads make (Faust runs the
    Kafka consumer in a thread of its own). The worker is one busy event loop, and uvloop's
    futures, handles and sockets cost less per message than asyncio's (bench/throughput,
    N = 400,000: 10,901 -> 12,078 events/s). Faust supports it (its ``uvloop`` extra)."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.new_event_loop()


def make_worker(
    app: faust.App,
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    metrics: PipelineMetrics | None = None,
) -> faust.Worker:
    """The Faust worker for ``app``, with four of Faust's per-message costs taken out and a
    deadline on its stop; its consumer reads committed records only (``read_committed``) and
    refetches what a rebalance left unprocessed also before its first commit (agents.seek), and
    records Kafka deleted before its state applied them are counted in ``metrics``
    (pipeline.offsetresets)."""
    worker = faust.Worker(app, loglevel=settings.log_level, loop=loop, redirect_stdouts=False)
    # No terminal spinner: at a log level of WARNING or above it sets the root logger to DEBUG
    # (to spin on every record), so every debug call of Faust and aiokafka built a record, one
    # per message sent (a twentieth of the worker's time), and it only draws on a terminal.
    worker.spinner = None
    on_deleted = None if metrics is None else metrics.count_deleted_unread
    fetch.install(app.consumer, on_deleted, applied_offset(app))
    seek.install(app.consumer)
    read_committed(app.consumer)
    dispatch.install(app.consumer)
    dispatch.install_ebb(app.producer.buffer)
    exit_if_stop_hangs(app, STOP_GRACE_SECONDS)
    return worker


def read_committed(consumer: Any) -> None:
    """Have Faust's Kafka consumer (not started yet) read committed records only. Faust reads
    uncommitted ones unless it runs exactly-once itself, so the records a service's aborted
    Kafka transaction left in the log counted as events. Records of producers that use no
    transactions (loopline's own, most services') are all committed: nothing changes for them."""
    thread = consumer._thread
    create = thread._create_worker_consumer

    def committed_only(transport: Any) -> Any:
        client = create(transport)
        client._isolation_level = "read_committed"  # read by the client's start, not before
        return client

    thread._create_worker_consumer = committed_only


def exit_if_stop_hangs(app: faust.App, grace_seconds: float) -> None:
    """Once the app starts to stop or crashes, exit the process ``grace_seconds`` later if it
    has not stopped by then (a daemon timer: a stop that ends first ends the process)."""
    deadline = threading.Timer(grace_seconds, _exit_unstopped, (grace_seconds,))
    deadline.daemon = True
    clean_crash, clean_stop = app.crash, app.stop

    def arm() -> None:
        if not deadline.is_alive():
            deadline.start()

    async def crash(reason: BaseException) -> None:
        arm()
        await clean_crash(reason)

    async def stop() -> None:
        arm()
        await clean_stop()

    app.crash, app.stop = crash, stop  # type: ignore[method-assign]


def _exit_unstopped(grace_seconds: float) -> None:
    log.error(
        "the worker did not stop within %.0f s (is the broker reachable?): exiting now, as "
        "SIGKILL would stop it; its state is in its changelogs",
        grace_seconds,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(UNSTOPPED_EXIT_CODE)
