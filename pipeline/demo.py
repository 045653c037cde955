"""The local demo: a broker, the topics, a worker, the archive sink and the generator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.generator import EVENTS_PER_CASE, Scenario, TrafficGenerator, eval_set
from pipeline.kafka_local import LocalBroker
from pipeline.metrics import parse_exposition, sample_sum
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS, ensure_topics
from pipeline.traffic import Limits, publish_traffic

Echo = Callable[[str], None]
#: How long the worker may take to join its consumer group and read the eval set.
WORKER_READY_SECONDS = 120
#: How many times faster than the clock the demo's event time runs (``--speedup``): a second of
#: the demo is a minute of traffic, so its 30 s are thirty evaluations of the alert rules (one a
#: minute of event time), enough for the drift alert to fire after the onset.
SPEEDUP = 60.0
#: The alert records the demo lists at its end, the newest (a broker kept from earlier runs
#: holds theirs too).
ALERTS_SHOWN = 20


@dataclass(frozen=True)
class DemoTraffic:
    """The demo's generated traffic: ``rate`` events a second of the clock for ``duration``
    seconds, its event time running ``speedup`` times as fast and ending about when it starts
    (the workers refuse events stamped ahead of their messages), with the drift onset and the
    cost spike half-way."""

    duration: float
    rate: float
    speedup: float = SPEEDUP

    @property
    def span_seconds(self) -> float:
        """Seconds of event time the traffic spans."""
        return self.duration * self.speedup

    def events(self, now: datetime, seed: int) -> TrafficGenerator:
        span = self.span_seconds
        return TrafficGenerator(
            seed=seed,
            start=now - timedelta(seconds=span),
            cases_per_second=self.rate / EVENTS_PER_CASE / self.speedup,
            scenario=Scenario(cost_spike_at=span / 2, drift_at=span / 2),
        )

    def describe(self) -> str:
        span = self.span_seconds
        return (
            f"generating {self.rate:,.0f} events/s for {self.duration:,.0f}s: "
            f"{_span(span)} of event time ({self.speedup:g}x the clock), ending now\n"
            f"scenario: after {_span(span / 2)} of event time ({self.duration / 2:.0f}s) model "
            "cost spikes 5x and the inputs drift (new categories, channels, languages, longer "
            "requests, larger orders); human time is priced at 0 USD/h until "
            "LOOPLINE_HOURLY_RATES is set (e.g. refunds=45)"
        )


def _span(seconds: float) -> str:
    return f"{seconds / 60:,.0f} min" if seconds >= 120 else f"{seconds:,.0f}s"


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


def numbers_table(text: str | None, window: str = "1h") -> str:
    """A compact table of the five numbers per loop from a worker's /metrics."""
    samples = parse_exposition(text or "")

    def get(name: str, loop: str, **labels: str) -> float | None:
        wanted = {"loop": loop, **labels}.items()
        found = [v for (n, ls), v in samples.items() if n == name and set(wanted) <= ls]
        return found[0] if found else None

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    loops = sorted({dict(ls)["loop"] for (n, ls) in samples if n == "loopline_toil_hours"})
    header = (
        f"{'loop (' + window + ')':<22}{'coverage':>9}{'assisted':>9}{'quality':>9}"
        f"{'p50 s':>8}{'p99 s':>8}{'$/case':>9}{'toil h':>8}{'unresolved':>11}"
        f"{'uncovered':>10}{'drift':>7}{'alerts':>7}"
    )
    rows = [header]
    for loop in loops:
        w = {"window": window}
        rows.append(
            f"{loop:<22}"
            f"{fmt(get('loopline_coverage_ratio', loop, **w), '.1%'):>9}"
            f"{fmt(get('loopline_assisted_ratio', loop, **w), '.1%'):>9}"
            f"{fmt(get('loopline_eval_pass_rate', loop, suite='all', **w), '.1%'):>9}"
            f"{fmt(get('loopline_latency_quantile_seconds', loop, quantile='0.5', **w), '.1f'):>8}"
            f"{fmt(get('loopline_latency_quantile_seconds', loop, quantile='0.99', **w), '.0f'):>8}"
            f"{fmt(get('loopline_cost_per_resolution_usd', loop, **w), '.4f'):>9}"
            f"{fmt(get('loopline_toil_hours', loop, **w), '.1f'):>8}"
            f"{fmt(get('loopline_unresolved_cases', loop), '.0f'):>11}"
            f"{fmt(get('loopline_uncovered_input_ratio', loop, **w), '.1%'):>10}"
            f"{_yes_no(get('loopline_drift_detected', loop)):>7}"
            f"{sample_sum(samples, 'loopline_alerts_firing', loop=loop):>7.0f}"
        )
    return "\n".join(rows)


def _yes_no(value: float | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


async def publish_eval_set(settings: Settings, start: datetime, per_loop: int = 1000) -> int:
    """The generator's eval set (the drift baseline) onto loopline.eval-cases."""
    from pipeline.publisher import Publisher

    async with Publisher(settings) as publisher:
        return await publisher.publish_many("eval-cases", eval_set(1, start, per_loop))


def _start(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def review_token(settings: Settings) -> tuple[str, str]:
    """(token, where to find it): LOOPLINE_REVIEW_TOKEN, else one made for the demo and kept in
    <data_dir>/review-token, readable by you only. The token itself is never printed."""
    if settings.review_token:
        return settings.review_token, "LOOPLINE_REVIEW_TOKEN"
    path = settings.data_dir / "review-token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(18))
    return path.read_text().strip(), str(path)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def alerts_raised(settings: Settings) -> str:
    """The alert records on loopline.alerts (on a broker the demo emptied: this run's)."""
    from pipeline.codec import Codec, CodecError
    from pipeline.topics import read_to_end

    codec = Codec.load()
    records, unreadable = [], 0
    for _, value in asyncio.run(read_to_end(settings, "alerts")):
        try:
            records.append(codec.decode(value, expected="Alert").record)
        except CodecError:
            unreadable += 1
    return alert_lines(settings.topic("alerts"), records, unreadable)


def alert_lines(topic: str, records: list[dict[str, Any]], unreadable: int = 0) -> str:
    """Each alert state change at its event time, oldest first: the last ALERTS_SHOWN."""
    notes = [f"{unreadable:,} records unreadable"] if unreadable else []
    if not records:
        return f"alerts on {topic}: none" + "".join(f" ({note})" for note in notes)
    if len(records) > ALERTS_SHOWN:
        notes.append(f"the last {ALERTS_SHOWN} of {len(records):,}")
    lines = [
        f"alerts on {topic} (event time, UTC; one FIRING and one RESOLVED an episode)"
        + "".join(f" ({note})" for note in notes)
        + ":"
    ]
    ordered = sorted(records, key=lambda a: (a["ts"], a["fingerprint"], a["state"]))
    for alert in ordered[-ALERTS_SHOWN:]:
        lines.append(
            f"  {alert['ts']:%H:%M} {alert['state']:<9}{alert['severity']:<9}"
            f"{alert['rule']:<16}{alert['summary']}"
        )
    return "\n".join(lines)


def archive_summary(settings: Settings, this_run_only: bool) -> str:
    """What the archive holds after the demo (``this_run_only``: it was made by this run), and
    the commands to look further."""
    from pipeline.codec import Codec
    from sinks.archive.store import Archive, ArchiveError
    from sinks.archive.tables import build_tables

    archive = Archive(settings.archive_file, build_tables(Codec.load(), settings.hourly_rates))
    try:
        with archive.connect(read_only=True, wait_seconds=15) as con:
            rows = con.execute(
                "SELECT loop, week, resolved, coverage, quality_all, latency_p90_seconds "
                "FROM v_weekly_scorecard ORDER BY week DESC, loop"
            ).fetchall()
    except ArchiveError as exc:
        return f"archive: {exc}"
    held = "this run's rows" if this_run_only else "earlier runs' rows too"
    lines = [f"archive {settings.archive_file} ({held}), v_weekly_scorecard:"]
    for loop, week, resolved, coverage, quality, p90 in rows:
        lines.append(
            f"  {week} {loop:<16} {resolved:>8,} resolved  coverage {coverage or 0:.1%}  "
            f"quality {quality or 0:.1%}  latency p90 {p90 or 0:,.1f} s"
        )
    week = rows[0][1] if rows else datetime.now(UTC).strftime("%G-W%V")
    lines += [
        "look further:",
        '  .venv/bin/loopline query "SELECT * FROM v_release_quality"',
        f"  .venv/bin/loopline report --week {week} -o report.html",
        "  .venv/bin/loopline gate --loop refunds --release 2026.11.0",
    ]
    return "\n".join(lines)


async def _publish_and_show(
    settings: Settings, events: TrafficGenerator, limits: Limits, url: str, echo: Echo
) -> Counter[str]:
    publishing = asyncio.create_task(publish_traffic(settings, events, limits, echo))
    try:
        while not publishing.done():
            await asyncio.wait({publishing}, timeout=5)
            text = await asyncio.to_thread(fetch_metrics, url)
            echo("\n" + numbers_table(text) + "\n")
    except asyncio.CancelledError:
        # Ctrl-C: stop the generator and let its publisher close while the Kafka client's own
        # tasks still run (asyncio.run cancels every task afterwards, and a producer whose
        # sender task is cancelled first never finishes flushing).
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        raise
    return publishing.result()


def _restoring(text: str | None) -> str:
    """What the demo says of a worker still restoring its state (a restart reads its
    changelogs first), or nothing."""
    left = sample_sum(parse_exposition(text or ""), "loopline_restore_remaining_records")
    return f" (restoring its state: {left:,.0f} changelog records to go)" if left else ""


def _wait_until_consuming(
    settings: Settings,
    url: str,
    eval_cases: int,
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    echo: Echo,
) -> None:
    """Start the traffic once the worker has read the eval set: it has then joined its consumer
    group and restored its state (some seconds), and the live numbers follow the traffic from
    its first events, with the baseline in place."""
    echo("waiting for the worker to join its consumer group and read the eval set ...")
    started = time.monotonic()
    reported = started
    while True:
        text = fetch_metrics(url)
        read = sum(_processed(text, settings)["eval-cases"])
        if read >= eval_cases:
            echo(f"the worker has read the eval set ({time.monotonic() - started:.0f}s)")
            return
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited; see {worker_log}")
        if time.monotonic() - started > WORKER_READY_SECONDS:
            raise RuntimeError(
                f"the worker read {read:,.0f} of {eval_cases:,} eval cases in "
                f"{WORKER_READY_SECONDS}s; see {worker_log}"
            )
        if time.monotonic() - reported >= 5:
            reported = time.monotonic()
            echo(f"  eval cases read so far: {read:,.0f} of {eval_cases:,}{_restoring(text)}")
        time.sleep(0.5)


def run_demo(
    settings: Settings,
    traffic: DemoTraffic,
    keep_kafka: bool,
    echo: Echo,
    stay: bool = False,
    keep_state: bool = False,
) -> None:
    """Run it all; Ctrl-C (or SIGTERM) at any point stops every process it started, cleanly.
    Without the SIGTERM handler, a supervisor's or ``timeout``'s SIGTERM would end it at once,
    leaving its worker, sink, page and broker running."""
    with _signal_handled(signal.SIGTERM, _as_ctrl_c):
        try:
            _run_demo(settings, traffic, keep_kafka, echo, stay, keep_state)
        except KeyboardInterrupt:
            echo("interrupted: everything the demo started is stopped")


def _as_ctrl_c(signum: int, frame: object) -> None:
    """Turn the signal into a Ctrl-C: within ``asyncio.run`` its SIGINT handler cancels the
    traffic so that the publisher closes (a KeyboardInterrupt raised in a task instead left
    the demo hanging in ``asyncio.run``'s clean-up), elsewhere it raises KeyboardInterrupt."""
    signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def _signal_handled(signum: int, handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for ``signum`` meanwhile (in the main thread; elsewhere signals are the main
    thread's, and nothing changes)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextlib.contextmanager
def _finishing(echo: Echo) -> Iterator[None]:
    """Let the clean-up finish when Ctrl-C (or SIGTERM) comes again meanwhile: a second
    interrupt in the middle of it left the broker running behind a message saying everything
    had stopped."""

    def again(signum: int, frame: object) -> None:
        echo("still stopping what the demo started ...")

    with _signal_handled(signal.SIGINT, again), _signal_handled(signal.SIGTERM, again):
        yield


def empty_earlier_demo(broker: LocalBroker, keep_state: bool) -> tuple[str | None, bool]:
    """Empty a broker the demo is about to start when its data is only an earlier demo's:
    that run's cases, drifted inputs and spent daily candidate budget would show in this one
    (drift before the drift onset, no candidate sampled). A broker already up, data made with
    'loopline kafka up', and --keep-state are left as they are. Returns what to say and whether
    the data is the demo's once the broker is up."""
    if broker.status().running:
        return (
            f"kafka is already up at {broker.bootstrap}: its topics and state are kept, and "
            "events of earlier runs count in the numbers below",
            False,
        )
    if not broker.has_data:
        return None, True
    if keep_state:
        return "kept the topics and state of earlier runs (--keep-state): they count below", False
    if not broker.demo_marker.exists():
        return (
            f"kept the data of {broker.instance_dir}: no demo is known to have made it "
            "('loopline kafka up' did, or a loopline before 2026-11-29), so its events count "
            "in the numbers below ('loopline kafka wipe' empties it)",
            False,
        )
    broker.wipe()
    return "emptied the demo's broker of earlier runs (--keep-state keeps them)", True


def empty_earlier_demo_archive(
    archive_file: Path, broker_is_demos: bool, broker_starts_empty: bool
) -> tuple[str | None, bool]:
    """Empty the archive with the broker when its rows are only earlier demos' (marked by
    ``sinks.archive.store.demo_marker``): with the broker go the alert state and the topics it
    was made from, so an earlier run's drift episodes would stay 'still firing' in
    ``v_alert_episodes`` for good, and its weeks would mix into this run's scorecard. An archive
    the demo's broker fills stays (or becomes) the demo's; others are left as they are. Returns
    what to say and whether the archive is the demo's."""
    from sinks.archive.store import demo_marker

    if not broker_is_demos:
        return None, False
    marker = demo_marker(archive_file)
    if archive_file.exists() and not marker.exists():
        note = (
            f"kept the archive {archive_file}: no demo is known to have made it alone "
            "('loopline archive run' wrote to it, or a loopline before 2026-11-30), so this "
            "run's rows are added to it (delete the file to start afresh)"
        )
        return (note if broker_starts_empty else None), False
    emptied = broker_starts_empty and archive_file.exists()
    if emptied:
        for path in (archive_file, archive_file.with_name(archive_file.name + ".wal")):
            path.unlink(missing_ok=True)
    archive_file.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("the rows of this archive were written by 'loopline demo'\n")
    return ("emptied the demo's archive of earlier runs" if emptied else None), True


def _run_demo(
    settings: Settings,
    traffic: DemoTraffic,
    keep_kafka: bool,
    echo: Echo,
    stay: bool,
    keep_state: bool,
) -> None:
    broker = LocalBroker(settings.kafka_home, settings.bootstrap_port)
    started_broker = not broker.status().running
    note, demo_owned = empty_earlier_demo(broker, keep_state)
    if note:
        echo(note)
    echo(broker.up(echo=echo).describe())
    if demo_owned:
        broker.own(demo=True)
    echo(f"topics: {asyncio.run(ensure_topics(settings)).describe()}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    archive_note, archive_owned = empty_earlier_demo_archive(
        settings.archive_file, broker.demo_marker.exists(), demo_owned
    )
    if archive_note:
        echo(archive_note)
    fresh_archive = not settings.archive_file.exists()
    worker_log = settings.data_dir / "demo-worker.log"
    url = f"http://{settings.web_host}:{settings.web_port}/metrics"
    worker = _start(["worker"], worker_log)
    archive_log = settings.data_dir / "demo-archive.log"
    archive = _start(["archive", "run", *(["--demo-owned"] if archive_owned else [])], archive_log)
    token, token_source = review_token(settings)
    review_log = settings.data_dir / "demo-review.log"
    review = _start(["review"], review_log, {"LOOPLINE_REVIEW_TOKEN": token})
    review_url = f"http://{settings.web_host}:{settings.review_port}/"
    try:
        echo(f"worker started (pid {worker.pid}, log {worker_log}); metrics at {url}")
        echo(
            f"archive sink started (pid {archive.pid}, log {archive_log}): {settings.archive_file}"
        )
        echo(
            f"review page started (pid {review.pid}, log {review_log}) at {review_url}: "
            f"log in with any name and the token in {token_source}"
        )
        deadline = time.monotonic() + 90
        while fetch_metrics(url) is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {worker_log}")
            time.sleep(0.5)
        now = datetime.now(UTC)
        cases = asyncio.run(publish_eval_set(settings, now))
        echo(f"eval set: {cases:,} eval cases on {settings.topic('eval-cases')} (the baseline)")
        _wait_until_consuming(settings, url, cases, worker, worker_log, echo)
        echo(traffic.describe())
        events = traffic.events(now, seed=int(time.time()))
        limits = Limits(duration=traffic.duration, rate=traffic.rate)
        published = asyncio.run(_publish_and_show(settings, events, limits, url, echo))
        published["eval-cases"] += cases
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
        time.sleep(settings.snapshot_interval_seconds + 1)  # one more snapshot after the last event
        text = fetch_metrics(url)
        echo("\n" + numbers_table(text))
        echo("\n" + alerts_raised(settings))
        samples = parse_exposition(text or "")
        reasons: Counter[str] = Counter()
        for (name, labels), value in samples.items():
            if name == "loopline_eval_candidates_total":
                reasons[dict(labels)["reason"]] += int(value)
        budget = settings.core_config().rules.candidates.daily_budget
        listed = ", ".join(f"{r} {n:,}" for r, n in reasons.most_common()) or (
            f"none in this run (each loop samples at most {budget:,} a day, and the count "
            "is kept across runs: an earlier run today may have used it up)"
        )
        # the page stops with the demo: where to review is said as the run allows
        where = (
            f"review them at {review_url} (token in {token_source})"
            if stay
            else f"review them: '.venv/bin/loopline demo --stay' keeps the page at {review_url} "
            f"running after its traffic (token in {token_source})"
        )
        echo(
            f"\neval candidates sampled to {settings.topic('eval-candidates')}, by reason (a "
            f"case may have several): {listed}\n{where}"
        )
        if stay:
            echo(
                f"everything keeps running (metrics {url}, review {review_url}); "
                "Ctrl-C stops it all"
            )
            while all(p.poll() is None for p in (worker, archive, review)):
                time.sleep(1)
            echo("a demo process exited; stopping the rest")
        _stop(archive)  # a clean stop flushes its last batch
        echo("\n" + archive_summary(settings, fresh_archive))
    finally:
        with _finishing(echo):
            echo("stopping what the demo started ...")
            for process in (worker, archive, review):
                _stop(process)
            if started_broker and not keep_kafka:
                broker.down()
                echo("kafka stopped")
            else:
                echo(f"kafka left running at {broker.bootstrap}: 'loopline kafka down' stops it")
