"""Which resolved cases become eval candidates: reasons, deterministic sampling, budgets.

A resolved case is a candidate for one or more reasons: a failed eval verdict, an escalation or
failure after a system attempt, confidence under the loop's floor (intrinsic: stage 1 sees them
on the case), an input in a category no eval case covers or on a drifted feature, a cost or
latency outlier for its loop (extrinsic: they need the loop's eval set, drift and windows, so
stage 2 decides them). Sampling is deterministic: a case is considered when the hash of its
case_id and a salt falls under its reasons' sample rate, so a restart or a replay picks the same
cases; then daily budgets apply per loop and per stratum (reason, category), near-duplicates
(same normalised text) are suppressed, and a case is never queued twice. No Kafka here.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.codec import Codec
from pipeline.features import CATEGORY_CHARS, category_text, finite
from pipeline.redact import Redactor
from pipeline.windows import DAY

INTRINSIC = ("failed_eval", "failed", "escalated", "low_confidence")
EXTRINSIC = ("novel_category", "drifted_feature", "cost_outlier", "latency_outlier")
REASONS = INTRINSIC + EXTRINSIC
#: How bad a reason is, for the priority (severity x novelty).
SEVERITY: Mapping[str, float] = {
    "failed_eval": 1.0,
    "failed": 1.0,
    "escalated": 0.8,
    "novel_category": 0.7,
    "low_confidence": 0.6,
    "drifted_feature": 0.5,
    "cost_outlier": 0.5,
    "latency_outlier": 0.5,
}
#: Share of the cases with a reason that are considered (by hash): every likely failure, a
#: quarter of the cases that are only unusual.
DEFAULT_SAMPLE_RATES: Mapping[str, float] = {
    **dict.fromkeys(INTRINSIC, 1.0),
    **dict.fromkeys(EXTRINSIC, 0.25),
}
#: How long picked case ids and text fingerprints are remembered (never queued twice).
MEMORY_DAYS = 8
#: The input fields an eval candidate (and the eval case it may become) keeps.
INPUT_FIELDS = (
    "channel",
    "category",
    "language",
    "text",
    "tokens",
    "features",
    "attributes",
    "embedding",
)
TEXT_LIMIT = 2000  # characters of input text and output kept per case


def shown_input(record: Mapping[str, Any]) -> dict[str, Any]:
    """The input fields a candidate shows. Non-finite numbers are left out, as from the
    features (pipeline.features): JSON has no notation for them and no distance is defined."""
    fields = {k: record.get(k) for k in INPUT_FIELDS}
    if fields["text"]:
        fields["text"] = str(fields["text"])[:TEXT_LIMIT]
    if fields["features"]:
        fields["features"] = {k: v for k, v in fields["features"].items() if finite(v)}
    if fields["embedding"] and not all(map(finite, fields["embedding"])):
        fields["embedding"] = None
    return fields


@functools.cache
def _input_codec() -> Codec:
    """The schemas an input message is read with when stage 2 may pick its case: the
    package's, as the worker reads its sources with (pipeline.worker)."""
    return Codec.load()


@dataclass(frozen=True)
class CandidateConfig:
    salt: str = "loopline"
    daily_budget: int = 200  # candidates per loop and day
    stratum_daily_cap: int = 25  # per (reason, category) and day
    confidence_floor: float = 0.6
    cost_outlier_factor: float = 5.0  # x the loop's mean cost per resolution (1h window)
    sample_rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SAMPLE_RATES))
    redact_patterns: tuple[str, ...] = ()

    def redactor(self) -> Redactor:
        return Redactor(self.redact_patterns)


def unit_hash(case_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the case and the salt: the sampling coin, deterministic.
    The BLAKE2b of "salt:case_id", from a copy of the salt's state (drawn for every resolved
    case, in both stages)."""
    hashed = _salted(salt).copy()
    hashed.update(case_id.encode())
    return int.from_bytes(hashed.digest(), "big") / 2**64


@functools.lru_cache(maxsize=8)
def _salted(salt: str) -> hashlib.blake2b:
    return hashlib.blake2b(f"{salt}:".encode(), digest_size=8)


_NOT_WORDS = re.compile(r"[^a-z]+")


def text_fingerprint(text: str | None) -> str | None:
    """Lower case, digits and punctuation dropped, words in order: near-duplicates (the same
    text with other numbers, ids or spacing) share it."""
    if not text:
        return None
    words = _NOT_WORDS.sub(" ", text.lower()).split()
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).hexdigest() if words else None


@dataclass(frozen=True)
class CaseProposal:
    """A resolved case as stage 1 saw it: its input, its resolution and its verdicts.

    The input comes as the fields a candidate shows (``shown_input``), or, from a worker, as
    the input's own message (Avro single-object bytes, ``input_avro``, with ``input`` empty):
    stage 2 reads it only when its budget may still pick the case (``with_input``), so stage 1
    need not build and encode the shown fields of every input it holds."""

    case_id: str
    loop: str
    ts_ms: int  # the resolution's event time
    input: Mapping[str, Any]  # InputEvent's input-side fields
    resolution: Mapping[str, Any]  # resolver, outcome, release, confidence, cost_usd, output
    latency_seconds: float | None
    verdicts: Mapping[str, bool]  # suite or evaluator -> passed
    input_avro: bytes | None = None

    def with_input(self) -> CaseProposal:
        """This proposal with its input read (from ``input_avro``, if it came so)."""
        if self.input_avro is None:
            return self
        record = _input_codec().decode(self.input_avro, expected="InputEvent").record
        return dataclasses.replace(self, input=shown_input(record), input_avro=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "case",
            "case_id": self.case_id,
            "loop": self.loop,
            "ts": self.ts_ms,
            "input": dict(self.input),
            "resolution": dict(self.resolution),
            "latency": self.latency_seconds,
            "verdicts": dict(self.verdicts),
            "input_avro": self.input_avro,  # base64 in JSON
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseProposal:
        avro = data.get("input_avro")  # none before 2026-11-28
        return cls(
            str(data["case_id"]),
            str(data["loop"]),
            int(data["ts"]),
            data["input"],
            data["resolution"],
            data["latency"],
            data["verdicts"],
            None if avro is None else base64.b64decode(avro),
        )


def intrinsic_reasons(
    verdicts: Mapping[str, bool], res: Mapping[str, Any], confidence_floor: float
) -> list[str]:
    """The reasons a case's own verdicts and resolution give (no context needed)."""
    found = []
    if any(passed is False for passed in verdicts.values()):
        found.append("failed_eval")
    system_attempt = res.get("resolver") in ("SYSTEM", "HYBRID")
    if system_attempt and res.get("outcome") == "FAILED":
        found.append("failed")
    if system_attempt and res.get("outcome") == "ESCALATED":
        found.append("escalated")
    confidence = res.get("confidence")
    if confidence is not None and confidence < confidence_floor:
        found.append("low_confidence")
    return found


def considered(case_id: str, reasons: list[str], config: CandidateConfig) -> bool:
    """The deterministic coin: under the highest sample rate of the case's reasons."""
    if not reasons:
        return False
    rate = max(config.sample_rates.get(r, 0.0) for r in reasons)
    # The coin is in [0, 1): at a rate of 1 (a failed eval, by default) it need not be drawn.
    return rate >= 1.0 or (rate > 0.0 and unit_hash(case_id, config.salt) < rate)


@dataclass(frozen=True)
class LoopContext:
    """What stage 2 knows of a loop when it judges a case's extrinsic reasons."""

    covered: frozenset[str]  # categories the eval set has
    # Per drifted feature, its usual values in the baseline: the categories with at least 5 %
    # of the eval set, or the 5th-95th percentile range; a case outside them is on the drift.
    usual_values: Mapping[str, frozenset[str] | tuple[float, float]]
    cost_threshold_usd: float | None
    latency_threshold_seconds: float | None


def context_to_json(context: LoopContext) -> dict[str, Any]:
    return {
        "rare": {
            k: {"n": list(v)} if isinstance(v, tuple) else {"c": sorted(v)}
            for k, v in context.usual_values.items()
        },
        "cost": context.cost_threshold_usd,
        "latency": context.latency_threshold_seconds,
    }


def context_from_json(data: Mapping[str, Any], covered: frozenset[str]) -> LoopContext:
    rare: dict[str, frozenset[str] | tuple[float, float]] = {
        k: (float(v["n"][0]), float(v["n"][1])) if "n" in v else frozenset(v["c"])
        for k, v in data["rare"].items()
    }
    return LoopContext(covered, rare, data["cost"], data["latency"])


def extrinsic_reasons(proposal: CaseProposal, context: LoopContext) -> tuple[list[str], list[str]]:
    """(reasons, drifted features the case is on)."""
    found = []
    category = proposal.input.get("category")
    if category and category_text(category) not in context.covered:
        found.append("novel_category")
    on_drifted = []
    for feature, rare in sorted(context.usual_values.items()):
        value = _feature_value(proposal.input, feature)
        if value is None:
            continue
        if isinstance(rare, tuple):
            low, high = rare
            if isinstance(value, float) and not low <= value <= high:
                on_drifted.append(feature)
        elif category_text(value) not in rare:
            on_drifted.append(feature)
    if on_drifted:
        found.append("drifted_feature")
    if _above(proposal.resolution.get("cost_usd"), context.cost_threshold_usd):
        found.append("cost_outlier")
    if _above(proposal.latency_seconds, context.latency_threshold_seconds):
        found.append("latency_outlier")
    return found, on_drifted


def _above(value: float | None, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value > threshold


def _feature_value(fields: Mapping[str, Any], feature: str) -> Any:
    """The input's value of a feature as the summaries name it (keys cut: category_text)."""
    if feature.startswith("attributes."):
        return _by_cut_key(fields.get("attributes"), feature[len("attributes.") :])
    if feature.startswith("features."):
        found = _by_cut_key(fields.get("features"), feature[len("features.") :])
        return None if found is None else float(found)
    if feature == "tokens":
        return None if fields.get("tokens") is None else float(fields["tokens"])
    return fields.get(feature)


def _by_cut_key(values: Mapping[str, Any] | None, key: str) -> Any:
    found = (values or {}).get(key)
    if found is None and len(key) == CATEGORY_CHARS:  # the key may have been longer
        found = next((v for k, v in (values or {}).items() if category_text(k) == key), None)
    return found


class CandidateSampler:
    """One loop's picks: daily counts per stratum, picked cases and text fingerprints."""

    def __init__(self, loop: str, config: CandidateConfig) -> None:
        self.loop = loop
        self.config = config
        self.redact = config.redactor()
        self.counts: dict[int, Counter[str]] = {}  # day -> stratum ("reason/category") -> n
        self.picked: dict[str, int] = {}  # case_id -> day
        self.fingerprints: dict[str, int] = {}  # text fingerprint -> day
        self.changed = False

    def offer(self, proposal: CaseProposal, context: LoopContext) -> dict[str, Any] | None:
        """The EvalCandidate record when the case is picked, else None."""
        if proposal.case_id in self.picked:
            return None
        day = proposal.ts_ms // DAY
        if sum(self.counts.get(day, {}).values()) >= self.config.daily_budget:
            return None  # whatever its reasons: so its input need not be read
        proposal = proposal.with_input()
        reasons = intrinsic_reasons(
            proposal.verdicts, proposal.resolution, self.config.confidence_floor
        )
        extrinsic, on_drifted = extrinsic_reasons(proposal, context)
        reasons += extrinsic
        if not considered(proposal.case_id, reasons, self.config):
            return None
        counts = self.counts.setdefault(day, Counter())
        primary = max(reasons, key=lambda r: (SEVERITY[r], r))
        stratum = f"{primary}/{proposal.input.get('category') or ''}"
        if counts[stratum] >= self.config.stratum_daily_cap:
            return None
        # On the redacted text: texts that differ only in personal data are near-duplicates.
        fingerprint = text_fingerprint(self.redact(proposal.input.get("text")))
        if fingerprint is not None and fingerprint in self.fingerprints:
            return None
        counts[stratum] += 1
        self.picked[proposal.case_id] = day
        if fingerprint is not None:
            self.fingerprints[fingerprint] = day
        self._forget_before(day - MEMORY_DAYS)
        self.changed = True
        return self._record(proposal, reasons, on_drifted)

    def _forget_before(self, day: int) -> None:
        for old in [d for d in self.counts if d < day]:
            del self.counts[old]
        self.picked = {k: d for k, d in self.picked.items() if d >= day}
        self.fingerprints = {k: d for k, d in self.fingerprints.items() if d >= day}

    def _record(
        self, proposal: CaseProposal, reasons: list[str], on_drifted: list[str]
    ) -> dict[str, Any]:
        fields, res = proposal.input, proposal.resolution
        severity = max(SEVERITY[r] for r in reasons)
        novelty = 1.0 + 0.5 * ("novel_category" in reasons) + 0.25 * len(on_drifted)
        return {
            "candidate_id": f"cand-{proposal.case_id}",
            "case_id": proposal.case_id,
            "loop": self.loop,
            "ts": proposal.ts_ms,
            "reasons": reasons,
            "priority": round(severity * novelty, 6),
            "channel": fields.get("channel"),
            "category": fields.get("category"),
            "language": fields.get("language"),
            "input_text": self.redact(fields.get("text")),
            "output": self.redact(res.get("output")),
            "resolver": res.get("resolver"),
            "outcome": res.get("outcome"),
            "release": res.get("release"),
            "confidence": res.get("confidence"),
            "cost_usd": res.get("cost_usd"),
            "latency_seconds": proposal.latency_seconds,
            "verdicts": dict(proposal.verdicts),
            "drifted_features": on_drifted,
            "features": dict(fields.get("features") or {}),
            "attributes": dict(fields.get("attributes") or {}),
            "tokens": fields.get("tokens"),
            "embedding": fields.get("embedding"),
        }

    # -- persistence ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {str(d): dict(c) for d, c in self.counts.items()},
            "picked": self.picked,
            "fingerprints": self.fingerprints,
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        self.counts = {int(d): Counter(c) for d, c in data["counts"].items()}
        self.picked = dict(data["picked"])
        self.fingerprints = dict(data["fingerprints"])
