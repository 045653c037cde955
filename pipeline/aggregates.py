"""Mergeable per-bucket aggregates of one loop, and the five numbers computed from them.

An Aggregate holds only sums, counts and a sketch, so merging the aggregates of any set of
buckets (or of the same bucket seen by many partitions) gives exactly the aggregate of all their
events: windows are merges of buckets, global numbers are merges of partials.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any

from pipeline.features import CATEGORY_CHARS, FeatureStats, stable_digest
from pipeline.sketch import LatencySketch, add_counts

SUITES = ("CURRENT", "HISTORICAL")
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
#: Distinct input categories an aggregate counts apart, for uncovered_ratio. A producer that
#: puts an id in ``category`` would otherwise grow every bucket, partial message and checkpoint
#: record (past Kafka's message limit: a worker stopped at every restart) and every window
#: without bound. Past it, the categories first in a fixed order (a hash of the category)
#: keep their counts and the others' inputs count under FOLDED_CATEGORIES.
INPUT_CATEGORIES = 1000
#: Where the folded categories' inputs are counted: longer than any category
#: (CATEGORY_CHARS), so no input's or eval case's category is this key and its inputs count as
#: categorised and uncovered, by workers of older versions too.
FOLDED_CATEGORIES = "(categories past the cap)" + "." * CATEGORY_CHARS
# An aggregate may hold up to twice as many before it folds, so that folding is rare; what it
# writes and computes is folded to INPUT_CATEGORIES.
_SPARE_CATEGORIES = 2 * INPUT_CATEGORIES


@dataclass
class Aggregate:
    resolutions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (resolver, outcome)
    verdicts: Counter[tuple[str, bool]] = field(default_factory=Counter)  # (suite, passed)
    # Money and human time are summed as integers (nano-USD, micro-minutes): integer sums do
    # not depend on the order of merging, so partials from any number of partitions and
    # workers, merged in any order, give exactly the same numbers as one pass over the events.
    cost_nano_usd: int = 0  # model + other cost of the resolutions
    human_micro_minutes: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)
    inputs: Counter[str] = field(default_factory=Counter)  # by category; "" = no category
    # Cases whose first input lies in this bucket and that have no resolution yet: kept per
    # bucket so that "unresolved past SLA" is a merge over buckets like everything else.
    unresolved: int = 0
    # Input features for drift; kept only in the fine buckets (pipeline.windows drops them
    # when rolling up), since drift windows are at most two hours long.
    features: FeatureStats = field(default_factory=FeatureStats)
    events: int = 0  # source records counted (not duplicates), for the dead-letter rate
    dead_letters: int = 0
    # Cases first resolved in this bucket whose input lies in an earlier bucket (its index ->
    # how many): they no longer count as unresolved there. Recorded here rather than taken off
    # the earlier bucket, so that a resolution changes only the bucket of its own time; an old
    # bucket changed for one count was re-sent to stage 2 and re-stored whole (most partials
    # were that). Only stage 2's open buckets need it (LoopState.unresolved): merges into
    # windows and roll-ups leave it out.
    settled: Counter[int] = field(default_factory=Counter)

    def merge(self, other: Aggregate, features: bool = True) -> None:
        add_counts(self.resolutions, other.resolutions)
        add_counts(self.verdicts, other.verdicts)
        self.cost_nano_usd += other.cost_nano_usd
        self.human_micro_minutes += other.human_micro_minutes
        self.latency.merge(other.latency)
        add_counts(self.inputs, other.inputs)
        if len(self.inputs) > _SPARE_CATEGORIES:
            fold_categories(self.inputs)
        self.unresolved += other.unresolved
        self.events += other.events
        self.dead_letters += other.dead_letters
        if features and other.features:
            self.features.merge(other.features)

    def add_input(self, category: str) -> None:
        """Count an input of ``category`` ("" for none, cut as category_text cuts it)."""
        inputs = self.inputs
        inputs[category] += 1
        if len(inputs) > _SPARE_CATEGORIES:
            fold_categories(inputs)

    @classmethod
    def merged(cls, parts: Iterable[Aggregate], features: bool = True) -> Aggregate:
        total = cls()
        for part in parts:
            total.merge(part, features)
        return total

    def to_json(self) -> dict[str, Any]:
        return self.counts_json() | {"f": self.features_json()}

    def counts_json(self) -> dict[str, Any]:
        """Everything but the input features: what a late resolution changes in an old bucket
        (pipeline.partition sends and stores the two apart)."""
        fold_categories(self.inputs)
        return {
            "resolutions": [[r, o, n] for (r, o), n in self.resolutions.items()],
            "verdicts": [[s, p, n] for (s, p), n in self.verdicts.items()],
            "cost_nano_usd": self.cost_nano_usd,
            "human_micro_minutes": self.human_micro_minutes,
            "latency": self.latency.to_json(),
            "inputs": dict(self.inputs),
            "unresolved": self.unresolved,
            "st": [[index, n] for index, n in self.settled.items()],
            "ev": self.events,
            "dl": self.dead_letters,
        }

    def features_json(self) -> dict[str, Any] | None:
        return self.features.to_json() if self.features else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Aggregate:
        return cls(
            Counter({(r, o): n for r, o, n in data["resolutions"]}),
            Counter({(s, bool(p)): n for s, p, n in data["verdicts"]}),
            int(data["cost_nano_usd"]),
            int(data["human_micro_minutes"]),
            LatencySketch.from_json(data["latency"]),
            Counter(data["inputs"]),
            int(data.get("unresolved", 0)),
            FeatureStats.from_json(data.get("f")),
            int(data.get("ev", 0)),
            int(data.get("dl", 0)),
            Counter({int(index): int(n) for index, n in data.get("st", ())}),
        )

    @property
    def cost_usd(self) -> float:
        return self.cost_nano_usd / 1e9

    @property
    def human_minutes(self) -> float:
        return self.human_micro_minutes / 1e6

    # -- the five numbers -------------------------------------------------------------------

    @property
    def resolved(self) -> int:
        return sum(self.resolutions.values())

    def _by_resolver(self, resolver: str) -> int:
        return sum(n for (r, _), n in self.resolutions.items() if r == resolver)

    def numbers(self, hourly_rate: float, covered: Set[str]) -> dict[str, Any]:
        """The window numbers of DESIGN.md's snapshot; a ratio with no denominator is None."""
        resolved = self.resolved
        fold_categories(self.inputs)
        categorised = sum(n for c, n in self.inputs.items() if c)
        uncovered = sum(n for c, n in self.inputs.items() if c and c not in covered)
        return {
            "resolved": resolved,
            "coverage": self.coverage(),
            "assisted": _ratio(self._by_resolver("HYBRID"), resolved),
            "quality": {
                "current": self.pass_rate(("CURRENT",)),
                "historical": self.pass_rate(("HISTORICAL",)),
                "all": self.pass_rate(SUITES),
            },
            "latency_seconds": {k: self.latency.quantile(q) for k, q in QUANTILES.items()},
            "cost_per_resolution_usd": _ratio(
                self.cost_usd + self.human_minutes / 60.0 * hourly_rate, resolved
            ),
            "toil_hours": self.human_minutes / 60.0,
            "uncovered_ratio": _ratio(uncovered, categorised),
        }

    def coverage(self) -> float | None:
        return _ratio(self._by_resolver("SYSTEM"), self.resolved)

    def verdict_count(self, suites: tuple[str, ...]) -> int:
        return sum(n for (s, _), n in self.verdicts.items() if s in suites)

    def pass_rate(self, suites: tuple[str, ...]) -> float | None:
        passed = sum(n for (s, p), n in self.verdicts.items() if s in suites and p)
        return _ratio(passed, self.verdict_count(suites))


def fold_categories(inputs: Counter[str]) -> None:
    """Keep the counts of the INPUT_CATEGORIES categories first in a fixed order and count the
    others' inputs under FOLDED_CATEGORIES. A category first among the union of some inputs'
    categories is first among any part of them that has it, so which are kept depends only on
    that union: partitions, buckets and workers, folded and merged in any order, give exactly
    the counts of one pass folded once."""
    if len(inputs) <= INPUT_CATEGORIES:
        return
    names = [c for c in inputs if c and c != FOLDED_CATEGORIES]
    if len(names) <= INPUT_CATEGORIES:
        return
    names.sort(key=category_order)
    inputs[FOLDED_CATEGORIES] += sum(inputs.pop(c) for c in names[INPUT_CATEGORIES:])


def category_order(category: str) -> tuple[bytes, str]:
    """The fixed order of fold_categories: by a hash, so that no kind of name is favoured
    (the kept ones are a sample of the categories), the same in every process."""
    return stable_digest(category, 8), category


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def delta(now: Any, before: Any) -> Any:
    """Week-over-week change of a numbers dict: now - before, None where either is None."""
    if isinstance(now, dict):
        return {
            k: delta(v, before.get(k) if isinstance(before, dict) else None) for k, v in now.items()
        }
    if now is None or before is None:
        return None
    return now - before
