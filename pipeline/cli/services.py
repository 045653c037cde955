"""The long-running commands: ``loopline worker``, ``review`` and ``demo``."""

from __future__ import annotations

import dataclasses
import logging

import click

from pipeline.cli.common import (
    core_config,
    err,
    kafka_refusals_as_reasons,
    on_kafka,
    require_free_port,
    settings_of,
)
from pipeline.clitypes import positive_number
from pipeline.demo import SPEEDUP
from pipeline.kafka_local import BrokerError
from pipeline.topics import ensure_topics

REVIEW_LOG_FORMAT = "[%(asctime)s] [%(levelname)s] %(name)s: %(message)s"


@click.command("worker")
@click.option(
    "--web-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of /metrics (LOOPLINE_WEB_PORT, default 6066).",
)
@click.pass_context
def worker(ctx: click.Context, web_port: int | None) -> None:
    """Run a stream-processing worker until Ctrl-C / SIGTERM."""
    from pipeline.worker import run_worker

    settings = settings_of(ctx)
    if web_port is not None:
        settings = dataclasses.replace(settings, web_port=web_port)
    core_config(settings)  # a bad rules file stops the worker here, with the reason
    where = "LOOPLINE_WEB_PORT or --web-port"
    require_free_port(settings.web_host, settings.web_port, "/metrics", where)
    with kafka_refusals_as_reasons(settings):
        run_worker(settings)


@click.command("review")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="LOOPLINE_REVIEW_PORT (6070)."
)
@click.pass_context
def review(ctx: click.Context, port: int | None) -> None:
    """The reviewers' page: the eval-candidate queue, decisions to loopline.reviews.

    Needs LOOPLINE_REVIEW_TOKEN (the login token; never printed). Sessions are signed with
    LOOPLINE_REVIEW_SECRET, or a random key per process (then a restart logs everyone out).
    """
    import uvicorn

    from pipeline.review.web import create_review_app

    settings = settings_of(ctx)
    try:
        app = create_review_app(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    chosen = port or settings.review_port
    where = "LOOPLINE_REVIEW_PORT or --port"
    require_free_port(settings.web_host, chosen, "the review page", where)
    ensured = on_kafka(settings, ensure_topics(settings))
    if ensured.changed:
        err(f"topics: {ensured.describe()}")
    err(f"review page on http://{settings.web_host}:{chosen}/ (log in with the review token)")
    # the page's own lines (a decision Kafka confirmed late, the queue loaded) at the log level
    logging.basicConfig(level=settings.log_level.upper(), format=REVIEW_LOG_FORMAT)
    uvicorn.run(app, host=settings.web_host, port=chosen, log_level=settings.log_level)


@click.command("demo")
@click.option(
    "--duration",
    type=positive_number(),
    default=30.0,
    show_default=True,
    help="Seconds of generated traffic.",
)
@click.option(
    "--rate",
    type=positive_number(),
    default=500.0,
    show_default=True,
    help="Events per second.",
)
@click.option(
    "--speedup",
    type=positive_number(),
    default=SPEEDUP,
    show_default=True,
    help="How many times faster than the clock event time runs: the traffic spans duration x "
    "speedup of event time, ending now, so that the alert rules' evaluations (one a minute of "
    "event time) show in a short run. 1 runs in real time.",
)
@click.option("--keep-kafka", is_flag=True, help="Leave the local broker running afterwards.")
@click.option(
    "--keep-state",
    is_flag=True,
    help="Keep the topics, state and archive of earlier demo runs (by default a broker the "
    "demo starts is emptied first when only a demo made its data, and so is such an archive).",
)
@click.option(
    "--stay", is_flag=True, help="After the traffic, keep everything running until Ctrl-C."
)
@click.pass_context
def demo(
    ctx: click.Context,
    duration: float,
    rate: float,
    speedup: float,
    keep_kafka: bool,
    keep_state: bool,
    stay: bool,
) -> None:
    """The local demo: Kafka, topics, a worker, the archive sink, the review page and the
    generator (drift onset and cost spike half-way); Ctrl-C stops it all cleanly."""
    from pipeline.demo import DemoTraffic, run_demo

    try:
        run_demo(
            settings_of(ctx),
            DemoTraffic(duration, rate, speedup),
            keep_kafka=keep_kafka,
            echo=err,
            stay=stay,
            keep_state=keep_state,
        )
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
