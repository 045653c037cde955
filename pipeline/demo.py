"""The local demo: a broker, the topics, a worker process and the generator, end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

from pipeline.generator import EVENTS_PER_CASE, TrafficGenerator
from pipeline.kafka_local import LocalBroker
from pipeline.metrics import parse_exposition, sample_sum
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS, ensure_topics
from pipeline.traffic import Limits, publish_traffic

Echo = Callable[[str], None]


def fetch_metrics(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _processed(text: str | None, settings: Settings) -> dict[str, tuple[float, float]]:
    samples = parse_exposition(text or "")
    return {
        name: (
            sample_sum(samples, "loopline_events_total", topic=settings.topic(name), status="ok"),
            sample_sum(
                samples, "loopline_events_total", topic=settings.topic(name), status="dead_letter"
            ),
        )
        for name in SOURCE_TOPICS
    }


def run_demo(
    settings: Settings, duration: float, rate: float, keep_kafka: bool, echo: Echo
) -> None:
    port = int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    broker = LocalBroker(settings.kafka_home, port)
    started_broker = not broker.status().running
    echo(broker.up(echo=echo).describe())
    created = asyncio.run(ensure_topics(settings))
    echo(f"topics: created {', '.join(created)}" if created else "topics: all exist")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    worker_log = settings.data_dir / "demo-worker.log"
    url = f"http://{settings.web_host}:{settings.web_port}/metrics"
    with worker_log.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        echo(f"worker started (pid {worker.pid}, log {worker_log}); metrics at {url}")
        deadline = time.monotonic() + 90
        while fetch_metrics(url) is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {worker_log}")
            time.sleep(0.5)
        echo(f"generating {rate:,.0f} events/s for {duration:,.0f}s ...")
        events = TrafficGenerator(
            seed=int(time.time()), start=datetime.now(UTC), cases_per_second=rate / EVENTS_PER_CASE
        )
        published = asyncio.run(
            publish_traffic(settings, events, Limits(duration=duration, rate=rate), echo)
        )
        deadline = time.monotonic() + 60
        processed = _processed(fetch_metrics(url), settings)
        while any(sum(processed[t]) < published[t] for t in SOURCE_TOPICS):
            if time.monotonic() > deadline:
                echo("the worker has not caught up after 60s; numbers below are partial")
                break
            time.sleep(1)
            processed = _processed(fetch_metrics(url), settings)
        echo(f"\n{'topic':<28}{'published':>12}{'processed':>12}{'dead-lettered':>15}")
        for name in SOURCE_TOPICS:
            ok, dead = processed[name]
            echo(f"{settings.topic(name):<28}{published[name]:>12,}{int(ok):>12,}{int(dead):>15,}")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if started_broker and not keep_kafka:
            broker.down()
            echo("kafka stopped")
        else:
            echo(f"kafka left running at {broker.bootstrap}: 'loopline kafka down' stops it")
