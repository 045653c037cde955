"""Drift and alerts on the real broker: the eval set as a stream, the baseline moving while
the worker runs, and an alert episode that survives a SIGKILL without firing twice."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.generator import LOOPS, Scenario, TrafficGenerator, eval_set, input_fields
from pipeline.partials import encode_change
from pipeline.partition import PartitionCore
from pipeline.processor import Processor, partition_key
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, read_topic, settings_env, wait_for

pytestmark = pytest.mark.broker
START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
REFUNDS = (LOOPS[1],)


def _gauge(worker: WorkerProcess, name: str, **labels: str) -> float | None:
    from pipeline.metrics import parse_exposition

    samples = parse_exposition(worker.metrics_text() or "")
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return found[0] if found else None


def _loopline(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _chargeback_cases(count: int) -> list[dict[str, Any]]:
    """Eval cases for the category the drifted traffic brings and the eval set lacks."""
    rng, cases = random.Random(5), []
    while len(cases) < count:
        fields = input_fields(rng, LOOPS[1], drifted=True)
        if fields["category"] == "chargeback":
            cases.append({"eval_case_id": f"reviewed-{len(cases)}", "loop": "refunds", **fields})
    return cases


def test_new_eval_cases_move_the_baseline_while_the_worker_runs(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    curated = START - timedelta(days=2)  # the eval set is older than the traffic
    baseline = [("eval-cases", r) for r in eval_set(1, curated, 300, loops=REFUNDS)]
    traffic = list(islice(TrafficGenerator(3, START, 5.0, Scenario(drift_at=0), REFUNDS), 1500))
    expected = asyncio.run(_publish(settings, baseline + traffic))
    replayed = Processor(settings.core_config())
    for topic, record in baseline + traffic:
        replayed.process(topic, record)
    drift = replayed.snapshot()["loops"]["refunds"]["drift"]
    assert drift["detected"] is True

    worker = start_worker(settings)
    wait_for(
        lambda: all(worker.processed(t) >= expected[t] for t in SOURCE_TOPICS),
        120,
        f"all events processed (log {worker.log_path})",
    )
    js = {"loop": "refunds", "feature": "category", "method": "js"}
    wait_for(
        lambda: _gauge(worker, "loopline_drift_score", **js) == drift["features"]["category"]["js"],
        30,
        "the worker's drift scores to equal replay's",
    )
    for feature, scores in drift["features"].items():
        for method, value in scores.items():
            if method != "drifted":
                labels = {"loop": "refunds", "feature": feature, "method": method}
                assert _gauge(worker, "loopline_drift_score", **labels) == pytest.approx(value)
    assert _gauge(worker, "loopline_drift_detected", loop="refunds") == 1.0
    uncovered_before = _gauge(worker, "loopline_uncovered_input_ratio", loop="refunds", window="1h")
    js_before = _gauge(worker, "loopline_drift_score", **js)
    assert uncovered_before is not None and uncovered_before > 0.5  # chargeback is ~60 %
    assert js_before is not None

    # Reviewers' new eval cases for the uncovered category, imported with the CLI; one bad row.
    new_cases = _chargeback_cases(200)
    path = tmp_path / "reviewed.jsonl"
    lines = [json.dumps(c) for c in new_cases]
    lines.insert(3, json.dumps({"eval_case_id": "broken", "loop": "refunds", "suite": "NEXT"}))
    path.write_text("\n".join(lines) + "\n")
    began = time.monotonic()
    imported = _loopline(settings, "evalset", "import", str(path))
    assert imported.returncode == 2, imported.stderr
    assert f"{path}:4:" in imported.stderr and "suite" in imported.stderr
    assert "200 eval cases imported, 1 rejected" in imported.stderr

    def moved() -> bool:
        uncovered = _gauge(worker, "loopline_uncovered_input_ratio", loop="refunds", window="1h")
        return uncovered == 0 and (_gauge(worker, "loopline_drift_score", **js) or 1) < js_before

    wait_for(moved, 60, "uncovered_ratio and the category's drift score to fall")
    print(f"baseline moved {time.monotonic() - began:.1f}s after the import")
    assert not worker.exited()  # never restarted

    # The eval set round-trips through export, as JSON Lines and as Parquet.
    exported = _loopline(settings, "evalset", "export")
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(rows) == 500 and Counter(r["origin"] for r in rows) == {"IMPORTED": 500}
    parquet = tmp_path / "evalset.parquet"
    assert _loopline(settings, "evalset", "export", "-o", str(parquet)).returncode == 0
    assert pq.read_table(parquet).num_rows == 500
    reimported = _loopline(settings, "evalset", "import", str(parquet))
    assert reimported.returncode == 0, reimported.stderr
    assert "500 eval cases imported, 0 rejected" in reimported.stderr

    # The 300 cases of the original set (curated days ago) age into HISTORICAL.
    assert (
        "300 eval cases older than 1 days"
        in _loopline(settings, "evalset", "age", "--current-days", "1").stderr
    )
    exported = _loopline(settings, "evalset", "export")
    suites = Counter(json.loads(line)["suite"] for line in exported.stdout.splitlines())
    assert suites == {"HISTORICAL": 300, "CURRENT": 200}

    # Deleting the reviewers' cases (a tombstone each) takes them out of the baseline again.
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(c["eval_case_id"] for c in new_cases[1:]) + "\n")
    first = new_cases[0]["eval_case_id"]
    deleted = _loopline(settings, "evalset", "delete", first, "no-such-case", "--file", str(ids))
    assert deleted.returncode == 2, deleted.stderr
    assert "no-such-case: not in the eval set" in deleted.stderr
    assert "200 eval cases deleted, 1 not found" in deleted.stderr
    wait_for(
        lambda: (
            _gauge(worker, "loopline_uncovered_input_ratio", loop="refunds", window="1h")
            == uncovered_before
        ),
        60,
        "uncovered_ratio to return to its value before the reviewed cases",
    )
    exported = _loopline(settings, "evalset", "export")
    assert Counter(json.loads(line)["suite"] for line in exported.stdout.splitlines()) == {
        "HISTORICAL": 300
    }
    assert worker.processed("eval-cases") >= 1200 and not worker.exited()


def test_an_alert_episode_survives_a_sigkill_without_a_second_firing(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[defaults.drift]\nconsecutive = 2\n")
    settings = make_settings(rules=rules)
    baseline = [("eval-cases", r) for r in eval_set(1, START, 500, loops=REFUNDS)]
    events = TrafficGenerator(4, START, 5.0, Scenario(drift_at=0), REFUNDS)
    first = list(islice(events, 7000))  # about 10 minutes of event time
    second = list(islice(events, 7000))
    # The eval set is there before the traffic, as in production: alerts are evaluated as event
    # time passes, so a baseline that arrived after all the traffic would be seen by none.
    worker = start_worker(settings)
    asyncio.run(_publish(settings, baseline))
    wait_for(lambda: worker.processed("eval-cases") >= 500, 60, "the eval set processed")
    expected = asyncio.run(_publish(settings, first))

    def firing() -> list[dict[str, Any]]:
        records = [r for _, r in asyncio.run(read_topic(settings, "alerts"))]
        return [r for r in records if r["fingerprint"] == "drift/refunds"]

    wait_for(lambda: bool(firing()), 120, f"a drift alert (log {worker.log_path})")
    wait_for(
        lambda: all(worker.processed(t) >= expected[t] for t in SOURCE_TOPICS),
        120,
        "the first part processed",
    )
    time.sleep(3)  # past the checkpoint of the batch that fired
    worker.stop(signal.SIGKILL)

    asyncio.run(_publish(settings, second))
    restarted = start_worker(settings)
    wait_for(
        lambda: _gauge(restarted, "loopline_alerts_firing", rule="drift", loop="refunds") == 1.0,
        120,
        "the restarted worker to report the episode still firing",
    )
    rest = Counter(topic for topic, _ in second)
    wait_for(
        lambda: all(restarted.processed(t) >= rest[t] for t in SOURCE_TOPICS),
        120,
        "the restarted worker to process the second part",
    )
    assert _gauge(restarted, "loopline_drift_detected", loop="refunds") == 1.0
    time.sleep(3)  # a few more evaluations, which must not fire the episode again
    records = [r for _, r in asyncio.run(read_topic(settings, "alerts"))]
    drift = [r for r in records if r["fingerprint"] == "drift/refunds"]
    assert [r["state"] for r in drift] == ["FIRING"], drift
    assert len({r["event_id"] for r in records}) == len(records)


def _bulky_inputs(count: int, start_ms: int) -> list[tuple[str, dict[str, Any]]]:
    """Inputs of one 10 s bucket whose features are just under every size cap (values and keys
    that JSON writes at six bytes a character, 100 attributes, 100 numbers, two embedding
    lengths): the bucket's partial is larger than Kafka's default message limit."""
    rng, events = random.Random(3), []
    for i in range(count):
        fields = input_fields(rng, LOOPS[1], drifted=False)
        fields.update(
            channel=f"{i % 100:03d}" + "\x01" * 37,
            category=f"{i:03d}" + "\x02" * 37,
            language=f"{i:03d}" + "\x03" * 37,
            attributes={f"{k:02d}" + "\x01" * 98: f"{i:03d}" + "\x01" * 4 for k in range(100)},
            features={
                f"{k:02d}" + "\x02" * 98: -1.2345678901234567e-300 * (1 + i / 1e6 + k / 1e3)
                for k in range(100)
            },
            embedding=[rng.uniform(-1, 1) for _ in range(4096 - i % 2)],
        )
        case = {"event_id": f"bulky-{i}", "case_id": f"bulky-{i}", "source": "test"}
        events.append(("inputs", {**case, "loop": "refunds", "ts": start_ms + i, **fields}))
    return events


def test_a_bucket_past_kafkas_default_message_limit_is_sent_stored_and_restored(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    """Until 2026-11-28 such a bucket's partial (1.1 MB here) was refused by the broker, and
    the worker stopped on it after every restart. Now the partials topic and the changelogs take
    messages up to STATE_MESSAGE_BYTES, and a summary's size caps keep it below that."""
    rules = tmp_path / "rules.toml"
    rules.write_text("[drift]\nmin_samples = 100\n")
    settings = make_settings(rules=rules, partitions=1)
    start_ms = int(START.timestamp() * 1000) + 1
    bulky = _bulky_inputs(120, start_ms)
    later = TrafficGenerator(6, START + timedelta(seconds=30), 5.0, Scenario(), REFUNDS)
    tick = [next(e for e in later if e[0] == "inputs")]  # moves event time past the bucket
    cases = [("eval-cases", c) for c in eval_set(2, START - timedelta(days=1), 100, REFUNDS)]
    for n, (_, case) in enumerate(cases):
        case["channel"] = f"{n % 50:03d}" + "\x01" * 37  # half of the traffic's channels
    events = cases + bulky + tick

    core = PartitionCore(settings.core_config())
    for topic, record in bulky:
        assert core.process(topic, partition_key(topic, record), record) == "ok"
    assert max(len(encode_change(c)) for c in core.drain()) > 1_048_588  # Kafka's default
    replayed = Processor(settings.core_config())
    for topic, record in events:
        replayed.process(topic, record)
    js = replayed.snapshot()["loops"]["refunds"]["drift"]["features"]["channel"]["js"]
    assert 0 < js < 1

    expected = asyncio.run(_publish(settings, events))
    worker = start_worker(settings)
    wait_for(
        lambda: all(worker.processed(t) >= expected[t] for t in SOURCE_TOPICS),
        120,
        f"all events processed (log {worker.log_path})",
    )
    channel = {"loop": "refunds", "feature": "channel", "method": "js"}
    wait_for(lambda: _gauge(worker, "loopline_drift_score", **channel) == js, 30, "replay's js")
    assert worker.metric("loopline_dead_letters_total") == 0 and not worker.exited()
    time.sleep(3)  # past the checkpoint of the last batch
    worker.stop(signal.SIGKILL)

    restarted = start_worker(settings)  # restores the bucket from the changelog
    more = [next(e for e in later if e[0] == "inputs")]
    asyncio.run(_publish(settings, more))
    wait_for(lambda: restarted.processed("inputs") >= 1, 120, f"log {restarted.log_path}")
    replayed.process(*more[0])
    js = replayed.snapshot()["loops"]["refunds"]["drift"]["features"]["channel"]["js"]
    wait_for(
        lambda: _gauge(restarted, "loopline_drift_score", **channel) == js,
        30,
        "the restored worker's js to equal replay's",
    )
    assert not restarted.exited()
