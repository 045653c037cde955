"""The five numbers on a hand-checked scenario: every expected value is worked out below."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.candidates import CaseProposal
from pipeline.codec import CodecError
from pipeline.core import CoreConfig
from pipeline.partials import EvalCaseChange, Partial
from pipeline.partition import PartitionCore
from pipeline.processor import Processor

Event = tuple[str, dict[str, Any]]
T0 = int(datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp() * 1000)
S = 1000


def _input(
    event_id: str, case_id: str, at: int, category: str | None
) -> tuple[str, dict[str, Any]]:
    return "inputs", {
        "event_id": event_id,
        "case_id": case_id,
        "loop": "refunds",
        "ts": T0 + at * S,
        "source": "api",
        "category": category,
    }


def _resolution(
    event_id: str,
    case_id: str,
    at: int,
    resolver: str,
    outcome: str,
    cost: float = 0.0,
    other: float = 0.0,
    human: float = 0.0,
    passed: bool | None = None,
) -> tuple[str, dict[str, Any]]:
    return "resolutions", {
        "event_id": event_id,
        "case_id": case_id,
        "loop": "refunds",
        "ts": T0 + at * S,
        "resolver": resolver,
        "outcome": outcome,
        "release": "r1",
        "model_cost_usd": cost,
        "other_cost_usd": other,
        "human_minutes": human,
        "eval_passed": passed,
    }


def _verdict(event_id: str, at: int, suite: str, passed: bool) -> tuple[str, dict[str, Any]]:
    return "eval-results", {
        "event_id": event_id,
        "eval_case_id": f"ec-{event_id}",
        "loop": "refunds",
        "ts": T0 + at * S,
        "release": "r1",
        "suite": suite,
        "passed": passed,
        "evaluator": "judge",
    }


EVENTS = [
    _input("i1", "c1", 1, "late"),
    _resolution("r1", "c1", 11, "SYSTEM", "RESOLVED", cost=0.02, other=0.01, passed=True),
    _input("i2", "c2", 2, "damaged"),
    _resolution("r2", "c2", 62, "HUMAN", "RESOLVED", human=30.0),
    # c3 is resolved before its input arrives: latency joins when the input comes.
    _resolution("r3", "c3", 20, "HYBRID", "ESCALATED", cost=0.05, human=6.0, passed=False),
    _input("i3", "c3", 5, "late"),
    _resolution("r1", "c1", 11, "SYSTEM", "RESOLVED", cost=0.02, other=0.01, passed=True),
    _input("i1", "c1", 1, "late"),  # two redelivered copies: counted once
    _verdict("v1", 30, "CURRENT", True),
    _verdict("v2", 40, "HISTORICAL", False),
    _verdict("v3", 50, "HISTORICAL", True),
    _input("i4", "c4", 70, None),  # never resolved
    _resolution("r5", "c5", 80, "SYSTEM", "FAILED", cost=0.03),  # input never arrives
    (
        "eval-cases",
        {
            "eval_case_id": "ec-late",
            "loop": "refunds",
            "ts": T0,
            "suite": "CURRENT",
            "origin": "IMPORTED",
            "category": "late",
        },
    ),
]


@pytest.fixture
def processor() -> Processor:
    proc = Processor(CoreConfig(hourly_rates={"refunds": 60.0}))
    statuses = [proc.process(topic, record) for topic, record in EVENTS]
    assert statuses.count("duplicate") == 2
    assert statuses.count("ok") == len(EVENTS) - 2
    return proc


def test_hand_checked_numbers(processor: Processor) -> None:
    snapshot = processor.snapshot(T0 + 90 * S)
    assert snapshot["as_of"] == "2026-11-25T12:01:30Z"
    window = snapshot["loops"]["refunds"]["windows"]["5m"]
    # Resolved cases: c1, c2, c3, c5 -> 4. SYSTEM: c1, c5 -> 2/4; HYBRID: c3 -> 1/4.
    assert window["resolved"] == 4
    assert window["coverage"] == 0.5
    assert window["assisted"] == 0.25
    # CURRENT verdicts: c1 online pass, c3 online fail, v1 pass -> 2/3. HISTORICAL: v2 fail,
    # v3 pass -> 1/2. All: 3 of 5.
    assert window["quality"] == {"current": 2 / 3, "historical": 0.5, "all": 0.6}
    # Latencies: c1 11-1 = 10 s, c2 62-2 = 60 s, c3 20-5 = 15 s; c5 has no input.
    # DDSketch takes the value at rank floor(q*(n-1)) of [10, 15, 60]: p50 -> rank 1 -> 15 s;
    # p90 -> 1.8 -> 15 s; p99 -> 1.98 -> 15 s (numpy's "lower" method), within 1 %.
    latency = window["latency_seconds"]
    assert latency["p50"] == pytest.approx(15.0, rel=0.01)
    assert latency["p90"] == pytest.approx(15.0, rel=0.01)
    assert latency["p99"] == pytest.approx(15.0, rel=0.01)
    processor.process(*_resolution("r7", "c2", 63, "HUMAN", "RESOLVED"))  # c2 again: 61 s
    # Now [10, 15, 60, 61]: p50 -> rank 1.5 -> 15 s; p90 -> 2.7 -> 60 s; p99 -> 2.97 -> 60 s.
    latency = processor.snapshot(T0 + 90 * S)["loops"]["refunds"]["windows"]["5m"][
        "latency_seconds"
    ]
    assert latency["p50"] == pytest.approx(15.0, rel=0.01)
    assert latency["p90"] == pytest.approx(60.0, rel=0.01)
    assert latency["p99"] == pytest.approx(60.0, rel=0.01)
    # Cost: model+other 0.03 + 0 + 0.05 + 0.03 = 0.11 USD; human 30 + 6 = 36 min at 60 USD/h
    # = 36 USD; (36.11) / 4 resolved = 9.0275 USD. Toil: 36 min = 0.6 h.
    assert window["cost_per_resolution_usd"] == pytest.approx(9.0275, abs=1e-12)
    assert window["toil_hours"] == pytest.approx(0.6, abs=1e-12)
    # Categorised inputs: late (c1), damaged (c2), late (c3); the eval set covers "late":
    # 1 uncovered of 3.
    assert window["uncovered_ratio"] == pytest.approx(1 / 3)
    # Nothing a week earlier: counts move by their full value, ratios have no delta.
    assert window["wow_delta"]["resolved"] == 4
    assert window["wow_delta"]["coverage"] is None
    assert window["wow_delta"]["toil_hours"] == pytest.approx(0.6)


def test_window_edges_follow_buckets(processor: Processor) -> None:
    # As of T0+60 s the 5m window is (T0-240 s, T0+60 s]: r2 (62 s) and r5 (80 s) are out.
    window = processor.snapshot(T0 + 60 * S)["loops"]["refunds"]["windows"]["5m"]
    assert window["resolved"] == 2  # c1 and c3
    assert window["coverage"] == 0.5
    assert window["latency_seconds"]["p50"] == pytest.approx(10.0, rel=0.01)  # rank 0.5 -> 10 s
    # A resolution at exactly T0+60 s belongs to the bucket (50 s, 60 s]:
    processor.process(*_resolution("r6", "c6", 60, "SYSTEM", "RESOLVED"))
    assert processor.snapshot(T0 + 60 * S)["loops"]["refunds"]["windows"]["5m"]["resolved"] == 3


def test_ratios_without_denominator_are_null() -> None:
    proc = Processor()
    proc.process(*_input("i1", "c1", 1, None))
    window = proc.snapshot(T0 + 10 * S)["loops"]["refunds"]["windows"]["1h"]
    assert window["resolved"] == 0
    assert window["coverage"] is None and window["cost_per_resolution_usd"] is None
    assert window["quality"] == {"current": None, "historical": None, "all": None}
    assert window["latency_seconds"] == {"p50": None, "p90": None, "p99": None}
    assert window["uncovered_ratio"] is None
    assert window["toil_hours"] == 0.0


def test_unresolved_past_sla(processor: Processor) -> None:
    assert processor.unresolved() == {"refunds": 0}  # c4 is 10 s old, SLA is 1 h
    assert processor.unresolved(T0 + 70 * S + 3600 * S + 1) == {"refunds": 1}


def test_a_later_resolution_changes_only_its_own_bucket_and_still_counts() -> None:
    # Buckets are 10 s and end at their boundary: inputs at 10, 2 and 3 s are in bucket 0, one
    # at 25 s in bucket 2.
    # c1 is resolved at 35 s (bucket 3): recorded there, bucket 0 is not touched. c2 is
    # resolved at 8 s (bucket 0 itself). c4's resolution is stamped 12 s (bucket 1), before
    # its input (clock skew): taken off bucket 2. c3 stays open.
    core = PartitionCore(CoreConfig())
    inputs = [_input("i1", "c1", 10, None), _input("i2", "c2", 2, None)]
    inputs += [_input("i3", "c3", 3, None), _input("i4", "c4", 25, None)]
    for topic, record in inputs:
        core.process(topic, record["case_id"], record)
    sent = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    b0 = T0 // (10 * S)  # bucket indices count from the epoch
    assert sorted(i - b0 for m in sent for i in m.buckets) == [0, 2]
    core.changed_records()
    resolutions = [_resolution("r1", "c1", 35, "SYSTEM", "RESOLVED")]
    resolutions += [_resolution("r2", "c2", 8, "SYSTEM", "RESOLVED")]
    resolutions += [_resolution("r4", "c4", 12, "SYSTEM", "RESOLVED")]
    for topic, record in resolutions:
        core.process(topic, record["case_id"], record)
    drained = [m for m in core.drain() if isinstance(m, Partial)]
    changed = {i - b0: a for m in drained for i, a in m.buckets.items()}
    assert sorted(changed) == [0, 1, 2, 3]  # r2 in 0, r4 in 1 (and 2's count), r1 in 3
    assert changed[3].settled == {b0: 1} and changed[0].unresolved == 2  # c1 not taken off 0
    assert changed[2].unresolved == 0 and not changed[1].settled  # c4: skewed, taken off 2
    # Past the SLA of every bucket, only c3 is unresolved.
    proc = Processor()
    for topic, record in inputs + resolutions:
        proc.process(topic, record)
    late = T0 + 3600 * S + 40 * S
    assert proc.unresolved(late) == {"refunds": 1}
    # Due for bucket 0 only: c3 (c1 settled by bucket 3, c2 in bucket 0 itself).
    assert proc.unresolved(T0 + 3600 * S + 10 * S) == {"refunds": 1}


def test_human_time_is_free_until_a_rate_is_set() -> None:
    proc = Processor()
    for topic, record in EVENTS:
        proc.process(topic, record)
    window = proc.snapshot(T0 + 90 * S)["loops"]["refunds"]["windows"]["5m"]
    assert window["cost_per_resolution_usd"] == pytest.approx(0.11 / 4, abs=1e-12)


def test_week_over_week_delta_compares_the_same_window_a_week_earlier() -> None:
    week = 7 * 24 * 3600 * S
    proc = Processor()
    proc.process(*_resolution("a", "c1", 5, "HUMAN", "RESOLVED", human=60.0))
    proc.process(*_resolution("b", "c2", 6, "SYSTEM", "RESOLVED"))
    later = [_resolution(f"n{i}", f"d{i}", 5, "SYSTEM", "RESOLVED") for i in range(3)]
    for topic, record in later:
        proc.process(topic, {**record, "ts": record["ts"] + week})
    window = proc.snapshot(T0 + week + 10 * S)["loops"]["refunds"]["windows"]["1h"]
    # Now: 3 SYSTEM of 3 -> 1.0, no toil; a week ago: 1 of 2 -> 0.5, 1 h of toil.
    assert window["coverage"] == 1.0
    assert window["wow_delta"]["coverage"] == 0.5
    assert window["wow_delta"]["toil_hours"] == -1.0
    assert window["wow_delta"]["resolved"] == 1


def test_only_configured_loops_keep_their_name() -> None:
    proc = Processor(CoreConfig(loops=frozenset({"refunds"})))
    proc.process(*_resolution("a", "c1", 5, "SYSTEM", "RESOLVED"))
    for n, loop in enumerate(["kyc", "billing"]):
        topic, record = _resolution(f"x{n}", f"d{n}", 6, "HUMAN", "RESOLVED")
        proc.process(topic, {**record, "loop": loop})
    loops = proc.snapshot(T0 + 10 * S)["loops"]
    assert sorted(loops) == ["other", "refunds"]
    assert loops["other"]["windows"]["5m"]["resolved"] == 2
    assert loops["other"]["windows"]["5m"]["coverage"] == 0.0


def test_late_events_past_the_allowed_lateness_are_refused() -> None:
    proc = Processor(CoreConfig(allowed_lateness_ms=60 * S))
    assert proc.process(*_resolution("a", "c1", 200, "SYSTEM", "RESOLVED")) == "ok"
    assert proc.process(*_resolution("b", "c2", 141, "SYSTEM", "RESOLVED")) == "ok"  # 59 s late
    assert proc.process(*_resolution("c", "c3", 140, "SYSTEM", "RESOLVED")) == "too_late"
    assert proc.snapshot(T0 + 200 * S)["loops"]["refunds"]["windows"]["5m"]["resolved"] == 2


def _eval_case(eval_case_id: str, category: str) -> tuple[str, dict[str, Any]]:
    return "eval-cases", {
        "eval_case_id": eval_case_id,
        "loop": "refunds",
        "ts": T0,
        "suite": "CURRENT",
        "origin": "IMPORTED",
        "category": category,
    }


def test_a_deleted_eval_case_leaves_the_baseline(processor: Processor) -> None:
    def uncovered() -> float | None:
        window = processor.snapshot(T0 + 90 * S)["loops"]["refunds"]["windows"]["5m"]
        return window["uncovered_ratio"]  # type: ignore[no-any-return]

    # Inputs by category: late (c1), damaged (c2), late (c3).
    processor.process(*_eval_case("ec-damaged", "damaged"))
    assert uncovered() == 0.0
    assert processor.delete_eval_case("ec-late") == "ok"
    assert uncovered() == pytest.approx(2 / 3)  # both late inputs are uncovered again
    assert processor.delete_eval_case("never-seen") == "ok"  # nothing to drop
    assert uncovered() == pytest.approx(2 / 3)


def test_a_tombstone_after_a_restart_still_finds_the_eval_cases_loop() -> None:
    """Stage 1 checkpoints which loop each eval case belongs to: a tombstone carries only the
    id, and the restarted partition must still tell that loop's stage 2 to drop the case."""
    config = CoreConfig()
    before = PartitionCore(config, partition=3)
    topic, record = _eval_case("ec-1", "late")
    before.process(topic, "ec-1", record)
    list(before.drain())
    after = PartitionCore.from_records(config, 3, before.changed_records())
    assert after.delete_eval_case("ec-1") == "ok"
    assert list(after.drain()) == [EvalCaseChange("refunds", "ec-1", None, deleted=True)]
    assert after.changed_records()["e/ec-1"] is None  # the checkpoint forgets it too
    after.delete_eval_case("ec-1")  # a second tombstone: nothing left to drop
    assert list(after.drain()) == []


def test_a_non_finite_amount_is_refused_before_anything_is_counted() -> None:
    proc = Processor()
    topic, record = _resolution("r1", "c1", 10, "SYSTEM", "RESOLVED", cost=float("nan"))
    with pytest.raises(CodecError, match="model_cost_usd: nan is not a finite amount") as raised:
        proc.process(topic, record)
    assert raised.value.reason == "invalid"
    topic, record = _resolution("r2", "c2", 10, "HUMAN", "RESOLVED", human=float("inf"))
    with pytest.raises(CodecError, match="human_minutes: inf is not a finite amount"):
        proc.process(topic, record)
    assert proc.snapshot(T0 + 20 * S)["loops"] == {}  # nothing counted, no loop created
    # The corrected record, with the same event id, is not a duplicate: it counts.
    fixed = _resolution("r1", "c1", 10, "SYSTEM", "RESOLVED", cost=0.25, other=0.5)
    assert proc.process(*fixed) == "ok"
    window = proc.snapshot(T0 + 20 * S)["loops"]["refunds"]["windows"]["5m"]
    assert (window["resolved"], window["cost_per_resolution_usd"]) == (1, 0.75)


def test_a_candidate_shows_no_non_finite_number() -> None:
    """Non-finite feature values and embeddings are left out of what a candidate shows (JSON
    cannot carry them), a non-finite confidence reads as unknown; the rest is kept."""
    core = PartitionCore(CoreConfig(), partition=0)
    topic, record = _input("i1", "c1", 1, "late")
    record |= {"features": {"amount": float("nan"), "age": 3.5}, "embedding": [1.0, float("inf")]}
    core.process(topic, "c1", record)
    topic, record = _resolution("r1", "c1", 9, "SYSTEM", "FAILED", cost=0.5)
    core.process(topic, "c1", {**record, "confidence": float("nan")})
    (proposal,) = [m for m in core.drain() if isinstance(m, CaseProposal)]
    assert proposal.input["features"] == {"age": 3.5}
    assert proposal.input["embedding"] is None
    assert proposal.resolution["confidence"] is None
    assert proposal.resolution["cost_usd"] == 0.5
    restored = PartitionCore.from_records(CoreConfig(), 0, core.changed_records())
    assert restored.cases["c1"] == core.cases["c1"]


def test_a_loops_changed_buckets_go_to_stage_2_one_message_each() -> None:
    """A Kafka message holds at most 1 MiB and a bucket's feature summaries can take a good
    part of that: each changed bucket is its own Partial (stage 2 keeps the latest of each)."""
    core = PartitionCore(CoreConfig(bucket_ms=10 * S), partition=2)
    for n, at in enumerate([1, 12, 25, 26]):  # buckets 0, 1, 2, 2 of the loop
        topic, record = _input(f"i{n}", f"c{n}", at, "late")
        core.process(topic, f"c{n}", record)
    partials = [m for m in core.drain() if isinstance(m, Partial)]
    first = T0 // (10 * S)  # T0 is on a bucket edge; a bucket is (start, end]
    assert [(p.loop, sorted(p.buckets)) for p in partials] == [
        ("refunds", [first]),
        ("refunds", [first + 1]),
        ("refunds", [first + 2]),
    ]
    assert {p.watermark_ms for p in partials} == {T0 + 26 * S}
    assert [p.buckets[k].events for p in partials for k in p.buckets] == [1, 1, 2]
    core.advance(T0 + 40 * S)  # only the watermark moved: one message for the loop
    assert [(p.loop, dict(p.buckets)) for p in core.drain() if isinstance(p, Partial)] == [
        ("refunds", {})
    ]


def test_long_categorical_values_are_cut_alike_for_inputs_and_the_eval_set() -> None:
    """A free-text value is no category: only its first 100 characters are kept, so 1,000
    distinct long values cannot make a bucket's partial larger than a Kafka message. An input
    and an eval case with the same long category still cover each other; so do two inputs
    whose categories differ only past the cut."""
    proc = Processor()
    long = "refund because " + "x" * 400
    proc.process(*_eval_case("ec-1", long + " (from the eval set)"))
    proc.process(*_input("i1", "c1", 1, long + " (one)"))
    proc.process(*_input("i2", "c2", 2, long + " (two)"))
    proc.process(*_input("i3", "c3", 3, "damaged"))
    record = {**_input("i4", "c4", 4, None)[1], "attributes": {"trace": "t" * 5000 + "1"}}
    proc.process("inputs", record)
    window = proc.snapshot(T0 + 10 * S)["loops"]["refunds"]["windows"]["5m"]
    # categorised inputs: two with the long category (covered), "damaged" (not): 1 of 3
    assert window["uncovered_ratio"] == pytest.approx(1 / 3)
    (bucket,) = [b for b in proc.stage1.buckets.values() if b.inputs]
    assert dict(bucket.inputs) == {long[:100]: 2, "damaged": 1, "": 1}
    assert dict(bucket.features.categorical["attributes.trace"]) == {"t" * 100: 1}
