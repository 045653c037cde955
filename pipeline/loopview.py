"""Stage 2 of the five numbers: the global view of a loop, merged from every partition's partials.

Stage 1 (pipeline.partition) sends, per partition and loop, the latest cumulative aggregate of
each bucket it changed, and its watermark. Here the latest partial of each (partition, bucket)
replaces the one before (so a partial seen twice counts once), windows merge the open partials
of all partitions with the closed buckets, and a bucket is closed (folded into the tiered
BucketSeries) once its partition's watermark is past the horizon after which stage 1 never
changes it again. Every loop lives in exactly one LoopView, so the numbers it exports are global.
No Kafka here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pipeline.aggregates import Aggregate, delta
from pipeline.alerts import AlertEngine, Facts, readings
from pipeline.candidates import (
    CandidateSampler,
    CaseProposal,
    LoopContext,
    context_from_json,
    context_to_json,
)
from pipeline.core import CoreConfig, iso
from pipeline.drift import Baseline, evaluate, no_drift
from pipeline.features import (
    FeatureStats,
    FeatureValues,
    category_text,
    values_from_json,
    values_to_json,
)
from pipeline.featurewindow import FeatureWindow
from pipeline.formats import check_format
from pipeline.openbuckets import OpenBuckets
from pipeline.partials import EvalCaseChange, Partial
from pipeline.windows import WEEK, WINDOWS, BucketSeries, align_up, default_tiers

#: The most evaluation boundaries one call catches up on (after a gap, the latest ones).
CATCH_UP = 60


class LoopState:
    """One loop's partials, closed buckets, eval cases (its drift baseline) and alerts."""

    def __init__(self, config: CoreConfig, loop: str) -> None:
        self.config = config
        self.loop = loop
        self.open = OpenBuckets(config.bucket_ms)  # (partition, bucket index) -> partial
        self.marks: dict[int, int] = {}  # partition -> its watermark
        self.series = BucketSeries(default_tiers(config.bucket_ms))
        self.eval_cases: dict[
            str, tuple[str | None, FeatureValues]
        ] = {}  # id -> category, features
        self._baseline: Baseline | None = None  # rebuilt when an eval case changes
        self._covered: frozenset[str] | None = None  # likewise
        self.alerts = AlertEngine(loop, config.rules)
        self.sampler = CandidateSampler(loop, config.rules.candidates)
        # The drift, outlier thresholds of the last evaluation that candidates are judged by
        # (its covered categories are filled in live, from the eval cases).
        self.candidate_context = LoopContext(frozenset(), {}, None, None)
        self.features = FeatureWindow(config.bucket_ms)
        self.evaluated_ms = 0  # event time of the last alert evaluation
        self.changed: set[tuple[Any, ...]] = set()

    @property
    def watermark_ms(self) -> int:
        return max(self.marks.values(), default=0)

    @property
    def complete_ms(self) -> int:
        """Event time that every active partition of the loop has passed: the lowest mark
        among those within the allowed lateness of the highest (one further behind counts as
        idle). Alert evaluations wait for it, so a partition racing ahead (a backlog read one
        partition at a time) cannot evaluate a window that the others have not filled yet."""
        top = self.watermark_ms
        floor = top - self.config.allowed_lateness_ms
        return min((m for m in self.marks.values() if m >= floor), default=top)

    def apply(self, partial: Partial) -> None:
        closed = self._closed_below(partial.partition)
        for index, aggregate in partial.buckets.items():
            if index < closed:
                continue  # already folded: a partition replaying after a crash resends it
            key = (partial.partition, index)
            if partial.with_features:
                self.changed.add(("of", *key))
                self.features.touch(index)
            else:  # unchanged since the bucket's last partial: keep the features we have
                kept = self.open.get(key)
                features = kept.features if kept is not None else FeatureStats()
                aggregate = dataclasses.replace(aggregate, features=features)
            self.open.put(key, aggregate)
            self.changed.add(("o", *key))
        if partial.watermark_ms > self.marks.get(partial.partition, 0):
            self.marks[partial.partition] = partial.watermark_ms
            self.changed.add(("m", partial.partition))
            self._close(partial.partition)

    def _closed_below(self, partition: int) -> int:
        """Buckets of the partition with a smaller index never change again (stage 1 drops
        them at the same watermark)."""
        mark = self.marks.get(partition)
        if mark is None:
            return -(2**62)
        return (mark - self.config.case_horizon_ms) // self.config.bucket_ms

    def _close(self, partition: int) -> None:
        size = self.config.bucket_ms
        last = self._closed_below(partition)
        for key in self.open.below(partition, last):
            aggregate = self.open.pop(key)
            self.changed.add(("o", *key))
            self.changed.add(("of", *key))
            target = self.series.bucket((key[1] + 1) * size)
            if target is not None:  # None: older than every tier keeps
                target.merge(aggregate)
        self.series.advance(self.watermark_ms)
        self.changed.add(("f",))

    def eval_case(self, change: EvalCaseChange) -> None:
        if change.deleted:
            self.eval_cases.pop(change.eval_case_id, None)
        else:
            self.eval_cases[change.eval_case_id] = (change.category, change.features)
        self._baseline = self._covered = None
        self.changed.add(("e", change.eval_case_id))

    def covered(self) -> frozenset[str]:
        """The categories the loop's eval cases have (computed once per change of the set:
        every candidate offer asks)."""
        if self._covered is None:
            # cut as the inputs' categories are (pipeline.features.category_text)
            self._covered = frozenset(category_text(c) for c, _ in self.eval_cases.values() if c)
        return self._covered

    @property
    def baseline(self) -> Baseline:
        if self._baseline is None:
            self._baseline = Baseline(features for _, features in self.eval_cases.values())
        return self._baseline

    def window(self, as_of_ms: int, length_ms: int) -> Aggregate:
        """Every bucket, closed or open, lying wholly inside (as_of - length, as_of]
        (without input features: drift merges those, see drift())."""
        total = self.series.window(as_of_ms, length_ms)
        for aggregate in self.open.inside(as_of_ms - length_ms, as_of_ms):
            total.merge(aggregate, features=False)
        return total

    def drift(self, as_of_ms: int) -> dict[str, Any]:
        """The drift section of the snapshot: the drift window's inputs against the baseline."""
        if not self.eval_cases:
            return no_drift()
        config = self.config.rules.drift
        # Closing a bucket moves it from the open partials to the series without changing the
        # union of the two, so the feature cache stays valid across closes.
        start = as_of_ms - config.window_ms
        buckets = list(self.open.overlapping(start, as_of_ms))
        first = start // self.config.bucket_ms
        tier = self.series.buckets[0]
        buckets += [
            (i, tier[i]) for i in range(first, as_of_ms // self.config.bucket_ms) if i in tier
        ]
        stats = self.features.merged(buckets, as_of_ms, config.window_ms)
        return evaluate(stats, self.baseline, config)

    def evaluate(self, as_of_ms: int | None = None) -> list[dict[str, Any]]:
        """Evaluate the alert rules at every evaluation_interval boundary of event time passed
        since the last evaluation (the first time: since the loop's first bucket), up to
        ``as_of_ms`` (default ``complete_ms``), as replay does: a backlog read in large batches
        still gets one evaluation per interval (the last CATCH_UP of them, after a long gap),
        so a rule that needs several evaluations in a row fires however the events were
        batched. Returns the Alert records to publish."""
        interval = self.config.rules.evaluation_interval_ms
        last = (self.complete_ms if as_of_ms is None else as_of_ms) // interval * interval
        if last <= self.evaluated_ms:
            return []
        if self.evaluated_ms:
            first = self.evaluated_ms + interval
        else:  # the first evaluation: from the end of the loop's first bucket on, like any other
            earliest = min((index for (_, index), _ in self.open.items()), default=None)
            first = last
            if earliest is not None:
                first = align_up((earliest + 1) * self.config.bucket_ms, interval)
        first = max(first, last - (CATCH_UP - 1) * interval)
        records: list[dict[str, Any]] = []
        for boundary in range(first, last + 1, interval):
            records.extend(self._evaluate_at(boundary))
        self.evaluated_ms = last
        self.changed.add(("t",))
        return records

    def _evaluate_at(self, as_of: int) -> list[dict[str, Any]]:
        rules = self.config.rules.for_loop(self.loop)
        windows = {
            rule.window
            for rule in (
                rules.quality_floor,
                rules.latency_slo,
                rules.cost_budget,
                rules.coverage_drop,
                rules.toil_rise,
                rules.dead_letter_rate,
            )
        }
        week_ago = self.series.align(as_of - WEEK)
        facts = Facts(
            loop=self.loop,
            as_of_ms=as_of,
            now={w: self.window(as_of, WINDOWS[w]) for w in windows},
            week_ago={w: self.window(week_ago, WINDOWS[w]) for w in windows},
            hourly_rate=self.config.hourly_rates.get(self.loop, 0.0),
            drift=self.drift(as_of),
            drift_share=self.config.rules.drift.drift_share,
            unresolved=self.unresolved(as_of),
        )
        self._judge_candidates_by(facts)
        return self.alerts.step(as_of, readings(facts, rules))

    def _judge_candidates_by(self, facts: Facts) -> None:
        """The candidate context of this evaluation: usual values of the drifted features,
        and the cost and latency outlier thresholds of the last hour."""
        drift = facts.drift
        baseline = self.baseline
        usual: dict[str, frozenset[str] | tuple[float, float]] = {}
        for feature, scores in drift["features"].items():
            if not scores["drifted"]:
                continue
            if feature in baseline.categorical:
                counts = baseline.categorical[feature]
                total = sum(counts.values())
                usual[feature] = frozenset(v for v, n in counts.items() if n >= 0.05 * total)
            elif feature in baseline.numeric:
                low, high = np.quantile(baseline.numeric[feature], [0.05, 0.95])
                usual[feature] = (float(low), float(high))
        hour = facts.now.get("1h") or self.window(facts.as_of_ms, WINDOWS["1h"])
        factor = self.config.rules.candidates.cost_outlier_factor
        mean_cost = hour.cost_usd / hour.resolved if hour.resolved >= 100 else None
        enough = hour.latency.count >= 100
        self.candidate_context = LoopContext(
            frozenset(),
            usual,
            None if mean_cost is None else factor * mean_cost,
            hour.latency.quantile(0.99) if enough else None,
        )
        self.changed.add(("x",))

    def offer(self, proposal: CaseProposal) -> dict[str, Any] | None:
        """The EvalCandidate record if the case is picked (pipeline.candidates)."""
        context = dataclasses.replace(self.candidate_context, covered=self.covered())
        record = self.sampler.offer(proposal, context)
        if record is not None:
            self.changed.add(("k",))
        return record

    def numbers(self, as_of_ms: int) -> dict[str, Any]:
        rate = self.config.hourly_rates.get(self.loop, 0.0)
        covered = self.covered()
        week_ago = self.series.align(as_of_ms - WEEK)
        windows: dict[str, Any] = {}
        for name, length in WINDOWS.items():
            now = self.window(as_of_ms, length).numbers(rate, covered)
            before = self.window(week_ago, length).numbers(rate, covered)
            windows[name] = {**now, "wow_delta": delta(now, before)}
        return {"windows": windows, "drift": self.drift(as_of_ms)}

    def unresolved(self, as_of_ms: int) -> int:
        """Cases whose first input is at least the loop's SLA old (at bucket granularity) and
        that have no resolution, among those stage 1 still tracks (within the case horizon):
        each open bucket's unresolved count, less the resolutions that later buckets of the
        same partition recorded for it (Aggregate.settled)."""
        size = self.config.bucket_ms
        due = as_of_ms - self.config.sla(self.loop)
        oldest = as_of_ms - self.config.case_horizon_ms
        counted = {key for key, _ in self.open.items() if oldest < (key[1] + 1) * size <= due}
        total = sum(self.open[key].unresolved for key in counted)
        for (partition, _), aggregate in self.open.items():
            for index, n in aggregate.settled.items():
                if (partition, index) in counted:
                    total -= n
        return total

    # -- persistence ------------------------------------------------------------------------

    def changed_records(self) -> dict[str, Any]:
        records: dict[str, Any] = {}
        for change in self.changed:
            kind = change[0]
            value: Any
            if kind == "o":
                found = self.open.get((change[1], change[2]))
                value = None if found is None else found.counts_json()
            elif kind == "of":
                found = self.open.get((change[1], change[2]))
                value = None if found is None else found.features_json()
            elif kind == "m":
                value = self.marks[change[1]]
            elif kind == "e":
                kept = self.eval_cases.get(change[1])
                value = (
                    None if kept is None else {"category": kept[0], "f": values_to_json(kept[1])}
                )
            elif kind == "t":
                value = self.evaluated_ms
            elif kind == "x":
                value = context_to_json(self.candidate_context)
            elif kind == "k":
                value = self.sampler.to_json()
            else:
                value = [f if f != float("-inf") else None for f in self.series.floor]
            records[_key(kind, self.loop, *change[1:])] = value
        for tier, index in self.series.changed:
            found = self.series.buckets[tier].get(index)
            records[_key("s", self.loop, tier, index)] = None if found is None else found.to_json()
        for fingerprint, episode in self.alerts.changed_records().items():
            records[_key("a", self.loop, fingerprint)] = episode
        self.changed = set()
        self.series.changed = set()
        return records

    def restore(self, kind: str, parts: list[Any], value: Any) -> None:
        if kind == "o":
            restored = Aggregate.from_json(value)
            kept = self.open.get((parts[0], parts[1]))  # its "of" record came first
            if kept is not None:
                restored.features = kept.features
            elif "f" in value:  # written before 2026-11-26, features inside: move them out
                self.changed.add(("of", parts[0], parts[1]))
            self.open.put((parts[0], parts[1]), restored)
        elif kind == "of":
            features = FeatureStats.from_json(value)
            kept = self.open.get((parts[0], parts[1]))
            if kept is None:  # its "o" record comes later
                self.open.put((parts[0], parts[1]), Aggregate(features=features))
            else:
                kept.features = features
        elif kind == "m":
            self.marks[parts[0]] = int(value)
        elif kind == "e":
            self.eval_cases[parts[0]] = (value["category"], values_from_json(value.get("f")))
        elif kind == "t":
            self.evaluated_ms = int(value)
        elif kind == "x":
            self.candidate_context = context_from_json(value, frozenset())
        elif kind == "k":
            self.sampler.restore(value)
        elif kind == "a":
            self.alerts.restore(parts[0], value)
        elif kind == "s":
            self.series.buckets[parts[0]][parts[1]] = Aggregate.from_json(value)
        elif kind == "f":
            self.series.floor = [float("-inf") if f is None else f for f in value]


def _key(kind: str, loop: str, *parts: Any) -> str:
    return json.dumps([kind, loop, *parts], separators=(",", ":"))


class LoopView:
    """The loops one stage-2 partition owns (in replay: all of them)."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.loops: dict[str, LoopState] = {}
        self.candidates: list[dict[str, Any]] = []  # EvalCandidate records not yet taken

    def _loop(self, loop: str) -> LoopState:
        state = self.loops.get(loop)
        if state is None:
            state = self.loops[loop] = LoopState(self.config, loop)
        return state

    def apply(self, message: Partial | EvalCaseChange | CaseProposal) -> None:
        if isinstance(message, Partial):
            self._loop(message.loop).apply(message)
        elif isinstance(message, EvalCaseChange):
            self._loop(message.loop).eval_case(message)
        else:
            record = self._loop(message.loop).offer(message)
            if record is not None:
                self.candidates.append(record)

    @property
    def watermark_ms(self) -> int:
        return max((s.watermark_ms for s in self.loops.values()), default=0)

    def default_as_of(self) -> int:
        return self._as_of(None)

    def _as_of(self, as_of_ms: int | None) -> int:
        """The given time (default: the watermark) rounded up to the bucket grid."""
        chosen = self.watermark_ms if as_of_ms is None else as_of_ms
        return align_up(chosen, self.config.bucket_ms)

    def snapshot(self, as_of_ms: int | None = None) -> dict[str, Any]:
        """DESIGN.md's snapshot JSON (plus week-over-week deltas per window)."""
        as_of = self._as_of(as_of_ms)
        loops = {
            loop: state.numbers(as_of)
            for loop, state in sorted(self.loops.items())
            if state.marks  # a loop known only from eval cases has no numbers yet
        }
        return {"as_of": iso(as_of), "loops": loops}

    def evaluate(self, as_of_ms: int | None = None) -> list[dict[str, Any]]:
        """Alert records of every loop whose evaluation time moved on (LoopState.evaluate)."""
        records: list[dict[str, Any]] = []
        for _, state in sorted(self.loops.items()):
            if state.marks:
                records.extend(state.evaluate(as_of_ms))
        return records

    def firing(self) -> dict[tuple[str, str, str], int]:
        """Firing alert episodes by (rule, loop, severity), with a 0 for every enabled rule
        of every loop, so that a dashboard sees the rule before it first fires."""
        counts: dict[tuple[str, str, str], int] = {}
        for loop, state in sorted(self.loops.items()):
            if not state.marks:
                continue
            rules = self.config.rules.for_loop(loop)
            for name in type(rules).model_fields:
                rule = getattr(rules, name)
                if rule.enabled:
                    counts[(name, loop, rule.severity)] = 0
            for (rule_name, severity), n in state.alerts.firing().items():
                counts[(rule_name, loop, severity)] = n
        return counts

    def unresolved(self, as_of_ms: int | None = None) -> dict[str, int]:
        as_of = self._as_of(as_of_ms)
        return {loop: s.unresolved(as_of) for loop, s in sorted(self.loops.items()) if s.marks}

    def changed_records(self) -> dict[str, Any]:
        records: dict[str, Any] = {}
        for state in self.loops.values():
            records.update(state.changed_records())
        return records

    @classmethod
    def from_records(cls, config: CoreConfig, records: Iterable[tuple[str, Any]]) -> LoopView:
        view = cls(config)
        for key, value in records:
            if value is None:  # deleted
                continue
            kind, loop, *parts = json.loads(key)
            view._loop(loop).restore(kind, parts, value)
        return view


def partial_from_json(data: Mapping[str, Any]) -> Partial | EvalCaseChange | CaseProposal:
    """A stage-1 message's JSON back into a Partial, an EvalCaseChange or a CaseProposal;
    pipeline.formats.NewerFormat if a newer loopline wrote it."""
    check_format(data, "a stage-1 message")
    if data["kind"] == "eval_case":
        return EvalCaseChange.from_json(data)
    if data["kind"] == "case":
        return CaseProposal.from_json(data)
    buckets: dict[int, Aggregate] = {}
    with_features = True
    for entry in data["buckets"]:
        aggregate = buckets[int(entry[0])] = Aggregate.from_json(entry[1])
        if len(entry) > 2:
            aggregate.features = FeatureStats.from_json(entry[2])
        elif "f" not in entry[1]:  # left out: unchanged (before 2026-11-26 always inside)
            with_features = False
    return Partial(int(data["p"]), str(data["loop"]), int(data["wm"]), buckets, None, with_features)
