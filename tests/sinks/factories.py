"""Fixture factories for archive tests: complete, valid records with only what a test changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

MONDAY = datetime(2026, 11, 16, tzinfo=UTC)  # 2026-W47 starts here


def at(day: int, seconds: float = 0.0) -> datetime:
    """A time in week 47 (day 0 = Monday), or in later/earlier weeks for day >= 7 / < 0."""
    return MONDAY + timedelta(days=day, seconds=seconds)


def input_event(
    event_id: str, case_id: str, ts: datetime, loop: str = "refunds", **kw: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "case_id": case_id,
        "loop": loop,
        "ts": ts,
        "source": "test",
        "channel": "email",
        "category": "late",
        "language": "en",
        "features": {"amount": 12.5},
        "attributes": {"tier": "pro"},
        "text": "where is my parcel",
        "embedding": [0.5, 0.25],
        "tokens": 42,
        **kw,
    }


def resolution(
    event_id: str, case_id: str, ts: datetime, loop: str = "refunds", **kw: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "case_id": case_id,
        "loop": loop,
        "ts": ts,
        "resolver": "SYSTEM",
        "outcome": "RESOLVED",
        "release": "r1",
        "model": "m",
        "model_cost_usd": 0.0,
        "other_cost_usd": 0.0,
        "input_tokens": None,
        "output_tokens": None,
        "human_minutes": 0.0,
        "confidence": None,
        "eval_passed": None,
        "failure_reason": None,
        "output": None,
        **kw,
    }


def eval_result(
    event_id: str, ts: datetime, passed: bool, loop: str = "refunds", **kw: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "eval_case_id": f"ec-{event_id}",
        "case_id": None,
        "loop": loop,
        "ts": ts,
        "release": "r1",
        "suite": "CURRENT",
        "passed": passed,
        "score": None,
        "evaluator": "test",
        **kw,
    }


def eval_case(eval_case_id: str, ts: datetime, loop: str = "refunds", **kw: Any) -> dict[str, Any]:
    return {
        "eval_case_id": eval_case_id,
        "loop": loop,
        "ts": ts,
        "suite": "CURRENT",
        "origin": "IMPORTED",
        "case_id": None,
        "channel": None,
        "category": "late",
        "language": None,
        "features": {},
        "attributes": {},
        "text": None,
        "embedding": None,
        "tokens": None,
        "expected": None,
        "notes": None,
        **kw,
    }


def alert(
    state: str, ts: datetime, started_at: datetime, rule: str = "quality_floor", **kw: Any
) -> dict[str, Any]:
    fingerprint = kw.pop("fingerprint", f"{rule}:refunds")
    return {
        "event_id": f"{fingerprint}:{state}:{started_at.isoformat()}",
        "fingerprint": fingerprint,
        "rule": rule,
        "loop": "refunds",
        "severity": "CRITICAL",
        "state": state,
        "value": 0.7,
        "threshold": 0.8,
        "window": "1h",
        "started_at": started_at,
        "ts": ts,
        "summary": f"{rule} {state.lower()}",
        "runbook_url": None,
        **kw,
    }


def candidate(candidate_id: str, ts: datetime, loop: str = "refunds", **kw: Any) -> dict[str, Any]:
    return {
        "candidate_id": candidate_id,
        "case_id": f"case-{candidate_id}",
        "loop": loop,
        "ts": ts,
        "reasons": ["failed_eval"],
        "priority": 1.0,
        "channel": None,
        "category": "late",
        "language": None,
        "input_text": None,
        "output": None,
        "resolver": "SYSTEM",
        "outcome": "FAILED",
        "release": "r1",
        "confidence": None,
        "cost_usd": None,
        "latency_seconds": None,
        "verdicts": {},
        "drifted_features": [],
        **kw,
    }


def review(candidate_id: str, decision: str, ts: datetime, **kw: Any) -> dict[str, Any]:
    return {
        "event_id": f"review-{candidate_id}",
        "candidate_id": candidate_id,
        "loop": "refunds",
        "reviewer": "ana",
        "decision": decision,
        "expected": None,
        "suite": None,
        "eval_case_id": None,
        "notes": None,
        "ts": ts,
        **kw,
    }


def snapshot(
    ts: datetime, loop: str = "refunds", drift: dict[str, Any] | None = None
) -> dict[str, Any]:
    window = {
        "resolved": 4,
        "coverage": 0.5,
        "assisted": 0.25,
        "quality": {"current": 1.0, "historical": None, "all": 1.0},
        "latency_seconds": {"p50": 8.0, "p90": 20.0, "p99": 30.0},
        "cost_per_resolution_usd": 0.125,
        "toil_hours": 0.5,
        "uncovered_ratio": None,
    }
    wow = {
        **window,
        "resolved": 1,
        "coverage": -0.25,
        "quality": {"current": None, "historical": None, "all": 0.0},
    }
    return {
        "event_id": f"w1:{loop}:{ts.isoformat()}",
        "ts": ts,
        "loop": loop,
        "producer": "w1",
        "unresolved_cases": 3,
        "windows_json": json.dumps({"5m": {**window, "wow_delta": wow}}),
        "drift_json": None if drift is None else json.dumps(drift),
    }
