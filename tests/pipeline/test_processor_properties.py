"""Property tests: replay equals a straightforward batch recomputation with numpy."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ddsketch import DDSketch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.aggregates import Aggregate
from pipeline.core import CoreConfig
from pipeline.processor import Processor
from pipeline.progress import Meter
from pipeline.replay import replay
from pipeline.sketch import RELATIVE_ACCURACY, LatencySketch
from pipeline.windows import MINUTE, BucketSeries, default_tiers

T0 = int(datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp() * 1000)
AS_OF = T0 + 30 * MINUTE
LOOPS = ("alpha", "beta")
RATES = {"alpha": 40.0}

case_st = st.fixed_dictionaries(
    {
        "loop": st.sampled_from(LOOPS),
        "input_at": st.integers(1, 20 * 60_000),
        "category": st.sampled_from([None, "a", "b", "c"]),
        "has_input": st.booleans(),
        "resolutions": st.lists(
            st.fixed_dictionaries(
                {
                    "after": st.integers(1, 10 * 60_000),
                    "resolver": st.sampled_from(["SYSTEM", "HUMAN", "HYBRID"]),
                    "outcome": st.sampled_from(["RESOLVED", "ESCALATED", "FAILED", "ABANDONED"]),
                    "cost": st.floats(0, 2, allow_nan=False).map(lambda x: round(x, 4)),
                    "human": st.sampled_from([0.0, 1.5, 12.0]),
                    "passed": st.sampled_from([None, True, False]),
                }
            ),
            max_size=2,
        ),
        "verdicts": st.lists(
            st.tuples(
                st.sampled_from(["CURRENT", "HISTORICAL"]),
                st.booleans(),
                st.integers(1, 29 * 60_000),
            ),
            max_size=2,
        ),
    }
)


def _events(cases: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for n, case in enumerate(cases):
        cid, loop = f"c{n}", case["loop"]
        if case["has_input"]:
            events.append(
                (
                    "inputs",
                    {
                        "event_id": f"i{n}",
                        "case_id": cid,
                        "loop": loop,
                        "ts": T0 + case["input_at"],
                        "source": "s",
                        "category": case["category"],
                    },
                )
            )
        for k, res in enumerate(case["resolutions"]):
            events.append(
                (
                    "resolutions",
                    {
                        "event_id": f"r{n}.{k}",
                        "case_id": cid,
                        "loop": loop,
                        "ts": T0 + case["input_at"] + res["after"],
                        "resolver": res["resolver"],
                        "outcome": res["outcome"],
                        "release": "r",
                        "model_cost_usd": res["cost"],
                        "other_cost_usd": 0.0,
                        "human_minutes": res["human"],
                        "eval_passed": res["passed"],
                    },
                )
            )
        for k, (suite, passed, at) in enumerate(case["verdicts"]):
            events.append(
                (
                    "eval-results",
                    {
                        "event_id": f"v{n}.{k}",
                        "eval_case_id": f"e{n}.{k}",
                        "loop": loop,
                        "ts": T0 + at,
                        "release": "r",
                        "suite": suite,
                        "passed": passed,
                        "evaluator": "j",
                    },
                )
            )
    return events


def _reference(
    events: list[tuple[str, dict[str, Any]]], loop: str, start: int, end: int
) -> dict[str, Any]:
    """Batch recomputation of one window (start, end] from deduplicated events."""
    unique = {r["event_id"]: (t, r) for t, r in events}.values()
    inputs = {r["case_id"]: r["ts"] for t, r in unique if t == "inputs"}
    inside = [(t, r) for t, r in unique if r["loop"] == loop and start < r["ts"] <= end]
    res = [r for t, r in inside if t == "resolutions"]
    verdicts = [(r["suite"], r["passed"]) for t, r in inside if t == "eval-results"]
    verdicts += [("CURRENT", r["eval_passed"]) for r in res if r["eval_passed"] is not None]
    cats = np.array([r["category"] or "" for t, r in inside if t == "inputs"], dtype=object)
    resolvers = np.array([r["resolver"] for r in res], dtype=object)
    human = np.array([r["human_minutes"] for r in res], dtype=float)
    cost = np.array([r["model_cost_usd"] + r["other_cost_usd"] for r in res], dtype=float)
    lat = np.array(
        [(r["ts"] - inputs[r["case_id"]]) / 1000 for r in res if r["case_id"] in inputs],
        dtype=float,
    )

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    def rate(suites: set[str]) -> float | None:
        chosen = [p for s, p in verdicts if s in suites]
        return ratio(sum(chosen), len(chosen))

    n = len(res)
    return {
        "resolved": n,
        "coverage": ratio(float(np.sum(resolvers == "SYSTEM")), n),
        "assisted": ratio(float(np.sum(resolvers == "HYBRID")), n),
        "quality": {
            "current": rate({"CURRENT"}),
            "historical": rate({"HISTORICAL"}),
            "all": rate({"CURRENT", "HISTORICAL"}),
        },
        "latency": {
            k: (float(np.quantile(lat, q, method="lower")) if lat.size else None)
            for k, q in {"p50": 0.5, "p90": 0.9, "p99": 0.99}.items()
        },
        "cost": ratio(cost.sum() + human.sum() / 60 * RATES.get(loop, 0.0), n),
        "toil": human.sum() / 60,
        "uncovered": ratio(float(np.sum(cats != "")), float(np.sum(cats != ""))),
    }


def _check(window: dict[str, Any], ref: dict[str, Any]) -> None:
    assert window["resolved"] == ref["resolved"]
    assert window["coverage"] == ref["coverage"]
    assert window["assisted"] == ref["assisted"]
    assert window["quality"] == ref["quality"]
    assert window["uncovered_ratio"] == ref["uncovered"]  # no eval cases: all uncovered
    assert window["toil_hours"] == pytest.approx(ref["toil"], rel=1e-9, abs=1e-12)
    if ref["cost"] is None:
        assert window["cost_per_resolution_usd"] is None
    else:
        assert window["cost_per_resolution_usd"] == pytest.approx(ref["cost"], rel=1e-9, abs=1e-12)
    for key, expected in ref["latency"].items():
        got = window["latency_seconds"][key]
        if expected is None:
            assert got is None
        else:
            assert abs(got - expected) <= RELATIVE_ACCURACY * expected + 1e-9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases=st.lists(case_st, max_size=40),
    order_seed=st.integers(0, 2**32 - 1),
    duplicates=st.integers(0, 10),
)
def test_replay_equals_batch_recomputation(
    cases: list[dict[str, Any]], order_seed: int, duplicates: int
) -> None:
    events = _events(cases)
    shuffler = random.Random(order_seed)
    stream = events + [shuffler.choice(events) for _ in range(duplicates if events else 0)]
    shuffler.shuffle(stream)  # out of order either way, copies anywhere
    processor = Processor(CoreConfig(hourly_rates=RATES))
    for topic, record in stream:
        processor.process(topic, record)
    snapshot = processor.snapshot(AS_OF)
    for loop in LOOPS:
        if loop not in snapshot["loops"]:
            assert not any(r["loop"] == loop for _, r in events)
            continue
        windows = snapshot["loops"][loop]["windows"]
        _check(windows["5m"], _reference(events, loop, AS_OF - 5 * MINUTE, AS_OF))
        _check(windows["1h"], _reference(events, loop, AS_OF - 60 * MINUTE, AS_OF))


@given(
    st.lists(st.floats(0, 1e5, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.0, 0.25, 0.5, 0.9, 0.99, 1.0]),
)
def test_sketch_matches_ddsketch_and_its_bound(values: list[float], q: float) -> None:
    ours, theirs = LatencySketch(), DDSketch(RELATIVE_ACCURACY)
    for value in values:
        ours.add(value)
        theirs.add(value)
    got = ours.quantile(q)
    assert got == pytest.approx(theirs.get_quantile_value(q), rel=1e-12, abs=1e-12)
    exact = float(np.quantile(np.array(values), q, method="lower"))
    assert got is not None and abs(got - exact) <= RELATIVE_ACCURACY * exact + 1e-9


@given(st.lists(st.integers(0, 20 * 24 * 3600), min_size=1, max_size=200))
def test_rollup_into_coarser_tiers_loses_no_event(offsets_s: list[int]) -> None:
    series = BucketSeries(default_tiers(10_000))
    for offset in sorted(offsets_s):
        ts = T0 + offset * 1000
        bucket = series.bucket(ts)
        if bucket is not None:
            bucket.resolutions[("SYSTEM", "RESOLVED")] += 1
        series.advance(ts)
    kept = sum(a.resolved for tier in series.buckets for a in tier.values())
    horizon = T0 + max(offsets_s) * 1000 - 15 * 24 * 3600 * 1000
    # Everything newer than the coarsest retention (plus one coarse bucket of slack) is kept.
    assert kept >= sum(1 for o in offsets_s if T0 + o * 1000 > horizon + 5 * MINUTE)
    assert kept <= len(offsets_s)


def test_aggregate_json_round_trip() -> None:
    agg = Aggregate()
    agg.resolutions[("HYBRID", "FAILED")] += 2
    agg.verdicts[("HISTORICAL", False)] += 1
    agg.cost_nano_usd += 1_250_000_000
    agg.human_micro_minutes += 3_000_000
    agg.latency.add(4.2)
    agg.inputs["x"] += 5
    agg.settled[-3] += 2
    assert Aggregate.from_json(json.loads(json.dumps(agg.to_json()))) == agg


def test_replay_cli_prints_the_processor_snapshot(tmp_path: Path) -> None:
    events = _events(
        [
            {
                "loop": "alpha",
                "input_at": 1000,
                "category": "a",
                "has_input": True,
                "resolutions": [
                    {
                        "after": 4000,
                        "resolver": "SYSTEM",
                        "outcome": "RESOLVED",
                        "cost": 0.5,
                        "human": 0.0,
                        "passed": True,
                    }
                ],
                "verdicts": [],
            }
        ]
    )
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"topic": t, "record": r}) for t, r in events]
    lines.insert(1, "{not json")
    lines.append(json.dumps({"topic": "outputs", "record": {}}))
    lines.append(json.dumps({"topic": "inputs", "record": {**events[0][1], "ts": "soon"}}))
    nan_cost = {**events[1][1], "event_id": "nan", "model_cost_usd": float("nan")}
    lines.append(json.dumps({"topic": events[1][0], "record": nan_cost}))  # NaN is read back
    path.write_text("\n".join(lines) + "\n")
    processor = Processor()
    report = replay([path], processor)
    assert report.statuses == {"ok": 2}
    assert [m.split(": ")[0] for m in report.rejected] == [
        f"{path}:2",
        f"{path}:4",
        f"{path}:5",
        f"{path}:6",
    ]
    assert "unknown topic 'outputs'" in report.rejected[1]
    assert report.rejected[3].endswith("Resolution.model_cost_usd: nan is not a finite amount")
    window = processor.snapshot()["loops"]["alpha"]["windows"]["5m"]
    assert window["resolved"] == 1 and window["coverage"] == 1.0


def test_replay_cli_uses_the_workers_configuration(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    events = _events(
        [
            {
                "loop": "alpha",
                "input_at": 1000,
                "category": "a",
                "has_input": True,
                "resolutions": [
                    {
                        "after": 4000,
                        "resolver": "HUMAN",
                        "outcome": "RESOLVED",
                        "cost": 0.5,
                        "human": 12.0,
                        "passed": None,
                    }
                ],
                "verdicts": [],
            }
        ]
    )
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"topic": t, "record": r}) + "\n" for t, r in events))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "replay", str(path)],
        env={**os.environ, "LOOPLINE_HOURLY_RATES": "alpha=40"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    window = json.loads(result.stdout)["loops"]["alpha"]["windows"]["5m"]
    # 0.5 USD of model cost + 12 min at 40 USD/h (8 USD), one resolution.
    assert window["cost_per_resolution_usd"] == pytest.approx(8.5)


def test_replay_cli_prints_the_rest_and_exits_2_when_a_line_is_rejected(tmp_path: Path) -> None:
    import subprocess
    import sys

    input_event = {
        "event_id": "i1",
        "case_id": "c1",
        "loop": "alpha",
        "ts": 1_000,
        "source": "api",
        "category": "a",
    }
    good = json.dumps({"topic": "inputs", "record": input_event})
    path = tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "pipeline.cli", "replay", str(path)]
    for lines, status in (([good], 0), ([good, "{not json"], 2)):
        path.write_text("\n".join(lines) + "\n")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == status, result.stderr
        # the line that was read counts: one input, not resolved (the ratio is null without it)
        window = json.loads(result.stdout)["loops"]["alpha"]["windows"]["5m"]
        assert (window["resolved"], window["uncovered_ratio"]) == (0, 1.0)
    assert f"rejected {path}:2: not JSON" in result.stderr
    assert "exit status 2: 1 rejected (listed above)" in result.stderr


def test_replay_says_its_progress_line_by_line_read(tmp_path: Path) -> None:
    """A backfill of millions of lines takes long: replay says how far it is (the CLI every
    2 s on stderr; here at every line), rejected lines counted as read."""
    record = {"event_id": "i1", "case_id": "c1", "loop": "alpha", "ts": 1_000, "source": "api"}
    path = tmp_path / "events.jsonl"
    lines = [
        json.dumps({"topic": "inputs", "record": record}),
        "{not json",
        json.dumps({"topic": "inputs", "record": {**record, "event_id": "i2", "case_id": "c2"}}),
        json.dumps({"topic": "eval-cases", "key": "e1", "record": None}),
    ]
    path.write_text("\n".join(lines) + "\n")
    said: list[str] = []
    replay([path], Processor(CoreConfig()), meter=Meter("replay", said.append, every=0.0))
    shown = [re.sub(r"\([\d,]+/s\)", "(R/s)", line) for line in said]
    assert shown == [
        "replay: 1 events (R/s) inputs=1",
        "replay: 2 events (R/s) inputs=1 rejected=1",
        "replay: 3 events (R/s) inputs=2 rejected=1",
        "replay: 4 events (R/s) eval-cases=1 inputs=2 rejected=1",
    ]


def test_replay_names_a_missing_or_unreadable_time_as_the_field_it_is(tmp_path: Path) -> None:
    """A record without ts was rejected as "not a timestamp: None", one with unreadable text
    as "Invalid isoformat string"; both now say it is ts."""
    record = {"event_id": "i1", "case_id": "c1", "loop": "alpha", "source": "api"}
    path = tmp_path / "events.jsonl"
    lines = [{"topic": "inputs", "record": record}]
    lines.append({"topic": "inputs", "record": {**record, "ts": "yesterday"}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = replay([path], Processor(CoreConfig()))
    assert report.rejected == [
        f"{path}:1: InputEvent.ts: required field is missing",
        f"{path}:2: ts: not a timestamp: 'yesterday' (epoch milliseconds or ISO-8601 text "
        "with its offset)",
    ]


def test_replay_reads_an_avro_container_and_a_damaged_one_up_to_the_damage(
    tmp_path: Path,
) -> None:
    import fastavro

    from pipeline.codec import Codec

    schema = fastavro.parse_schema(Codec.load().schema("InputEvent"))
    at = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    inputs = [
        {"event_id": f"i{n}", "case_id": f"c{n}", "loop": "alpha", "ts": at, "source": "api"}
        for n in range(5)
    ]
    path = tmp_path / "inputs.avro"
    with path.open("wb") as out:
        fastavro.writer(out, schema, inputs[:3])  # a block of three
    first_block_ends = path.stat().st_size
    with path.open("a+b") as out:
        fastavro.writer(out, schema, inputs[3:])  # appended: a second block, of two
    report = replay([path], Processor())
    assert (report.statuses, report.rejected) == ({"ok": 5}, [])
    damaged = tmp_path / "damaged.avro"
    damaged.write_bytes(path.read_bytes()[: first_block_ends + 12])  # cut in the second block
    report = replay([damaged], Processor())
    assert report.statuses == {"ok": 3}
    [reason] = report.rejected
    assert reason.startswith(f"{damaged}#4: the Avro file cannot be read from here on (EOFError")


def test_replay_refuses_times_before_1970_or_from_the_year_9999(tmp_path: Path) -> None:
    """JSON holds any number: a ts of 10**17 ms crashed replay printing the snapshot (no
    datetime holds the year 3,170,843), and one before 1970 is no event time either."""
    base = {"case_id": "c1", "loop": "alpha", "source": "api"}
    lines = [
        {"topic": "inputs", "record": {**base, "event_id": "i1", "ts": 1_000}},
        {"topic": "inputs", "record": {**base, "event_id": "i2", "ts": 10**17}},
        {"topic": "inputs", "record": {**base, "event_id": "i3", "ts": -5_000}},
        {"topic": "inputs", "record": {**base, "event_id": "i4", "ts": 253_370_764_799_999}},
        {"topic": "inputs", "record": {**base, "event_id": "i5", "ts": 253_370_764_800_000}},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    processor = Processor()
    report = replay([path], processor)
    assert report.statuses == {"ok": 2}
    assert report.rejected == [
        f"{path}:2: ts: 100000000000000000 ms is not between 1970-01-01 and 9999-01-01",
        f"{path}:3: ts: -5000 ms is not between 1970-01-01 and 9999-01-01",
        f"{path}:5: ts: 253370764800000 ms is not between 1970-01-01 and 9999-01-01",
    ]
    # the last time counted: the snapshot as of its bucket's end (10 s buckets)
    assert processor.snapshot()["as_of"] == "9999-01-01T00:00:00Z"


def test_replay_deletes_an_eval_case_on_a_null_record_with_its_key(tmp_path: Path) -> None:
    """The replay form of a tombstone, so replay and the workers agree on a deleted case."""

    def case(eval_case_id: str, category: str) -> dict[str, Any]:
        return {
            "eval_case_id": eval_case_id,
            "loop": "alpha",
            "ts": 0,
            "suite": "CURRENT",
            "origin": "IMPORTED",
            "category": category,
        }

    def event(case_id: str, category: str) -> dict[str, Any]:
        return {
            "event_id": case_id,
            "case_id": case_id,
            "loop": "alpha",
            "ts": 1000,
            "source": "t",
            "category": category,
        }

    lines = [
        {"topic": "eval-cases", "record": case("ec-a", "a")},
        {"topic": "eval-cases", "record": case("ec-b", "b")},
        {"topic": "inputs", "record": event("c1", "a")},
        {"topic": "inputs", "record": event("c2", "b")},
        {"topic": "eval-cases", "key": "ec-b", "record": None},
        {"topic": "inputs", "key": "c1", "record": None},  # deletions are for eval-cases only
        {"topic": "eval-cases", "record": None},  # a deletion without its key
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    processor = Processor()
    report = replay([path], processor)
    assert report.statuses == {"ok": 5}
    assert [m.split(": ", 1)[1] for m in report.rejected] == [
        "a null record (a deletion) is for eval-cases only",
        'a null record (a deletion) needs a "key"',
    ]
    # Categories a (covered by ec-a) and b (its case deleted): 1 of 2 inputs uncovered.
    window = processor.snapshot(1000)["loops"]["alpha"]["windows"]["5m"]
    assert window["uncovered_ratio"] == 0.5
