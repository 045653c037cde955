"""Throughput benchmark: the loopline worker vs. raw aiokafka + decode of the same topic.

Publishes N generated events once, then measures in the same run:
  (a) baseline: aiokafka getmany over every partition + the codec's decode, until all N are read
      (on uvloop, the worker's event loop), once before (b) and once after it: the machine's
      speed drifts, and the two together bracket the worker's run;
  (b) a `loopline worker` process (or `--workers K` of them, one consumer group) computing the
      five numbers until it has processed all N;
and prints events/s of each, the ratio b/a, the CPU time each spends per event (user + system;
on a shared machine it moves nearly as much as the wall clock: docs/benchmark.md), the workers'
peak RSS (summed; RSS samples, to see whether memory stays flat; and RSS at the end with the
cases held then), and p99 freshness: publish one resolution -> visible on /metrics.
``--profile FILE`` py-spies the first worker during the measured phase. Then, as what bounds
(b): (c) the worker's Faust set-up alone, handling the same events with no work but counting
them, and decoding them (bench/faust_only.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
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


def worker_env(settings: Settings, log_level: str) -> dict[str, str]:
    """The environment of a `loopline worker` (or bench/faust_only.py) on ``settings``."""
    return dict(
        os.environ,
        LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        LOOPLINE_TOPIC_PREFIX=settings.topic_prefix,
        LOOPLINE_APP_ID=settings.app_id,
        LOOPLINE_DATA_DIR=str(settings.data_dir),
        LOOPLINE_LOG_LEVEL=log_level,
    )


async def publish(settings: Settings, count: int) -> int:
    """Publish ``count`` generated events; returns the newest one's event time (epoch ms)."""
    await ensure_topics(settings)
    events = TrafficGenerator(1, datetime(2026, 11, 25, tzinfo=UTC), cases_per_second=200.0)
    started, newest = time.monotonic(), 0
    async with Publisher(settings) as publisher:
        for n, (topic, record) in enumerate(islice(events, count), 1):
            await publisher.publish(topic, record)
            newest = max(newest, record["ts"])
            if n % 100_000 == 0:
                log(f"published {n:,} ({n / (time.monotonic() - started):,.0f}/s)")
    return newest


async def baseline(settings: Settings, count: int) -> tuple[float, float]:
    """Events/s, and CPU seconds per event of this process (it does nothing else meanwhile)."""
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
    seen, started, cpu = 0, time.monotonic(), time.process_time()
    try:
        while seen < count:
            for messages in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                for message in messages:
                    codec.decode(message.value)
                seen += len(messages)
    finally:
        await consumer.stop()
    return count / (time.monotonic() - started), (time.process_time() - cpu) / count


def run_baseline(settings: Settings, count: int) -> tuple[float, float]:
    """One baseline pass on the worker's event loop (pipeline.worker), so that the ratio
    compares the work: events/s and CPU seconds per event."""
    log("baseline: aiokafka getmany + decode ...")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rate, cpu = runner.run(baseline(settings, count))
    log(f"baseline: {rate:,.0f} events/s, {cpu * 1e6:.1f} us CPU an event")
    return rate, cpu


def bracketed(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Baseline passes as one: events/s over their whole time, and mean CPU per event."""
    return len(runs) / sum(1 / rate for rate, _ in runs), sum(cpu for _, cpu in runs) / len(runs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Share = tuple[float, str]  # (share of the samples, function)


def scrape(urls: list[str]) -> Samples:
    """The samples of every worker's /metrics, added up (each counts its own events)."""
    total: Samples = {}
    for url in urls:
        for key, value in parse_exposition(fetch_metrics(url) or "").items():
            total[key] = total.get(key, 0.0) + value
    return total


STATUSES = ("ok", "duplicate", "too_late", "dead_letter")


def by_status(samples: Samples) -> dict[str, int]:
    """The workers' events by status: what was counted, and what was not (too late, say)."""
    return {s: round(sample_sum(samples, "loopline_events_total", status=s)) for s in STATUSES}


def processed(samples: Samples) -> float:
    return sum(by_status(samples).values())


def poll_seconds(done: float, total: int, rate: float) -> float:
    """How long to wait before looking at the workers' progress again: half the time the rest
    should take at ``rate``, within 0.1-5 s. A scrape costs the worker (it renders every
    series, and its garbage adds to the collector's work), so the bench looks rarely while
    the end is far and ever more often as it nears, to time the end within 0.1 s."""
    remaining = (total - done) / rate if rate > 0 else float("inf")
    return min(5.0, max(0.1, remaining / 2))


def source_lag(samples: Samples, settings: Settings) -> str:
    """The workers' consumer lag per source partition (summed over the source topics), to see
    whether they consume the partitions evenly."""
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


def start_profile(pid: int, path: Path, seconds: int) -> subprocess.Popen[bytes]:
    """py-spy the worker's main thread while it holds the GIL (what limits it), as collapsed
    stacks, for ``seconds`` or until the measured phase ends."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[profile]'")
    log(f"profiling worker {pid} for up to {seconds} s into {path}")
    command = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100"]
    command += ["--gil", "--format", "raw", "--output", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profile(profiler: subprocess.Popen[bytes], path: Path) -> None:
    """End the profile with the measured phase (the freshness probes jump event time, which
    would profile an unrepresentative mass expiry), then log where the time went."""
    if profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes what it has
    _, errors = profiler.communicate(timeout=60)
    if not path.exists():
        log(f"py-spy wrote no profile: {errors.decode(errors='replace').strip()}")
        return
    total, inclusive, own = hottest(path.read_text())
    log(f"profile: {total} samples; inclusive, then self:")
    for label, rows in (("incl", inclusive), ("self", own)):
        for share, frame in rows:
            log(f"  {label} {share:5.1%} {frame}")


def hottest(collapsed: str, top: int = 25) -> tuple[int, list[Share], list[Share]]:
    """From py-spy's collapsed stacks (``frame;frame;... count`` per line): the sample count,
    and the ``top`` functions by share of samples anywhere on the stack (each counted once per
    stack; the outer frames under which nearly every sample falls, 90 % or more, left out) and
    as the innermost frame. A frame is named ``function (dir/file)``, line numbers dropped."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_function(frame) for frame in stack.split(";")]
        for frame in dict.fromkeys(frames):  # once per stack, in stack order
            inclusive[frame] += n
        own[frames[-1]] += n
    if total == 0:
        return 0, [], []
    return (
        total,
        [(n / total, f) for f, n in inclusive.most_common() if n < 0.9 * total][:top],
        [(n / total, f) for f, n in own.most_common(top)],
    )


def _function(frame: str) -> str:
    """``name (path/to/file.py:12)`` -> ``name (to/file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({'/'.join(where.split(':', 1)[0].split('/')[-2:])})" if where else name


def faust_only(mode: str, count: int, env: dict[str, str]) -> dict[str, Any]:
    """bench/faust_only.py's result in ``mode`` (the worker's Faust set-up without its work)
    over the first ``count`` events of the source topics: mode, events and events_per_s."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("faust_only.py")), mode, str(count)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120 + count / 5000,  # start-up, then far slower than any run measured here
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise SystemExit(
        f"bench/faust_only.py {mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    )


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
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="py-spy the first worker from half of the events on, into FILE (collapsed "
        "stacks), and log its hottest functions (needs the 'profile' extra)",
    )
    parser.add_argument("--profile-seconds", type=int, default=20, metavar="S")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="loopline-bench-"))
    with bench_settings(args.port, data_dir=data_dir, web_port=6099) as settings:
        log(f"publishing {args.events:,} events to {settings.topic_prefix}* ...")
        asyncio.run(publish(settings, args.events))
        baselines = [run_baseline(settings, args.events)]

        env = worker_env(settings, "warning")
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
            while processed(scrape(urls)) == 0:
                if any(w.poll() is not None for w in workers):
                    raise SystemExit(f"a worker exited; see {data_dir}/worker-*.log")
                time.sleep(0.05)
            first = time.monotonic()
            cpu_first = sum(cpu_seconds(w.pid) for w in workers)
            samples: list[int] = []
            last_report = first
            profiler = None
            while (done := processed(metrics := scrape(urls))) < args.events:
                now = time.monotonic()
                if now - last_report >= 5:
                    last_report = now
                    samples.append(sum(rss_kib(w.pid, "VmRSS") for w in workers))
                    log(
                        f"workers: {done:,.0f} processed, RSS {samples[-1] / 1024:,.0f} MiB, "
                        f"lag by partition {source_lag(metrics, settings)}"
                    )
                if args.profile and profiler is None and done >= args.events / 2:
                    profiler = start_profile(workers[0].pid, args.profile, args.profile_seconds)
                time.sleep(poll_seconds(done, args.events, done / max(now - first, 1e-3)))
            worker_rate = args.events / (time.monotonic() - first)
            worker_cpu = (sum(cpu_seconds(w.pid) for w in workers) - cpu_first) / args.events
            log(f"workers: {worker_rate:,.0f} events/s, {worker_cpu * 1e6:.1f} us CPU an event")
            if profiler is not None:
                stop_profile(profiler, args.profile)
            end = scrape(urls)
            statuses = by_status(end)
            held = round(sample_sum(end, "loopline_held_cases"))
            rss_now = sum(rss_kib(w.pid, "VmRSS") for w in workers)
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
        baselines.append(run_baseline(settings, args.events))  # after, as the machine is now
        base_rate, base_cpu = bracketed(baselines)
        alone = {}
        for mode in ("consume", "decode"):
            log(f"set-up alone: the worker's Faust app, consumer and fetch loop, doing {mode} only")
            alone_env = dict(env, LOOPLINE_APP_ID=f"{settings.app_id}-faust-only-{mode}")
            alone[mode] = faust_only(mode, args.events, alone_env)["events_per_s"]
            log(f"set-up alone ({mode}): {alone[mode]:,} events/s")
        p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
        result = {
            "events": args.events,
            "workers": args.workers,
            "baseline_events_per_s": round(base_rate),
            "baseline_runs_events_per_s": [round(rate) for rate, _ in baselines],
            "worker_events_per_s": round(worker_rate),
            "ratio": round(worker_rate / base_rate, 3),
            "baseline_cpu_us_per_event": round(base_cpu * 1e6, 1),
            "baseline_runs_cpu_us_per_event": [round(cpu * 1e6, 1) for _, cpu in baselines],
            "worker_cpu_us_per_event": round(worker_cpu * 1e6, 1),
            "cpu_ratio": round(base_cpu / worker_cpu, 3),
            "worker_events_by_status": statuses,
            "worker_peak_rss_mib": round(peak / 1024, 1),
            "worker_rss_samples_mib": [round(s / 1024) for s in samples],
            "worker_rss_at_end_mib": round(rss_now / 1024, 1),
            "worker_held_cases_at_end": held,
            "freshness_p50_s": round(statistics.median(delays), 3),
            "freshness_p99_s": round(p99, 3),
            "faust_only_events_per_s": alone,
            "faust_only_ratio": {mode: round(rate / base_rate, 3) for mode, rate in alone.items()},
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
