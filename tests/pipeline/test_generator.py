"""The traffic generator: deterministic, valid, time-ordered, and its scenarios bite."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pytest

from pipeline.codec import Codec
from pipeline.generator import EVENTS_PER_CASE, Scenario, TrafficGenerator
from pipeline.topics import RECORD_OF
from pipeline.traffic import ending_now

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
START_MS = int(START.timestamp() * 1000)


def _take(
    n: int, seed: int = 3, scenario: Scenario | None = None
) -> list[tuple[str, dict[str, Any]]]:
    return list(islice(TrafficGenerator(seed, START, 20.0, scenario), n))


def test_same_seed_same_events_and_other_seed_other_events() -> None:
    assert _take(500) == _take(500)
    assert _take(500, seed=4) != _take(500)


def test_every_event_is_valid_and_in_event_time_order() -> None:
    codec = Codec.load()
    events = _take(3000)
    for topic, record in events:
        codec.validate(RECORD_OF[topic], record)
    stamps = [record["ts"] for _, record in events]
    assert stamps == sorted(stamps)
    assert len({record["event_id"] for _, record in events}) == len(events)


def test_resolutions_follow_their_inputs_and_mix_resolvers() -> None:
    events = _take(6000)
    inputs = {r["case_id"]: r["ts"] for t, r in events if t == "inputs"}
    resolutions = [r for t, r in events if t == "resolutions"]
    assert resolutions
    assert all(r["ts"] > inputs[r["case_id"]] for r in resolutions)
    assert {r["resolver"] for r in resolutions} == {"SYSTEM", "HUMAN", "HYBRID"}
    assert {r["loop"] for r in resolutions} == {"support-triage", "refunds", "kyc-review"}
    humans = [r for r in resolutions if r["resolver"] == "HUMAN"]
    assert all(r["human_minutes"] > 0 and r["model_cost_usd"] == 0.0 for r in humans)
    suites = Counter(r["suite"] for t, r in events if t == "eval-results")
    assert suites["CURRENT"] > 0 and suites["HISTORICAL"] > 0


def test_drift_onset_brings_new_categories_and_larger_orders_only_after_it() -> None:
    drift_at = 60.0
    events = _take(8000, scenario=Scenario(drift_at=drift_at))
    onset = START_MS + drift_at * 1000
    before = [r for t, r in events if t == "inputs" and r["ts"] < onset]
    after = [r for t, r in events if t == "inputs" and r["ts"] >= onset]
    new = {"outage", "chargeback", "crypto"}
    assert not new & {r["category"] for r in before}
    assert new <= {r["category"] for r in after}
    mean = lambda rs: sum(r["features"]["order_value_usd"] for r in rs) / len(rs)  # noqa: E731
    assert mean(after) > 1.5 * mean(before)


def test_cost_spike_multiplies_model_cost_per_token() -> None:
    spike_at = 60.0
    events = _take(8000, scenario=Scenario(cost_spike_at=spike_at))
    onset = START_MS + spike_at * 1000
    per_token = [
        (r["ts"] >= onset, r["model_cost_usd"] / (r["input_tokens"] + r["output_tokens"]))
        for t, r in events
        if t == "resolutions" and r["model"] is not None
    ]
    assert {round(v, 9) for late, v in per_token if not late} == {0.000004}
    assert {round(v, 9) for late, v in per_token if late} == {0.00002}


def test_quality_drop_ships_the_release_and_lowers_its_pass_rate() -> None:
    events = _take(20000, scenario=Scenario(quality_drop_at=60.0, quality_drop_release="bad"))
    verdicts: dict[str, list[bool]] = {}
    for t, r in events:
        if t == "eval-results" and r["suite"] == "CURRENT":
            verdicts.setdefault(r["release"], []).append(r["passed"])
    rates = {release: sum(v) / len(v) for release, v in verdicts.items()}
    assert rates["bad"] < 0.75 < rates["2026.11.0"]


def test_generate_cli_writes_the_replay_format(tmp_path: Any) -> None:
    out = tmp_path / "events.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "generate",
            "--count",
            "250",
            "--seed",
            "3",
            "--start",
            "2026-11-25T09:00:00Z",
            "--jsonl",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["topic"], line["record"]) for line in lines] == _take(250)
    assert "generated 250 events" in result.stderr


@pytest.mark.parametrize("args", [[], ["--count", "0"], ["--count", "5", "--rate", "-1"]])
def test_generate_cli_rejects_missing_or_bad_limits(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "generate", "--jsonl", "-", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "count" in result.stderr or "rate" in result.stderr


def test_unpaced_traffic_from_ending_now_ends_about_now_not_in_the_future() -> None:
    """What `generate --count N` publishes without --rate or --start: its event time must not
    run past the workers' LOOPLINE_MAX_AHEAD_SECONDS (1 h), or its events are refused."""
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    count, rate = 50_000, 20.0  # about 19 minutes of event time at 44.19 events a second
    begin = ending_now(now, count, rate)
    assert begin == datetime(2026, 11, 28, 11, 41, 9, tzinfo=UTC)  # 50,000 / 44.19 = 1,131 s
    stamps = [record["ts"] for _, record in islice(TrafficGenerator(1, begin, rate), count)]
    now_ms = int(now.timestamp() * 1000)
    assert min(stamps) >= int(begin.timestamp() * 1000)
    # ends within a minute and a half of now (the last resolutions trail their inputs); at
    # 2.4 events a case, as this once assumed, it ran two minutes past now, 15 at 500,000 events
    assert abs(max(stamps) - now_ms) < 90_000


def test_events_per_case_is_what_the_generator_makes() -> None:
    """Event time is paced by it (the demo, ``ending_now``): an input and a resolution a case,
    an online eval result for 15 % of those the model resolves (0.73 of cases, by the loops'
    shares and resolvers), a historical-suite result for 10 %: 2 + 0.15 * 0.73 + 0.1."""
    assert round(EVENTS_PER_CASE, 4) == 2.2095
    # a case a second: the cases still to be resolved at the end are few (~80 of 45,000)
    counts = Counter(topic for topic, _ in islice(TrafficGenerator(3, START, 1.0), 100_000))
    assert sum(counts.values()) / counts["inputs"] == pytest.approx(EVENTS_PER_CASE, rel=0.01)
