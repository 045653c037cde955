"""Throughput benchmark: the loopline worker vs. raw aiokafka + decode of the same topic.

Publishes N generated events once, then measures in the same run:
  (a) baseline: aiokafka getmany over every partition + the codec's decode, until all N are read
      (on uvloop, the worker's event loop);
  (b) a `loopline worker` process (or `--workers K` of them, one consumer group) computing the
      five numbers until it has processed all N;
and prints events/s of each, the ratio b/a, the workers' peak RSS (summed; and RSS samples, to
see whether memory stays flat), and p99 freshness: publish one resolution -> visible on
/metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.codec import Codec
from pipeline.demo import fetch_metrics
from pipeline.generator import TrafficGenerator
from pipeline.kafka_local import LocalBroker
from pipeline.metrics import parse_exposition, sample_sum
from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS, ensure_topics


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def bench_settings(port: int, **overrides: Any) -> Iterator[Settings]:
    """Settings with a fresh topic prefix and app id on the local broker at ``port``; the broker
    is started if it is down, and then stopped again afterwards."""
    broker = LocalBroker(Settings.from_env().kafka_home, port)
    started_broker = not broker.status().running
    if started_broker:
        broker.wipe()  # each run makes its own topics; old runs' would only pile up
    broker.up(echo=log)
    tag = uuid.uuid4().hex[:8]
    try:
        yield Settings(
            bootstrap_servers=broker.bootstrap,
            topic_prefix=f"bench{tag}.",
            app_id=f"bench-{tag}",
            **overrides,
        )
    finally:
        if started_broker:
            broker.down()


async def publish(settings: Settings, count: int) -> None:
    await ensure_topics(settings)
    events = TrafficGenerator(1, datetime(2026, 11, 25, tzinfo=UTC), cases_per_second=200.0)
    started = time.monotonic()
    async with Publisher(settings) as publisher:
        for n, (topic, record) in enumerate(islice(events, count), 1):
            await publisher.publish(topic, record)
            if n % 100_000 == 0:
                log(f"published {n:,} ({n / (time.monotonic() - started):,.0f}/s)")


async def baseline(settings: Settings, count: int) -> float:
    codec = Codec.load()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    parts = [
        TopicPartition(settings.topic(t), p)
        for t in SOURCE_TOPICS
        for p in range(settings.partitions)
    ]
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    seen, started = 0, time.monotonic()
    try:
        while seen < count:
            for messages in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                for message in messages:
                    codec.decode(message.value)
                seen += len(messages)
    finally:
        await consumer.stop()
    return count / (time.monotonic() - started)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def scrape(urls: list[str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of every worker's /metrics, added up (each counts its own events)."""
    total: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for url in urls:
        for key, value in parse_exposition(fetch_metrics(url) or "").items():
            total[key] = total.get(key, 0.0) + value
    return total


STATUSES = ("ok", "duplicate", "too_late", "dead_letter")


def by_status(urls: list[str]) -> dict[str, int]:
    """The workers' events by status: what was counted, and what was not (too late, say)."""
    samples = scrape(urls)
    return {s: round(sample_sum(samples, "loopline_events_total", status=s)) for s in STATUSES}


def processed(urls: list[str]) -> float:
    return sum(by_status(urls).values())


def source_lag(urls: list[str], settings: Settings) -> str:
    """The workers' consumer lag per source partition (summed over the source topics), to see
    whether they consume the partitions evenly."""
    samples = scrape(urls)
    by_partition = [
        sum(
            sample_sum(
                samples,
                "loopline_consumer_lag_messages",
                topic=settings.topic(t),
                partition=str(p),
            )
            for t in SOURCE_TOPICS
        )
        for p in range(settings.partitions)
    ]
    return " ".join(f"{n:,.0f}" for n in by_partition)


async def freshness(settings: Settings, urls: list[str], probes: int) -> list[float]:
    delays = []
    async with Publisher(settings) as publisher:
        for n in range(probes):
            record = {
                "event_id": f"probe-{uuid.uuid4()}",
                "case_id": f"probe-{n}",
                "loop": "bench-probe",
                "ts": datetime.now(UTC),
                "resolver": "SYSTEM",
                "outcome": "RESOLVED",
                "release": "bench",
            }
            before = sample_sum(scrape(urls), "loopline_resolutions_total", loop="bench-probe")
            started = time.monotonic()
            await publisher.publish("resolutions", record)
            await publisher.flush()
            for _ in range(6000):  # poll /metrics for up to a minute
                samples = await asyncio.to_thread(scrape, urls)
                seen = sample_sum(samples, "loopline_resolutions_total", loop="bench-probe")
                if seen > before:
                    break
                await asyncio.sleep(0.01)
            else:
                raise SystemExit("a probe did not show up on /metrics within a minute")
            delays.append(time.monotonic() - started)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=39092, help="local broker port")
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (the baseline is one consumer)"
    )
    parser.add_argument(
        "--lateness-seconds",
        type=int,
        default=None,
        help="the worker's allowed lateness and SLA (state is kept for twice this much event "
        "time; the default 1 h is longer than the events span, so state grows throughout)",
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="loopline-bench-"))
    with bench_settings(args.port, data_dir=data_dir, web_port=6099) as settings:
        log(f"publishing {args.events:,} events to {settings.topic_prefix}* ...")
        asyncio.run(publish(settings, args.events))
        log("baseline: aiokafka getmany + decode ...")
        # on the worker's event loop too (pipeline.worker), so that the ratio compares the work
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            base_rate = runner.run(baseline(settings, args.events))
        log(f"baseline: {base_rate:,.0f} events/s")

        env = dict(
            os.environ,
            LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
            LOOPLINE_TOPIC_PREFIX=settings.topic_prefix,
            LOOPLINE_APP_ID=settings.app_id,
            LOOPLINE_DATA_DIR=str(data_dir),
            LOOPLINE_LOG_LEVEL="warning",
        )
        if args.lateness_seconds:
            env["LOOPLINE_ALLOWED_LATENESS_SECONDS"] = str(args.lateness_seconds)
            env["LOOPLINE_SLA_SECONDS"] = str(args.lateness_seconds)
        ports = [settings.web_port + n for n in range(args.workers)]
        urls = [f"http://127.0.0.1:{port}/metrics" for port in ports]
        workers = []
        for n, port in enumerate(ports):
            with (data_dir / f"worker-{n}.log").open("wb") as worker_log:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline.cli", "worker"],
                        env=dict(env, LOOPLINE_WEB_PORT=str(port)),
                        stdout=worker_log,
                        stderr=subprocess.STDOUT,
                    )
                )
        try:
            while processed(urls) == 0:
                if any(w.poll() is not None for w in workers):
                    raise SystemExit(f"a worker exited; see {data_dir}/worker-*.log")
                time.sleep(0.05)
            first = time.monotonic()
            samples: list[int] = []
            last_report = first
            while (done := processed(urls)) < args.events:
                # A scrape renders every series (~10 ms of the worker's time): once a second
                # until the end is near, then five times a second for the end's resolution.
                time.sleep(1.0 if done < 0.9 * args.events else 0.2)
                if time.monotonic() - last_report > 5:
                    last_report = time.monotonic()
                    samples.append(sum(rss_kib(w.pid, "VmRSS") for w in workers))
                    log(
                        f"workers: {done:,.0f} processed, RSS {samples[-1] / 1024:,.0f} MiB, "
                        f"lag by partition {source_lag(urls, settings)}"
                    )
            worker_rate = args.events / (time.monotonic() - first)
            statuses = by_status(urls)
            if statuses["ok"] != args.events:  # the generator's events are all valid and new
                log(f"warning: the workers did not count every event: {statuses}")
            peak = sum(rss_kib(w.pid, "VmHWM") for w in workers)
            log("freshness probes ...")
            delays = sorted(asyncio.run(freshness(settings, urls, args.probes)))
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=60)
        p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
        result = {
            "events": args.events,
            "workers": args.workers,
            "baseline_events_per_s": round(base_rate),
            "worker_events_per_s": round(worker_rate),
            "ratio": round(worker_rate / base_rate, 3),
            "worker_events_by_status": statuses,
            "worker_peak_rss_mib": round(peak / 1024, 1),
            "worker_rss_samples_mib": [round(s / 1024) for s in samples],
            "freshness_p50_s": round(statistics.median(delays), 3),
            "freshness_p99_s": round(p99, 3),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
