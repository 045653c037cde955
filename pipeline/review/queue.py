"""The review queue, pure: candidates, claims with expiry, decisions, similar eval cases.

It is fed from three topics (eval-candidates, reviews, eval-cases) and asked by the web page.
A candidate id is derived from its case, so a case is queued once however often its candidate
is delivered; a decided candidate never comes back; a claimed one is shown to nobody else
until its claim expires. No Kafka and no web here.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DECISIONS = ("ACCEPTED", "REJECTED", "DUPLICATE")
#: Characters a reviewer's expected outcome or notes may have. A decision is one Kafka record
#: (1 MB by default): a whole document pasted in would be refused by Kafka as "not saved";
#: the queue refuses it first, saying which text is too long.
REVIEW_TEXT_CHARS = 4000
SUITES = ("CURRENT", "HISTORICAL")
_WORDS = re.compile(r"[a-z]+")


class ReviewError(ValueError):
    """A decision that cannot be taken; the message says why (shown to the reviewer)."""


@dataclass
class Claim:
    reviewer: str
    expires_ms: int


@dataclass(frozen=True)
class Filters:
    loop: str | None = None
    reason: str | None = None
    category: str | None = None

    def match(self, candidate: Mapping[str, Any]) -> bool:
        return (
            (not self.loop or candidate["loop"] == self.loop)
            and (not self.reason or self.reason in candidate["reasons"])
            and (not self.category or candidate.get("category") == self.category)
        )


def _words(text: str | None) -> set[str]:
    return set(_WORDS.findall((text or "").lower()))


@dataclass
class ReviewQueue:
    claim_ms: int = 10 * 60_000
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    decided: dict[str, str] = field(default_factory=dict)  # candidate id -> decision
    claims: dict[str, Claim] = field(default_factory=dict)
    eval_cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    # candidate id -> the decision sent for it that Kafka has not confirmed yet
    unconfirmed: dict[str, str] = field(default_factory=dict)
    # candidate id -> when it was queued (epoch ms of its first delivery to Kafka)
    queued_ms: dict[str, int] = field(default_factory=dict)
    # (loop, decision) -> candidates decided so
    decision_counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    loops: set[str] = field(default_factory=set)  # of every candidate and decision read

    # -- feeds ------------------------------------------------------------------------------

    def add_candidate(self, record: Mapping[str, Any], queued_ms: int | None = None) -> None:
        """``queued_ms``: when Kafka got the candidate (its message's time; else its ts). A
        candidate delivered again keeps its first time; one decided already (its decision
        read first, or delivered again after it) is not kept."""
        candidate_id = str(record["candidate_id"])
        self.loops.add(str(record["loop"]))
        if candidate_id in self.decided:
            return
        self.candidates[candidate_id] = dict(record)
        self.queued_ms.setdefault(
            candidate_id, int(record["ts"]) if queued_ms is None else queued_ms
        )

    def add_decision(self, record: Mapping[str, Any]) -> None:
        """A decided candidate's record goes (input, output, embedding: kilobytes each, for
        every candidate a page that runs for months has read); its id and decision stay."""
        candidate_id = str(record["candidate_id"])
        if candidate_id not in self.decided:
            self.decision_counts[(str(record["loop"]), str(record["decision"]))] += 1
            self.loops.add(str(record["loop"]))
        self.decided[candidate_id] = str(record["decision"])
        self.claims.pop(candidate_id, None)
        self.candidates.pop(candidate_id, None)
        self.queued_ms.pop(candidate_id, None)

    def add_eval_case(self, record: Mapping[str, Any]) -> None:
        self.eval_cases[str(record["eval_case_id"])] = dict(record)

    def hold_unconfirmed(self, record: Mapping[str, Any]) -> None:
        """A decision was sent and Kafka has not confirmed it yet: its candidate is open to no
        one until ``release_unconfirmed`` (then decided, by ``add_decision``, or open again)."""
        self.unconfirmed[str(record["candidate_id"])] = str(record["decision"])

    def release_unconfirmed(self, candidate_id: str) -> None:
        self.unconfirmed.pop(candidate_id, None)

    # -- asks -------------------------------------------------------------------------------

    def _settled(self, candidate_id: str) -> bool:
        """Decided, or held as decided until Kafka confirms it."""
        return candidate_id in self.decided or candidate_id in self.unconfirmed

    def _open_to(self, candidate_id: str, reviewer: str, now_ms: int) -> bool:
        if self._settled(candidate_id):
            return False
        claim = self.claims.get(candidate_id)
        return claim is None or claim.reviewer == reviewer or claim.expires_ms <= now_ms

    def backlog(self) -> dict[str, tuple[int, int | None]]:
        """Per loop with candidates, the open ones (not decided, claimed or not) and when the
        oldest of them was queued (None: none open)."""
        found: dict[str, tuple[int, int | None]] = dict.fromkeys(self.loops, (0, None))
        for candidate_id, candidate in self.candidates.items():
            if not self._settled(candidate_id):
                count, oldest = found[candidate["loop"]]
                queued = self.queued_ms[candidate_id]
                found[candidate["loop"]] = (
                    count + 1,
                    queued if oldest is None else min(oldest, queued),
                )
        return found

    def pending(self, filters: Filters, reviewer: str, now_ms: int) -> list[dict[str, Any]]:
        """Undecided candidates not claimed by someone else, highest priority first."""
        found = [
            c
            for cid, c in self.candidates.items()
            if self._open_to(cid, reviewer, now_ms) and filters.match(c)
        ]
        found.sort(key=lambda c: (-float(c["priority"]), int(c["ts"]), c["candidate_id"]))
        return found

    def facets(self) -> dict[str, list[str]]:
        """The filter values of the candidates still to decide: loops, reasons, categories
        (not of those decided, or held as decided until Kafka confirms it)."""
        undecided = [c for cid, c in self.candidates.items() if not self._settled(cid)]
        return {
            "loop": sorted({c["loop"] for c in undecided}),
            "reason": sorted({r for c in undecided for r in c["reasons"]}),
            "category": sorted({c["category"] for c in undecided if c.get("category")}),
        }

    def claim(self, candidate_id: str, reviewer: str, now_ms: int) -> Claim:
        """Claim a candidate for ``claim_ms``; raises ReviewError when it is not open to you."""
        if candidate_id in self.decided:
            raise ReviewError(f"{candidate_id} was already decided ({self.decided[candidate_id]})")
        if candidate_id not in self.candidates:
            raise ReviewError(f"no candidate {candidate_id}")
        if candidate_id in self.unconfirmed:
            raise ReviewError(
                f"{candidate_id} was decided ({self.unconfirmed[candidate_id]}), and Kafka has "
                "not confirmed it yet: it is written once Kafka is back"
            )
        claim = self.claims.get(candidate_id)
        if claim is not None and claim.reviewer != reviewer and claim.expires_ms > now_ms:
            raise ReviewError(f"{candidate_id} is being reviewed by {claim.reviewer}")
        claim = self.claims[candidate_id] = Claim(reviewer, now_ms + self.claim_ms)
        return claim

    def similar(self, candidate: Mapping[str, Any], limit: int = 5) -> list[dict[str, Any]]:
        """Accepted eval cases of the loop most like the candidate (word overlap; the same
        category first)."""
        words = _words(candidate.get("input_text"))
        scored = []
        for case in self.eval_cases.values():
            if case["loop"] != candidate["loop"]:
                continue
            other = _words(case.get("text"))
            overlap = len(words & other) / len(words | other) if words | other else 0.0
            same = case.get("category") == candidate.get("category")
            scored.append((same, overlap, case["eval_case_id"], case))
        scored.sort(key=lambda s: (not s[0], -s[1], s[2]))
        return [case for *_, case in scored[:limit]]

    def decide(
        self,
        candidate_id: str,
        reviewer: str,
        decision: str,
        now_ms: int,
        expected: str | None = None,
        suite: str | None = None,
        duplicate_of: str | None = None,
        notes: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The ReviewDecision and, for an acceptance, the new EvalCase (origin REVIEWED). The
        queue changes only when the caller has published them (add_decision, add_eval_case)."""
        if decision not in DECISIONS:
            raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}")
        for name, text in (("expected outcome", expected), ("notes", notes)):
            if text is not None and len(text) > REVIEW_TEXT_CHARS:
                raise ReviewError(
                    f"{name} too long: {len(text):,} characters, at most {REVIEW_TEXT_CHARS:,}"
                )
        self.claim(candidate_id, reviewer, now_ms)
        candidate = self.candidates[candidate_id]
        eval_case: dict[str, Any] | None = None
        eval_case_id: str | None = None
        if decision == "ACCEPTED":
            if not expected or not expected.strip():
                raise ReviewError("an accepted case needs its expected outcome")
            suite = suite or "CURRENT"
            if suite not in SUITES:
                raise ReviewError(f"suite must be one of {', '.join(SUITES)}")
            eval_case_id = f"reviewed-{candidate['case_id']}"
            eval_case = {
                "eval_case_id": eval_case_id,
                "loop": candidate["loop"],
                "ts": now_ms,
                "suite": suite,
                "origin": "REVIEWED",
                "case_id": candidate["case_id"],
                "channel": candidate.get("channel"),
                "category": candidate.get("category"),
                "language": candidate.get("language"),
                "features": dict(candidate.get("features") or {}),
                "attributes": dict(candidate.get("attributes") or {}),
                "text": candidate.get("input_text"),
                "embedding": candidate.get("embedding"),
                "tokens": candidate.get("tokens"),
                "expected": expected.strip(),
                "notes": notes or None,
            }
        elif decision == "DUPLICATE":
            if not duplicate_of or duplicate_of not in self.eval_cases:
                raise ReviewError("a duplicate names the eval case it repeats")
            eval_case_id, suite = duplicate_of, None
        else:
            suite = None
        record = {
            "event_id": str(uuid.uuid4()),
            "candidate_id": candidate_id,
            "loop": candidate["loop"],
            "reviewer": reviewer,
            "decision": decision,
            "expected": expected.strip() if decision == "ACCEPTED" and expected else None,
            "suite": suite,
            "eval_case_id": eval_case_id,
            "notes": notes or None,
            "ts": now_ms,
        }
        return record, eval_case  # recorded by the caller once they are published
