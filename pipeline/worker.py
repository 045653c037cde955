"""Run one loopline worker process (the Faust worker) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

import faust
import uvloop

from agents import dispatch, fetch
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


def run_worker(settings: Settings) -> None:
    run_app(settings, lambda: create_app(settings, PipelineMetrics.create(), Codec.load()))


def run_app(settings: Settings, build: Callable[[], faust.App]) -> None:
    """Run the Faust app that ``build`` makes as the worker runs: on uvloop, with the topics
    created, the collector thresholds below and fewer per-message costs (``make_worker``)."""
    (settings.data_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    kafka_outage.install()
    loop = worker_event_loop()
    asyncio.set_event_loop(loop)
    ensured = loop.run_until_complete(ensure_topics(settings))
    if ensured.created or ensured.raised:
        log.info("topics: %s", ensured.describe())
    app = build()
    gc.freeze()  # what start-up loaded stays: no collection needs to look at it again
    gc.set_threshold(*GC_THRESHOLDS)
    make_worker(app, settings, loop).execute_from_commandline()


def worker_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop, and uvloop for the loops the worker's threads make (Faust runs the
    Kafka consumer in a thread of its own). The worker is one busy event loop, and uvloop's
    futures, handles and sockets cost less per message than asyncio's (bench/throughput,
    N = 400,000: 10,901 -> 12,078 events/s). Faust supports it (its ``uvloop`` extra)."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.new_event_loop()


def make_worker(
    app: faust.App, settings: Settings, loop: asyncio.AbstractEventLoop
) -> faust.Worker:
    """The Faust worker for ``app``, with four of Faust's per-message costs taken out."""
    worker = faust.Worker(app, loglevel=settings.log_level, loop=loop, redirect_stdouts=False)
    # No terminal spinner: at a log level of WARNING or above it sets the root logger to DEBUG
    # (to spin on every record), so every debug call of Faust and aiokafka built a record, one
    # per message sent (a twentieth of the worker's time), and it only draws on a terminal.
    worker.spinner = None
    fetch.install(app.consumer)
    dispatch.install(app.consumer)
    dispatch.install_ebb(app.producer.buffer)
    return worker
