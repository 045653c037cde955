"""Typed event objects for the SDK; each maps one-to-one onto its Avro record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, cast


class Resolver(StrEnum):
    SYSTEM = "SYSTEM"
    HUMAN = "HUMAN"
    HYBRID = "HYBRID"


class Outcome(StrEnum):
    RESOLVED = "RESOLVED"
    ESCALATED = "ESCALATED"
    FAILED = "FAILED"
    ABANDONED = "ABANDONED"


class Suite(StrEnum):
    CURRENT = "CURRENT"
    HISTORICAL = "HISTORICAL"


class _Event:
    topic: ClassVar[str]
    record: ClassVar[str]

    def to_record(self) -> dict[str, Any]:
        return asdict(cast(Any, self))


@dataclass(frozen=True)
class InputEvent(_Event):
    topic: ClassVar[str] = "inputs"
    record: ClassVar[str] = "InputEvent"
    event_id: str
    case_id: str
    loop: str
    ts: datetime
    source: str
    channel: str | None = None
    category: str | None = None
    language: str | None = None
    features: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    embedding: list[float] | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class ResolutionEvent(_Event):
    topic: ClassVar[str] = "resolutions"
    record: ClassVar[str] = "ResolutionEvent"
    event_id: str
    case_id: str
    loop: str
    ts: datetime
    resolver: Resolver
    outcome: Outcome
    release: str
    model: str | None = None
    model_cost_usd: float = 0.0
    other_cost_usd: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    human_minutes: float = 0.0
    confidence: float | None = None
    eval_passed: bool | None = None
    failure_reason: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class EvalResult(_Event):
    topic: ClassVar[str] = "eval-results"
    record: ClassVar[str] = "EvalResult"
    event_id: str
    eval_case_id: str
    loop: str
    ts: datetime
    release: str
    suite: Suite
    passed: bool
    evaluator: str
    case_id: str | None = None
    score: float | None = None
