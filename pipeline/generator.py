"""Deterministic synthetic traffic for several loops, with scenario switches.

Cases arrive as a Poisson process; each yields an input, a resolution after a resolver-specific
latency and sometimes eval verdicts. Events come out in event-time order. The same seed and
start give the same events, byte for byte.
"""

from __future__ import annotations

import heapq
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MS = 1000


@dataclass(frozen=True)
class Scenario:
    """Onsets in seconds of event time after the start; None switches a scenario off."""

    drift_at: float | None = None
    drift_end_at: float | None = None  # the inputs return to the baseline's distribution
    cost_spike_at: float | None = None
    latency_regression_at: float | None = None
    quality_drop_at: float | None = None
    quality_drop_release: str = "2026.11.1"


@dataclass(frozen=True)
class LoopProfile:
    name: str
    share: float
    categories: dict[str, float]
    drifted_categories: dict[str, float]
    resolvers: dict[str, float]
    base_release: str = "2026.11.0"


LOOPS: tuple[LoopProfile, ...] = (
    LoopProfile(
        "support-triage",
        0.5,
        {"billing": 0.3, "shipping": 0.25, "account": 0.2, "technical": 0.15, "returns": 0.1},
        {"billing": 0.1, "shipping": 0.1, "account": 0.1, "technical": 0.3, "outage": 0.4},
        {"SYSTEM": 0.65, "HYBRID": 0.15, "HUMAN": 0.2},
    ),
    LoopProfile(
        "refunds",
        0.3,
        {"damaged": 0.35, "late": 0.3, "not_received": 0.2, "wrong_item": 0.15},
        {"damaged": 0.1, "late": 0.1, "not_received": 0.2, "chargeback": 0.6},
        {"SYSTEM": 0.5, "HYBRID": 0.2, "HUMAN": 0.3},
    ),
    LoopProfile(
        "kyc-review",
        0.2,
        {"individual": 0.6, "business": 0.3, "high_risk": 0.1},
        {"individual": 0.2, "business": 0.3, "high_risk": 0.2, "crypto": 0.3},
        {"SYSTEM": 0.3, "HYBRID": 0.3, "HUMAN": 0.4},
    ),
)

CHANNELS = {"email": 0.35, "chat": 0.4, "phone": 0.1, "web": 0.15}
LANGUAGES = {"en": 0.6, "de": 0.15, "fr": 0.15, "es": 0.1}
# After the drift onset (a launch in a new market, say): other channels and languages, longer
# requests, larger orders, new categories; tiers, regions and account ages stay as they were,
# so 6 of the 9 features drift.
DRIFTED_CHANNELS = {"email": 0.1, "chat": 0.2, "phone": 0.3, "web": 0.4}
DRIFTED_LANGUAGES = {"en": 0.25, "de": 0.05, "fr": 0.1, "es": 0.6}
TIERS = {"free": 0.6, "pro": 0.3, "enterprise": 0.1}
REGIONS = {"eu": 0.4, "us": 0.45, "apac": 0.15}
# Median seconds from input to resolution by resolver, and lognormal spread.
LATENCY_MEDIAN_S = {"SYSTEM": 8.0, "HYBRID": 45.0, "HUMAN": 180.0}
HUMAN_MINUTES_MEDIAN = {"SYSTEM": 0.0, "HYBRID": 4.0, "HUMAN": 12.0}
OUTCOMES = {
    "SYSTEM": {"RESOLVED": 0.9, "ESCALATED": 0.07, "FAILED": 0.03},
    "HYBRID": {"RESOLVED": 0.93, "ESCALATED": 0.07},
    "HUMAN": {"RESOLVED": 0.95, "ABANDONED": 0.05},
}
USD_PER_TOKEN = 0.000004
EMBEDDING_DIM = 8
#: The share of the cases resolved with the model (SYSTEM or HYBRID) that get an online eval
#: result, and of all cases that come with a result of the historical suite.
ONLINE_EVAL_SHARE = 0.15
HISTORICAL_EVAL_SHARE = 0.1
#: The eval pass rate of a loop's base release: a healthy release clears the release gate's
#: 90 % floor by a margin the few hundred verdicts of a demo run do not miss (at 0.92 one
#: run in twenty failed it); a release shipped with --quality-drop-at passes 0.6.
BASE_PASS_RATE = 0.94
DROPPED_PASS_RATE = 0.6
#: Events per case on average, to pace event time: an input, a resolution and the eval results.
EVENTS_PER_CASE = (
    2
    + ONLINE_EVAL_SHARE * sum(p.share * (1 - p.resolvers["HUMAN"]) for p in LOOPS)
    + HISTORICAL_EVAL_SHARE
)


@dataclass(order=True)
class _Pending:
    ts_ms: int
    seq: int
    topic: str = field(compare=False)
    record: dict[str, Any] = field(compare=False)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def _centroid(category: str) -> list[float]:
    seeded = random.Random(f"centroid:{category}")
    return [seeded.uniform(-1.0, 1.0) for _ in range(EMBEDDING_DIM)]


# Request texts: a few phrasings per category, an order number, and now and then the personal
# data that candidates must not carry out of the pipeline (pipeline.redact).
PHRASES = (
    "please help with my {c} issue",
    "{c} again, second time this week",
    "urgent: {c}",
    "question about {c} on my account",
    "need a refund because of {c}",
    "is there an update on the {c} case",
)
CONTACTS = (
    "",
    "",
    "",
    " - reach me at {name}.{n}@example.com",
    " - call +49 30 {n} 55",
    " - card 4111 1111 1111 {n4}",
)


ITEMS = (
    "blender",
    "jacket",
    "phone case",
    "lamp",
    "sofa",
    "headphones",
    "kettle",
    "backpack",
    "monitor",
    "printer",
    "sneakers",
    "desk",
    "camera",
    "watch",
    "router",
    "mattress",
    "stroller",
    "guitar",
    "drill",
    "vacuum",
    "tent",
    "scooter",
    "coffee maker",
    "keyboard",
)
ADJECTIVES = ("red", "large", "refurbished", "gift", "second", "new", "spare", "bundle")


def _text(rng: random.Random, category: str) -> str:
    phrase = rng.choice(PHRASES).format(c=category.replace("_", " "))
    phrase += f" ({rng.choice(ADJECTIVES)} {rng.choice(ITEMS)})"
    contact = rng.choice(CONTACTS).format(
        name=rng.choice(("jane", "omar", "li", "ana")),
        n=rng.randrange(10**6),
        n4=f"{rng.randrange(10**4):04d}",
    )
    return f"{phrase}, order {rng.randrange(10**6):06d}{contact}"


def input_fields(rng: random.Random, loop: LoopProfile, drifted: bool) -> dict[str, Any]:
    """The input side of a case (InputEvent and EvalCase share it), before or after drift."""
    category = _pick(rng, loop.drifted_categories if drifted else loop.categories)
    tokens = max(16, int(_lognormal(rng, 400.0 * (1.7 if drifted else 1.0), 0.5)))
    order_value = _lognormal(rng, 60.0 * (1.8 if drifted else 1.0), 0.6)
    return {
        "channel": _pick(rng, DRIFTED_CHANNELS if drifted else CHANNELS),
        "category": category,
        "language": _pick(rng, DRIFTED_LANGUAGES if drifted else LANGUAGES),
        "features": {
            "order_value_usd": round(order_value, 2),
            "account_age_days": round(rng.expovariate(1 / 400.0), 1),
        },
        "attributes": {"tier": _pick(rng, TIERS), "region": _pick(rng, REGIONS)},
        "text": _text(rng, category),
        "embedding": [round(c + rng.gauss(0.0, 0.15), 4) for c in _centroid(category)],
        "tokens": tokens,
    }


def eval_set(
    seed: int, ts: datetime, per_loop: int = 1000, loops: tuple[LoopProfile, ...] = LOOPS
) -> Iterator[dict[str, Any]]:
    """EvalCase records drawn from the traffic's own (undrifted) input distribution: the eval
    set a team would have curated from past cases, the baseline that drift is measured from."""
    rng = random.Random(f"eval-set:{seed}")
    ts_ms = int(ts.timestamp() * MS)
    for loop in loops:
        for i in range(per_loop):
            yield {
                "eval_case_id": f"{loop.name}-{i:05d}",
                "loop": loop.name,
                "ts": ts_ms,
                "suite": "CURRENT",
                "origin": "IMPORTED",
                "case_id": None,
                "expected": "RESOLVED",
                "notes": None,
                **input_fields(rng, loop, drifted=False),
            }


class TrafficGenerator:
    """Iterate over ``(topic, record)`` pairs in event-time order, forever."""

    def __init__(
        self,
        seed: int,
        start: datetime,
        cases_per_second: float = 20.0,
        scenario: Scenario | None = None,
        loops: tuple[LoopProfile, ...] = LOOPS,
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be a timezone-aware datetime")
        if cases_per_second <= 0:
            raise ValueError("cases_per_second must be positive")
        self._rng = random.Random(seed)
        self._start_ms = int(start.timestamp() * MS)
        self._rate = cases_per_second
        self._scenario = scenario or Scenario()
        self._loops = loops
        self._heap: list[_Pending] = []
        self._seq = 0
        self._clock_ms = float(self._start_ms)

    def _id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _after(self, onset: float | None, ts_ms: int) -> bool:
        return onset is not None and ts_ms >= self._start_ms + onset * MS

    def _push(self, ts_ms: int, topic: str, record: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Pending(ts_ms, self._seq, topic, record))

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            self._clock_ms += self._rng.expovariate(self._rate) * MS
            now = int(self._clock_ms)
            while self._heap and self._heap[0].ts_ms <= now:
                item = heapq.heappop(self._heap)
                yield item.topic, item.record
            self._new_case(now)

    def _new_case(self, ts_ms: int) -> None:
        rng, sc = self._rng, self._scenario
        loop = self._loops[
            rng.choices(range(len(self._loops)), weights=[p.share for p in self._loops])[0]
        ]
        case_id = self._id()
        event_id = self._id()
        drifted = self._after(sc.drift_at, ts_ms) and not self._after(sc.drift_end_at, ts_ms)
        fields = input_fields(rng, loop, drifted)
        self._push(
            ts_ms,
            "inputs",
            {
                "event_id": event_id,
                "case_id": case_id,
                "loop": loop.name,
                "ts": ts_ms,
                "source": f"{loop.name}-api",
                **fields,
            },
        )
        self._resolve(loop, case_id, ts_ms, fields["tokens"])

    def _resolve(self, loop: LoopProfile, case_id: str, input_ms: int, tokens: int) -> None:
        rng, sc = self._rng, self._scenario
        resolver = _pick(rng, loop.resolvers)
        median = LATENCY_MEDIAN_S[resolver]
        if resolver == "SYSTEM" and self._after(sc.latency_regression_at, input_ms):
            median *= 4
        ts_ms = input_ms + max(1, int(_lognormal(rng, median, 0.5) * MS))
        release = (
            sc.quality_drop_release if self._after(sc.quality_drop_at, ts_ms) else loop.base_release
        )
        pass_rate = DROPPED_PASS_RATE if release == sc.quality_drop_release else BASE_PASS_RATE
        uses_model = resolver != "HUMAN"
        cost_factor = 5.0 if self._after(sc.cost_spike_at, ts_ms) else 1.0
        output_tokens = int(tokens * rng.uniform(0.2, 0.6)) if uses_model else None
        model_cost = (tokens + (output_tokens or 0)) * USD_PER_TOKEN * cost_factor
        eval_passed = rng.random() < pass_rate if uses_model and rng.random() < 0.3 else None
        outcome = _pick(rng, OUTCOMES[resolver])
        human = HUMAN_MINUTES_MEDIAN[resolver]
        self._push(
            ts_ms,
            "resolutions",
            {
                "event_id": self._id(),
                "case_id": case_id,
                "loop": loop.name,
                "ts": ts_ms,
                "resolver": resolver,
                "outcome": outcome,
                "release": release,
                "model": "model-a" if uses_model else None,
                "model_cost_usd": round(model_cost, 6) if uses_model else 0.0,
                "other_cost_usd": 0.001,
                "input_tokens": tokens if uses_model else None,
                "output_tokens": output_tokens,
                "human_minutes": round(_lognormal(rng, human, 0.5), 2) if human else 0.0,
                "confidence": round(rng.betavariate(8, 2), 4) if uses_model else None,
                "eval_passed": eval_passed,
                "failure_reason": "model_error" if outcome == "FAILED" else None,
                "output": f"resolved {case_id[:8]}" if outcome == "RESOLVED" else None,
            },
        )
        if uses_model and rng.random() < ONLINE_EVAL_SHARE:
            eval_ms = ts_ms + int(rng.uniform(1, 60) * MS)
            self._push(
                eval_ms,
                "eval-results",
                {
                    "event_id": self._id(),
                    "eval_case_id": f"ec-{case_id}",
                    "case_id": case_id,
                    "loop": loop.name,
                    "ts": eval_ms,
                    "release": release,
                    "suite": "CURRENT",
                    "passed": rng.random() < pass_rate,
                    "score": round(rng.random(), 4),
                    "evaluator": "llm-judge",
                },
            )
        if rng.random() < HISTORICAL_EVAL_SHARE:
            self._push(
                ts_ms,
                "eval-results",
                {
                    "event_id": self._id(),
                    "eval_case_id": f"hist-{loop.name}-{rng.randrange(500)}",
                    "case_id": None,
                    "loop": loop.name,
                    "ts": ts_ms,
                    "release": release,
                    "suite": "HISTORICAL",
                    "passed": rng.random() < pass_rate + 0.04,
                    "score": None,
                    "evaluator": "regression-suite",
                },
            )
