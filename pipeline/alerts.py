"""Alert rules read at each evaluation, and the episode state machine behind FIRING/RESOLVED.

Each evaluation of a loop (on event time, every evaluation_interval) turns the loop's windows
into Readings, one per watched quantity (a rule, per suite or quantile where it has several).
A Reading breaches only with at least min_samples behind it. An alert's episode fires once its
reading has breached for ``for`` (and ``consecutive`` evaluations), and resolves once it has
been clear for ``resolve_after``: one FIRING and one RESOLVED record per episode, with event_id
fingerprint:state:started_at, so a record re-sent after a crash is the same record. Episode
state is part of the loop's checkpointed state, so a restart never fires an episode twice.
No Kafka here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.aggregates import Aggregate
from pipeline.rules import AlertRules, LoopRules, Rule


@dataclass(frozen=True)
class Facts:
    """What the rules read at one evaluation of one loop."""

    loop: str
    as_of_ms: int
    now: Mapping[str, Aggregate]  # window name -> aggregate ending at as_of
    week_ago: Mapping[str, Aggregate]  # the same windows a week earlier
    hourly_rate: float
    drift: Mapping[str, Any]  # the snapshot's drift section at as_of
    drift_share: float
    unresolved: int


@dataclass(frozen=True)
class Reading:
    rule: str
    key: str  # what distinguishes readings of one rule: a suite, a quantile, or ""
    breached: bool
    value: float | None
    threshold: float
    window: str | None
    summary: str
    settings: Rule

    @property
    def consecutive(self) -> int:
        return int(getattr(self.settings, "consecutive", 1))


def readings(facts: Facts, rules: LoopRules) -> list[Reading]:
    """Every enabled rule's readings for this evaluation."""
    found: list[Reading] = []
    loop = facts.loop

    def add(
        rule: str,
        key: str,
        settings: Rule,
        ok: bool,
        value: float | None,
        threshold: float,
        breached: bool,
        summary: str,
        window: str | None = None,
    ) -> None:
        found.append(
            Reading(
                rule,
                key,
                ok and breached,
                value,
                threshold,
                settings.window if window is None else window,
                summary,
                settings,
            )
        )

    q = rules.quality_floor
    if q.enabled:
        agg = facts.now[q.window]
        for suite, floor in (("current", q.current), ("historical", q.historical), ("all", q.all)):
            if floor is None:
                continue
            suites = ("CURRENT", "HISTORICAL") if suite == "all" else (suite.upper(),)
            total = agg.verdict_count(suites)
            rate = agg.pass_rate(suites)
            add(
                "quality_floor",
                suite,
                q,
                total >= q.min_samples,
                rate,
                floor,
                rate is not None and rate < floor,
                f"{loop}: eval pass rate ({suite}) {_fmt(rate)} against a floor of {floor:g} "
                f"over {q.window} ({total} verdicts)",
            )
    lat = rules.latency_slo
    if lat.enabled:
        agg = facts.now[lat.window]
        for name, quantile, slo in (("p95", 0.95, lat.p95_seconds), ("p99", 0.99, lat.p99_seconds)):
            if slo is None:
                continue
            value = agg.latency.quantile(quantile)
            add(
                "latency_slo",
                name,
                lat,
                agg.latency.count >= lat.min_samples,
                value,
                slo,
                value is not None and value > slo,
                f"{loop}: latency {name} {_fmt(value)} s against an SLO of {slo:g} s "
                f"over {lat.window} ({agg.latency.count} resolutions)",
            )
    cost = rules.cost_budget
    if cost.enabled:
        agg = facts.now[cost.window]
        value = agg.numbers(facts.hourly_rate, set())["cost_per_resolution_usd"]
        add(
            "cost_budget",
            "",
            cost,
            agg.resolved >= cost.min_samples,
            value,
            cost.max_usd,
            value is not None and value > cost.max_usd,
            f"{loop}: cost per resolution {_fmt(value)} USD against a budget of "
            f"{cost.max_usd:g} USD over {cost.window} ({agg.resolved} resolved)",
        )
    cov = rules.coverage_drop
    if cov.enabled:
        now, before = facts.now[cov.window], facts.week_ago[cov.window]
        ok = min(now.resolved, before.resolved) >= cov.min_samples
        c_now, c_before = now.coverage(), before.coverage()
        drop = None if c_now is None or c_before is None else c_before - c_now
        add(
            "coverage_drop",
            "",
            cov,
            ok,
            drop,
            cov.max_drop,
            drop is not None and drop > cov.max_drop,
            f"{loop}: coverage {_fmt(c_now)} over {cov.window}, {_fmt(c_before)} a week "
            f"before (drop {_fmt(drop)}, allowed {cov.max_drop:g})",
        )
    toil = rules.toil_rise
    if toil.enabled:
        now, before = facts.now[toil.window], facts.week_ago[toil.window]
        ok = min(now.resolved, before.resolved) >= toil.min_samples and before.human_minutes > 0
        rise = now.human_minutes / before.human_minutes - 1 if before.human_minutes else None
        add(
            "toil_rise",
            "",
            toil,
            ok,
            rise,
            toil.max_rise,
            rise is not None and rise > toil.max_rise,
            f"{loop}: toil {now.human_minutes / 60:.2f} h over {toil.window}, "
            f"{before.human_minutes / 60:.2f} h a week before (rise {_fmt(rise)}, "
            f"allowed {toil.max_rise:g})",
        )
    drift = rules.drift
    if drift.enabled:
        # value: the share of evaluated features that drifted; threshold: drift_share.
        features = facts.drift["features"]
        drifted = sorted(name for name, f in features.items() if f["drifted"])
        add(
            "drift",
            "",
            drift,
            True,
            len(drifted) / len(features) if features else 0.0,
            facts.drift_share,
            bool(facts.drift["detected"]),
            f"{loop}: {len(drifted)} of {len(features)} features drifted from the eval "
            f"baseline ({', '.join(drifted) or 'none'})",
            window="drift",
        )
    unresolved = rules.unresolved
    if unresolved.enabled:
        n = facts.unresolved
        add(
            "unresolved",
            "",
            unresolved,
            n >= unresolved.min_samples,
            float(n),
            float(unresolved.max_cases),
            n > unresolved.max_cases,
            f"{loop}: {n} cases unresolved past the SLA (allowed {unresolved.max_cases})",
            window="sla",
        )
    dlq = rules.dead_letter_rate
    if dlq.enabled:
        agg = facts.now[dlq.window]
        total = agg.events + agg.dead_letters
        rate = agg.dead_letters / total if total else None
        add(
            "dead_letter_rate",
            "",
            dlq,
            total >= dlq.min_samples,
            rate,
            dlq.max_ratio,
            rate is not None and rate > dlq.max_ratio,
            f"{loop}: {agg.dead_letters} of {total} records dead-lettered over {dlq.window} "
            f"(rate {_fmt(rate)}, allowed {dlq.max_ratio:g})",
        )
    return found


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@dataclass
class Episode:
    """One alert's state between evaluations."""

    rule: str
    severity: str
    streak: int = 0  # consecutive breaching evaluations
    pending_since: int | None = None  # first breaching evaluation of the current run
    firing_since: int | None = None  # the episode's started_at while FIRING
    clear_since: int | None = None  # first clear evaluation while FIRING

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "streak": self.streak,
            "pending": self.pending_since,
            "firing": self.firing_since,
            "clear": self.clear_since,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Episode:
        return cls(
            data["rule"],
            data["severity"],
            int(data["streak"]),
            data["pending"],
            data["firing"],
            data["clear"],
        )

    @property
    def idle(self) -> bool:
        return self.streak == 0 and self.firing_since is None


class AlertEngine:
    """The episodes of one loop's alerts; ``step`` once per evaluation."""

    def __init__(self, loop: str, rules: AlertRules) -> None:
        self.loop = loop
        self.rules = rules
        self.episodes: dict[str, Episode] = {}
        self.changed: set[str] = set()

    def fingerprint(self, reading: Reading) -> str:
        return "/".join(p for p in (reading.rule, self.loop, reading.key) if p)

    def step(self, as_of_ms: int, found: Iterable[Reading]) -> list[dict[str, Any]]:
        """Advance every episode to this evaluation; returns the Alert records to publish."""
        records: list[dict[str, Any]] = []
        for reading in found:
            fingerprint = self.fingerprint(reading)
            episode = self.episodes.get(fingerprint)
            if episode is None:
                if not reading.breached:
                    continue
                episode = self.episodes[fingerprint] = Episode(
                    reading.rule, reading.settings.severity
                )
            self.changed.add(fingerprint)
            state = self._advance(episode, reading, as_of_ms)
            if state is not None:
                records.append(self._record(fingerprint, episode, reading, state, as_of_ms))
                if state == "RESOLVED":
                    episode.firing_since = None
            if episode.idle:
                del self.episodes[fingerprint]
        return records

    @staticmethod
    def _advance(episode: Episode, reading: Reading, as_of_ms: int) -> str | None:
        settings = reading.settings
        if reading.breached:
            episode.streak += 1
            episode.clear_since = None
            if episode.pending_since is None:
                episode.pending_since = as_of_ms
            if (
                episode.firing_since is None
                and as_of_ms - episode.pending_since >= settings.for_ms
                and episode.streak >= reading.consecutive
            ):
                episode.firing_since = as_of_ms
                episode.severity = settings.severity
                return "FIRING"
            return None
        episode.streak = 0
        episode.pending_since = None
        if episode.firing_since is None:
            return None
        if episode.clear_since is None:
            episode.clear_since = as_of_ms
        if as_of_ms - episode.clear_since >= settings.resolve_after_ms:
            episode.clear_since = None
            return "RESOLVED"
        return None

    def _record(
        self, fingerprint: str, episode: Episode, reading: Reading, state: str, as_of_ms: int
    ) -> dict[str, Any]:
        started = episode.firing_since
        assert started is not None
        summary = reading.summary if state == "FIRING" else f"resolved: {reading.summary}"
        return {
            "event_id": f"{fingerprint}:{state}:{started}",
            "fingerprint": fingerprint,
            "rule": reading.rule,
            "loop": self.loop,
            "severity": episode.severity,
            "state": state,
            "value": reading.value,
            "threshold": reading.threshold,
            "window": reading.window,
            "started_at": started,
            "ts": as_of_ms,
            "summary": summary,
            "runbook_url": self.rules.runbook(reading.rule, reading.settings.runbook_url),
        }

    def firing(self) -> Counter[tuple[str, str]]:
        """Firing episodes by (rule, severity)."""
        return Counter(
            (e.rule, e.severity) for e in self.episodes.values() if e.firing_since is not None
        )

    # -- persistence ------------------------------------------------------------------------

    def changed_records(self) -> dict[str, Any]:
        records = {}
        for fingerprint in self.changed:
            found = self.episodes.get(fingerprint)
            records[fingerprint] = None if found is None else found.to_json()
        self.changed = set()
        return records

    def restore(self, fingerprint: str, value: Mapping[str, Any]) -> None:
        self.episodes[fingerprint] = Episode.from_json(value)
