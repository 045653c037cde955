"""Run one loopline worker process (the Faust worker) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import faust

from pipeline.app import create_app
from pipeline.codec import Codec
from pipeline.metrics import PipelineMetrics
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    (settings.data_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    created = loop.run_until_complete(ensure_topics(settings))
    if created:
        log.info("created topics %s", ", ".join(created))
    app = create_app(settings, PipelineMetrics.create(), Codec.load())
    worker = faust.Worker(app, loglevel=settings.log_level, loop=loop, redirect_stdouts=False)
    worker.execute_from_commandline()
