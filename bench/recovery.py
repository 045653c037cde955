"""Recovery benchmark: how long a worker killed with a large state takes to be back in service.

Publishes N generated events, runs a `loopline worker` until it has processed them all and
reads its numbers, kills it (SIGKILL, as the kernel's OOM killer or a lost node would), and
starts another. Measured in the same run:
  (a) baseline: aiokafka reading the worker's changelog topics from the beginning to their end
      (no decoding), the least any restore from them can take;
  (b) the restart: from spawning the new worker to its counting one probe event published to
      every source partition beforehand, with the state of every partition restored (its held
      cases back) and the batch it was killed in applied again;
and prints both, the ratio a/b, the changelog's records and bytes, and whether the restarted
worker's numbers equal the killed one's (they must: nothing lost, nothing counted twice).

With ``--join`` the first worker is not killed: a second one joins the group while probes are
published every PROBE_SECONDS, and the bench prints the first worker's longest wait between
two counted probes (its stall in the rebalance: it keeps some partitions, agents.state) and
when the second one counts its first (it restores the partitions it takes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from bench.throughput import (
    Samples,
    bench_settings,
    log,
    processed,
    publish,
    rss_kib,
    scrape,
    worker_env,
)
from pipeline.metrics import sample_sum
from pipeline.publisher import Publisher
from pipeline.settings import Settings

PROBE_LOOP = "bench-probe"
PROBE_SECONDS = 0.25  # --join: a round of probes this often
QUIET_SECONDS = 10.0  # --join: watched this long after the second worker counts
TABLES = ("partition-state", "loop-state")  # agents/ingest.py, agents/loops.py
#: The gauges compared before the kill and after the restart, for every loop and window.
NUMBERS = (
    "loopline_coverage_ratio",
    "loopline_assisted_ratio",
    "loopline_eval_pass_rate",
    "loopline_latency_quantile_seconds",
    "loopline_cost_per_resolution_usd",
    "loopline_toil_hours",
    "loopline_unresolved_cases",
)


def numbers(samples: Samples) -> dict[str, float]:
    """The five numbers' gauges of the generated loops (not the probes'), by series."""
    return {
        f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels))}}}": value
        for (name, labels), value in samples.items()
        if name in NUMBERS and ("loop", PROBE_LOOP) not in labels
    }


async def read_changelogs(settings: Settings) -> dict[str, float]:
    """Read every record of the worker's changelog topics once, as a restore must."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,  # as the worker's consumer fetches
    )
    await consumer.start()
    try:
        parts = [
            TopicPartition(f"{settings.app_id}-{table}-changelog", p)
            for table in TABLES
            for p in range(settings.partitions)
        ]
        # From the start by auto_offset_reset="earliest", with no seek: an assignment's reset
        # to "latest" (aiokafka's default) can race seek_to_beginning(), and then every fetch
        # came back empty here (pipeline.topics.read_to_end guards the same way).
        ends = await consumer.end_offsets(parts)
        consumer.assign(parts)
        started = time.monotonic()
        records = size = 0
        left = {tp for tp, end in ends.items() if end > 0}
        while left:
            for tp, messages in (await consumer.getmany(timeout_ms=1000)).items():
                records += len(messages)
                size += sum(len(m.value or b"") + len(m.key or b"") for m in messages)
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
        return {"records": records, "bytes": size, "seconds": time.monotonic() - started}
    finally:
        await consumer.stop()


async def publish_probes(settings: Settings, ts_ms: int) -> None:
    """One resolution of a new case on every source partition, at ``ts`` (the newest
    generated event's time, so that event time and the held cases stay as they were)."""
    partitioner = DefaultPartitioner()
    everyone = list(range(settings.partitions))
    tag = uuid.uuid4().hex[:8]
    async with Publisher(settings) as publisher:
        for partition in everyone:
            n = 0
            while partitioner(f"probe-{tag}-{n}".encode(), everyone, everyone) != partition:
                n += 1
            record = {
                "event_id": f"probe-{tag}-{n}",
                "case_id": f"probe-{tag}-{n}",
                "loop": PROBE_LOOP,
                "ts": ts_ms,
                "resolver": "SYSTEM",
                "outcome": "RESOLVED",
                "release": "bench",
            }
            await publisher.publish("resolutions", record)
        await publisher.flush()


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as worker_log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )


def settled(url: str, worker: subprocess.Popen[bytes], interval: float) -> Samples:
    """The worker's samples once its numbers stopped changing (two snapshots alike)."""
    before = numbers(scrape([url]))
    while True:
        if worker.poll() is not None:
            raise SystemExit("the worker exited; see its log")
        time.sleep(interval * 2 + 0.5)
        samples = scrape([url])
        if numbers(samples) == before and before:
            return samples
        before = numbers(samples)


def join(
    settings: Settings, env: dict[str, str], data_dir: Path, url: str, newest: int, events: int
) -> dict[str, Any]:
    """Start a second worker beside the first (serving ``url``) while a round of probes is
    published every PROBE_SECONDS: each worker counts them while it is in service, so the
    longest wait between two counts of the first is its stall in the rebalance, and the
    second's first count is when it is in service. Ends QUIET_SECONDS after that."""
    second_env = dict(env, LOOPLINE_WEB_PORT=str(settings.web_port + 1))
    second_url = f"http://127.0.0.1:{settings.web_port + 1}/metrics"
    stop = threading.Event()

    def probing() -> None:
        while not stop.is_set():
            asyncio.run(publish_probes(settings, newest))
            stop.wait(PROBE_SECONDS)

    prober = threading.Thread(target=probing)
    prober.start()
    log(f"starting a second worker, probes every {PROBE_SECONDS} s ...")
    spawned = time.monotonic()
    second = start_worker(second_env, data_dir / "worker-2.log")
    counted = [0.0, 0.0]
    last = [0.0, 0.0]  # when each worker counted a probe last
    longest = [0.0, 0.0]  # the longest wait between two counts (or from the spawn)
    first_count: float | None = None  # the second worker's
    try:
        while first_count is None or time.monotonic() - spawned < first_count + QUIET_SECONDS:
            if second.poll() is not None:
                raise SystemExit(f"the second worker exited; see {data_dir / 'worker-2.log'}")
            if time.monotonic() - spawned > 600:
                raise SystemExit(f"the second worker counted nothing in 600 s; see {data_dir}")
            for n, samples in enumerate([scrape([url]), scrape([second_url])]):
                now = time.monotonic() - spawned
                probes = sample_sum(samples, "loopline_resolutions_total", loop=PROBE_LOOP)
                if probes > counted[n]:
                    longest[n] = max(longest[n], now - last[n])
                    counted[n], last[n] = probes, now
                    if n == 1 and first_count is None:
                        first_count = now
            time.sleep(0.05)
        ended = time.monotonic() - spawned  # a wait still open at the end counts too
        longest = [max(wait, ended - at) for wait, at in zip(longest, last, strict=True)]
    finally:
        stop.set()
        prober.join()
        if second.poll() is None:
            second.terminate()
            second.wait(timeout=60)
    assert first_count is not None  # the loop ends only after it
    log(f"first worker: longest wait {longest[0]:.2f} s; second counting after {first_count:.1f} s")
    return {
        "events": events,
        "probe_interval_s": PROBE_SECONDS,
        "first_worker_longest_wait_s": round(longest[0], 2),
        "second_worker_counting_after_s": round(first_count, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=39092, help="local broker port")
    parser.add_argument(
        "--session-timeout-seconds",
        type=float,
        default=None,
        help="the workers' LOOPLINE_SESSION_TIMEOUT_SECONDS (default: the setting's)",
    )
    parser.add_argument(
        "--instance-id",
        default=None,
        help="LOOPLINE_INSTANCE_ID of both workers (static membership: the restarted one "
        "takes the killed one's place without waiting for its session to time out)",
    )
    parser.add_argument(
        "--join",
        action="store_true",
        help="start a second worker beside the first instead of killing and restarting it",
    )
    args = parser.parse_args()
    if args.join and args.instance_id is not None:
        parser.error("--join takes no --instance-id: the workers need ids of their own")

    data_dir = Path(tempfile.mkdtemp(prefix="loopline-bench-recovery-"))
    with bench_settings(args.port, data_dir=data_dir, web_port=6099) as settings:
        log(f"publishing {args.events:,} events to {settings.topic_prefix}* ...")
        newest = asyncio.run(publish(settings, args.events))
        env = worker_env(settings, "info")  # Faust logs its recovery steps with times
        env["LOOPLINE_WEB_PORT"] = str(settings.web_port)
        if args.session_timeout_seconds is not None:
            env["LOOPLINE_SESSION_TIMEOUT_SECONDS"] = str(args.session_timeout_seconds)
        if args.instance_id is not None:
            env["LOOPLINE_INSTANCE_ID"] = args.instance_id
        url = f"http://127.0.0.1:{settings.web_port}/metrics"
        log_path = data_dir / "worker.log"
        worker = start_worker(env, log_path)
        restarted = None
        try:
            while (done := processed(scrape([url]))) < args.events:
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited; see {log_path}")
                log(f"worker: {done:,.0f} of {args.events:,} processed")
                time.sleep(5)
            before = settled(url, worker, settings.snapshot_interval_seconds)
            held = round(sample_sum(before, "loopline_held_cases"))
            rss_mib = rss_kib(worker.pid, "VmRSS") / 1024
            peak_mib = rss_kib(worker.pid, "VmHWM") / 1024
            if args.join:
                log(f"worker: all processed, {held:,} cases held in {rss_mib:,.0f} MiB")
                print(json.dumps(join(settings, env, data_dir, url, newest, args.events)))
                return
            log(f"worker: all processed, {held:,} cases held in {rss_mib:,.0f} MiB; SIGKILL")
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            changelog = asyncio.run(read_changelogs(settings))
            log(
                f"baseline: read {changelog['records']:,.0f} changelog records "
                f"({changelog['bytes'] / 2**20:,.0f} MiB) in {changelog['seconds']:.1f} s"
            )
            asyncio.run(publish_probes(settings, newest))
            log("restarting the worker ...")
            spawned = time.monotonic()
            restarted = start_worker(env, log_path)
            up = None
            while True:
                if restarted.poll() is not None:
                    raise SystemExit(f"the restarted worker exited; see {log_path}")
                samples = scrape([url])
                if samples and up is None:
                    up = time.monotonic() - spawned
                probes = sample_sum(samples, "loopline_resolutions_total", loop=PROBE_LOOP)
                back = round(sample_sum(samples, "loopline_held_cases"))
                if probes >= settings.partitions and back >= held + settings.partitions:
                    break
                time.sleep(0.1)
            recovery = time.monotonic() - spawned
            log(f"restarted worker back in service after {recovery:.1f} s")
            after = settled(url, restarted, settings.snapshot_interval_seconds)
            rss_after_mib = rss_kib(restarted.pid, "VmRSS") / 1024
            peak_after_mib = rss_kib(restarted.pid, "VmHWM") / 1024
        finally:
            for process in (worker, restarted):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(timeout=60)
        same = numbers(after) == numbers(before)
        if not same:
            differ = sorted(k for k, v in numbers(before).items() if numbers(after).get(k) != v)
            log(f"warning: the numbers differ after the restart: {differ[:10]}")
        result: dict[str, Any] = {
            "events": args.events,
            "session_timeout_s": float(
                env.get("LOOPLINE_SESSION_TIMEOUT_SECONDS", Settings().session_timeout_seconds)
            ),
            "instance_id": args.instance_id,
            "held_cases": held,
            "worker_rss_mib": round(rss_mib, 1),
            "worker_peak_rss_mib": round(peak_mib, 1),
            "restarted_rss_mib": round(rss_after_mib, 1),
            "restarted_peak_rss_mib": round(peak_after_mib, 1),
            "changelog_records": round(changelog["records"]),
            "changelog_mib": round(changelog["bytes"] / 2**20, 1),
            "baseline_read_s": round(changelog["seconds"], 2),
            "metrics_up_s": None if up is None else round(up, 2),
            "recovery_s": round(recovery, 2),
            "ratio": round(changelog["seconds"] / recovery, 3),
            "events_applied_again": round(processed(after)) - settings.partitions,
            "numbers_equal": same,
            "numbers_compared": len(numbers(before)),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
