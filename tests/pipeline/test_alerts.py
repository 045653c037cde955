"""Alert rules on long replays: quiet on stationary traffic, each one firing on the scenario
made for it, one FIRING and one RESOLVED per episode, nothing fired twice after a restart."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.core import CoreConfig
from pipeline.generator import LOOPS, Scenario, TrafficGenerator, eval_set
from pipeline.loopview import LoopView
from pipeline.processor import Processor
from pipeline.rules import AlertRules

START = datetime(2026, 11, 2, tzinfo=UTC)
START_MS = int(START.timestamp() * 1000)
MIN = 60_000
REFUNDS = (LOOPS[1],)
ONSET_S = 1800  # perturbations start 30 minutes into the run

# Defaults, except where the generator's stationary traffic sits near a default that exists
# for real loops: its p99 latency is ~10 min, cost ~0.003 USD; coverage and toil compare 1h
# windows, because the replays hold hours of the week before, not days.
TEST_RULES = {
    "defaults": {
        "latency_slo": {"p99_seconds": 1800},
        "cost_budget": {"max_usd": 0.006},
        "coverage_drop": {"window": "1h"},
        "toil_rise": {"window": "1h"},
    }
}

Event = tuple[str, dict[str, Any]]


def config(rules: dict[str, Any] = TEST_RULES) -> CoreConfig:
    return CoreConfig(rules=AlertRules.parse(rules))


def traffic(start: datetime, hours: float, scenario: Scenario | None = None) -> Iterator[Event]:
    end_ms = int(start.timestamp() * 1000) + int(hours * 3600_000)
    for topic, record in TrafficGenerator(7, start, 0.5, scenario, loops=REFUNDS):
        if record["ts"] >= end_ms:
            return
        yield topic, record


def stationary(hours: float = 4.0, scenario: Scenario | None = None) -> Iterator[Event]:
    """The same hours of the week before (for the week-over-week rules), then ``hours`` from
    START, each beginning 30 min early so that every compared window is full."""
    yield from traffic(START - timedelta(days=7, minutes=30), hours + 0.5)
    yield from traffic(START, hours, scenario)


def replay(
    events: Iterator[Event],
    core: CoreConfig | None = None,
    dead_letter: Callable[[Event], bool] = lambda _: False,
) -> Processor:
    processor = Processor(core or config())
    for record in eval_set(1, START - timedelta(days=30), 1000, loops=REFUNDS):
        processor.process("eval-cases", record)
    for event in events:
        if dead_letter(event):
            processor.dead_letter(event[1]["loop"], event[1]["ts"])
        else:
            processor.process(*event)
    return processor


def after_onset(record: dict[str, Any]) -> bool:
    return bool(record["ts"] >= START_MS + ONSET_S * 1000)


def fired(processor: Processor) -> Counter[str]:
    return Counter(a["fingerprint"] for a in processor.alerts if a["state"] == "FIRING")


def test_stationary_traffic_raises_nothing_over_200_evaluations() -> None:
    processor = replay(stationary())
    assert processor.evaluations >= 200
    assert processor.alerts == []
    drift = processor.snapshot()["loops"]["refunds"]["drift"]
    assert drift["detected"] is False and len(drift["features"]) == 9


def _shift_inputs_back(events: Iterator[Event]) -> Iterator[Event]:
    """Inputs after the onset stamped 45 min earlier: every later case takes 45 min longer."""
    for topic, record in events:
        if topic == "inputs" and after_onset(record):
            record = {**record, "ts": record["ts"] - 45 * MIN}
        yield topic, record


def _map_resolutions(change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Any:
    def apply(events: Iterator[Event]) -> Iterator[Event]:
        for topic, record in events:
            if topic == "resolutions" and after_onset(record):
                changed = change(record)
                if changed is None:
                    continue
                record = changed
            yield topic, record

    return apply


def _sampled(record: dict[str, Any], percent: int) -> bool:
    return zlib.crc32(str(record.get("case_id") or record["event_id"]).encode()) % 100 < percent


SCENARIOS: dict[str, Any] = {
    "quality_floor/refunds/current": lambda: stationary(scenario=Scenario(quality_drop_at=ONSET_S)),
    "latency_slo/refunds/p99": lambda: _shift_inputs_back(stationary()),
    "cost_budget/refunds": lambda: stationary(scenario=Scenario(cost_spike_at=ONSET_S)),
    "coverage_drop/refunds": lambda: _map_resolutions(
        lambda r: {**r, "resolver": "HUMAN"} if r["resolver"] == "SYSTEM" else r
    )(stationary()),
    "toil_rise/refunds": lambda: _map_resolutions(
        lambda r: {**r, "human_minutes": r["human_minutes"] * 3}
    )(stationary()),
    "drift/refunds": lambda: stationary(scenario=Scenario(drift_at=ONSET_S)),
    "unresolved/refunds": lambda: _map_resolutions(lambda r: None if _sampled(r, 5) else r)(
        stationary()
    ),
}


@pytest.mark.parametrize("fingerprint", sorted(SCENARIOS))
def test_each_rule_fires_once_on_its_scenario(fingerprint: str) -> None:
    processor = replay(SCENARIOS[fingerprint]())
    assert fired(processor)[fingerprint] == 1, processor.alerts
    record = next(a for a in processor.alerts if a["fingerprint"] == fingerprint)
    assert record["ts"] >= START_MS + ONSET_S * 1000
    assert record["event_id"] == f"{fingerprint}:FIRING:{record['started_at']}"
    assert record["runbook_url"].endswith(f"/{record['rule']}.md")


def test_dead_letter_rate_fires_on_its_scenario() -> None:
    processor = replay(stationary(), dead_letter=lambda e: after_onset(e[1]) and _sampled(e[1], 5))
    assert fired(processor)["dead_letter_rate/refunds"] == 1
    alert = next(a for a in processor.alerts if a["rule"] == "dead_letter_rate")
    assert alert["severity"] == "CRITICAL" and alert["value"] == pytest.approx(0.05, abs=0.03)


def test_drift_fires_after_the_configured_evaluations_and_resolves_when_traffic_returns() -> None:
    scenario = Scenario(drift_at=3600, drift_end_at=2 * 3600)
    first = replay(stationary(5.0, scenario), config({"defaults": {"drift": {"consecutive": 1}}}))
    third = replay(stationary(5.0, scenario), config({"defaults": {"drift": {"consecutive": 3}}}))
    detected = next(a for a in first.alerts if a["state"] == "FIRING")["ts"]
    drift = [a for a in third.alerts if a["rule"] == "drift"]
    assert [a["state"] for a in drift] == ["FIRING", "RESOLVED"]
    interval = MIN  # evaluation_interval default
    # Three consecutive detections: the first one and the two evaluations after it.
    assert drift[0]["ts"] == detected + 2 * interval
    assert drift[0]["started_at"] == drift[1]["started_at"] == drift[0]["ts"]
    # Resolved once the 1 h drift window holds the returned traffic and 10 min have passed.
    end_ms = START_MS + 2 * 3600_000
    assert end_ms < drift[1]["ts"] <= end_ms + 3600_000 + 10 * MIN + interval


def test_a_restart_mid_episode_fires_nothing_twice() -> None:
    events = list(stationary(5.0, Scenario(drift_at=3600, drift_end_at=2 * 3600)))
    whole = replay(iter(events))
    firing_at = next(a["ts"] for a in whole.alerts if a["state"] == "FIRING")
    split = next(i for i, (_, r) in enumerate(events) if r["ts"] > firing_at + 5 * MIN)

    before = replay(iter(events[:split]))
    # Stage 2's state as its changelog holds it, rebuilt: what a restarted worker loads.
    restored = LoopView.from_records(before.config, before.stage2.changed_records().items())
    after = Processor.resumed(before.stage1, restored)
    for event in events[split:]:
        after.process(*event)
    assert before.alerts + after.alerts == whole.alerts
    assert [a["state"] for a in whole.alerts if a["rule"] == "drift"] == ["FIRING", "RESOLVED"]


def test_rules_can_be_switched_off_per_loop() -> None:
    rules = {**TEST_RULES, "loops": {"refunds": {"cost_budget": {"enabled": False}}}}
    processor = replay(stationary(scenario=Scenario(cost_spike_at=ONSET_S)), config(rules))
    assert not [a for a in processor.alerts if a["rule"] == "cost_budget"]


def test_evaluations_wait_for_every_active_partition() -> None:
    from pipeline.loopview import LoopState
    from pipeline.partials import Partial

    state = LoopState(config(), "refunds")
    state.apply(Partial(0, "refunds", START_MS + 10 * MIN, {}))
    state.apply(Partial(1, "refunds", START_MS + 3 * MIN + 5_000, {}))
    assert state.complete_ms == START_MS + 3 * MIN + 5_000
    state.evaluate()
    assert state.evaluated_ms == START_MS + 3 * MIN  # not 10 min: partition 1 is not there yet
    # A partition more than the allowed lateness (1 h) behind counts as idle.
    state.apply(Partial(0, "refunds", START_MS + 2 * 3600_000, {}))
    assert state.complete_ms == START_MS + 2 * 3600_000


def test_a_backlog_evaluated_at_once_fires_as_when_it_came_in_batches() -> None:
    """A fresh loop's first ten minutes arrive as one backlog (a worker reading faster than
    they were published): its first evaluation covers every boundary since the loop's first
    bucket, so a rule that needs two evaluations in a row fires as it does batch by batch."""
    from itertools import islice

    from pipeline.partition import PartitionCore
    from pipeline.processor import partition_key

    rules = config({"defaults": {"drift": {"consecutive": 2}}})
    events: list[Event] = [("eval-cases", r) for r in eval_set(1, START, 500, loops=REFUNDS)]
    events += islice(TrafficGenerator(4, START, 5.0, Scenario(drift_at=0), REFUNDS), 7000)

    def alerts(every: int) -> list[tuple[str, str, int]]:
        core, view, found = PartitionCore(rules), LoopView(rules), []
        for n, (topic, record) in enumerate(events, 1):
            core.process(topic, partition_key(topic, record), record)
            if n % every == 0 or n == len(events):
                for message in core.drain():
                    view.apply(message)
                found += [(a["rule"], a["state"], a["ts"]) for a in view.evaluate()]
        return found

    in_batches, at_once = alerts(500), alerts(len(events))
    assert [(rule, state) for rule, state, _ in at_once] == [("drift", "FIRING")]
    assert at_once == in_batches
