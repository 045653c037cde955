"""The alert rules and drift settings file (TOML), validated with errors that name the key.

One file configures every loop: ``[defaults.<rule>]`` applies to all loops and
``[loops.<loop>.<rule>]`` overrides single keys for one loop; ``[drift]`` holds the drift
detector's window, min_samples, drift_share and thresholds. Every key has a default, so no file
at all is a valid configuration. Durations are seconds or text such as "90s", "5m", "1h", "2d".
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from pipeline.candidates import DEFAULT_SAMPLE_RATES, CandidateConfig
from pipeline.drift import DEFAULT_THRESHOLDS, DriftConfig
from pipeline.redact import Redactor
from pipeline.windows import HOUR

DEFAULT_RUNBOOK_BASE = "https://github.com/loopline/loopline/blob/main/docs/runbooks"
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file and the offending keys."""


def _duration_ms(raw: Any) -> int:
    """ "90s" / "5m" / "1h" / "2d" / a number of seconds -> milliseconds."""
    if isinstance(raw, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(raw, int | float):
        seconds = float(raw)
        if not math.isfinite(seconds):
            raise ValueError(f"a duration must be a finite number, got {raw}")
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(raw))
        if not match:
            raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {raw!r}")
        return round(float(match.group(1)) * _UNITS[match.group(2)])
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return round(seconds * 1000)


Duration = Annotated[int, BeforeValidator(_duration_ms)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Window = Literal["5m", "1h", "24h", "7d"]
Severity = Literal["INFO", "WARNING", "CRITICAL"]
Method = Literal["js", "psi", "wasserstein", "ks", "embedding"]
Reason = Literal[
    "failed_eval",
    "failed",
    "escalated",
    "low_confidence",
    "novel_category",
    "drifted_feature",
    "cost_outlier",
    "latency_outlier",
]


class _Model(BaseModel):
    # No nan or inf: nan passes no bound check it meets later (a threshold of nan never
    # fires), and an infinite one never fires either.
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


class Rule(_Model):
    """What every rule has: a minimum sample size and hysteresis in event time."""

    enabled: bool = True
    severity: Severity = "WARNING"
    window: Window = "1h"
    min_samples: int = Field(100, ge=0)
    for_ms: Duration = Field(5 * 60_000, alias="for")  # breaching this long before FIRING
    resolve_after_ms: Duration = Field(10 * 60_000, alias="resolve_after")  # clear this long
    runbook_url: str | None = None


class QualityFloor(Rule):
    """Eval pass rate per suite below its floor (None: that suite is not watched)."""

    min_samples: int = Field(50, ge=0)
    current: Ratio | None = 0.8
    historical: Ratio | None = 0.8
    all: Ratio | None = None


class LatencySlo(Rule):
    """Resolution latency quantiles above the SLO, in seconds (None: not watched)."""

    p95_seconds: float | None = Field(None, gt=0)
    p99_seconds: float | None = Field(3600.0, gt=0)


class CostBudget(Rule):
    max_usd: float = Field(1.0, ge=0)  # cost per resolution


class CoverageDrop(Rule):
    """Coverage fell by more than max_drop (absolute) against the same window a week ago."""

    window: Window = "24h"
    max_drop: Ratio = 0.1


class ToilRise(Rule):
    """Toil rose by more than max_rise (relative) against the same window a week ago."""

    window: Window = "24h"
    max_rise: float = Field(0.25, ge=0)


class DriftRule(Rule):
    """The loop's drift detector said yes for ``consecutive`` evaluations in a row."""

    severity: Severity = "WARNING"
    for_ms: Duration = Field(0, alias="for")
    consecutive: int = Field(3, ge=1)


class UnresolvedRule(Rule):
    """More than max_cases cases are unresolved past the loop's SLA."""

    for_ms: Duration = Field(0, alias="for")
    min_samples: int = Field(0, ge=0)
    max_cases: int = Field(0, ge=0)


class DeadLetterRate(Rule):
    """Dead letters / all events of the window above max_ratio."""

    severity: Severity = "CRITICAL"
    window: Window = "5m"
    max_ratio: Ratio = 0.01


class LoopRules(_Model):
    quality_floor: QualityFloor = QualityFloor()
    latency_slo: LatencySlo = LatencySlo()
    cost_budget: CostBudget = CostBudget()
    coverage_drop: CoverageDrop = CoverageDrop()
    toil_rise: ToilRise = ToilRise()
    drift: DriftRule = DriftRule()
    unresolved: UnresolvedRule = UnresolvedRule()
    dead_letter_rate: DeadLetterRate = DeadLetterRate()


class DriftSection(_Model):
    window_ms: Duration = Field(HOUR, alias="window")
    min_samples: int = Field(200, ge=1)
    drift_share: Ratio = 0.5
    thresholds: dict[Method, float] = Field(default_factory=dict)  # over DEFAULT_THRESHOLDS
    features: dict[str, dict[Method, float]] = Field(default_factory=dict)  # per feature

    def config(self) -> DriftConfig:
        return DriftConfig(
            window_ms=self.window_ms,
            min_samples=self.min_samples,
            drift_share=self.drift_share,
            thresholds={**DEFAULT_THRESHOLDS, **{str(m): v for m, v in self.thresholds.items()}},
            feature_thresholds={
                name: {str(m): v for m, v in t.items()} for name, t in self.features.items()
            },
        )


class CandidatesSection(_Model):
    """Eval-candidate sampling (pipeline.candidates) and redaction."""

    salt: str = "loopline"
    daily_budget: int = Field(200, ge=0)
    stratum_daily_cap: int = Field(25, ge=0)
    confidence_floor: Ratio = 0.6
    cost_outlier_factor: float = Field(5.0, gt=0)
    sample_rates: dict[Reason, Ratio] = Field(default_factory=dict)  # over the defaults
    redact_patterns: list[str] = Field(default_factory=list)  # regexes, besides the defaults

    def config(self) -> CandidateConfig:
        try:
            Redactor(self.redact_patterns)
        except ValueError as exc:
            raise RulesError(f"candidates.redact_patterns: {exc}") from None
        return CandidateConfig(
            salt=self.salt,
            daily_budget=self.daily_budget,
            stratum_daily_cap=self.stratum_daily_cap,
            confidence_floor=self.confidence_floor,
            cost_outlier_factor=self.cost_outlier_factor,
            sample_rates={
                **DEFAULT_SAMPLE_RATES,
                **{str(k): v for k, v in self.sample_rates.items()},
            },
            redact_patterns=tuple(self.redact_patterns),
        )


class EvalSetSection(_Model):
    current_days: int = Field(30, ge=1)  # CURRENT eval cases older than this turn HISTORICAL


class RulesFile(_Model):
    evaluation_interval_ms: Duration = Field(60_000, alias="evaluation_interval")
    runbook_base_url: str = DEFAULT_RUNBOOK_BASE
    drift: DriftSection = DriftSection()
    candidates: CandidatesSection = CandidatesSection()
    eval_set: EvalSetSection = EvalSetSection()
    defaults: dict[str, Any] = Field(default_factory=dict)
    loops: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AlertRules:
    """The validated file: rules per loop (defaults merged under overrides), drift settings."""

    def __init__(self, parsed: RulesFile, per_loop: Mapping[str, LoopRules], default: LoopRules):
        self.evaluation_interval_ms = parsed.evaluation_interval_ms
        self.runbook_base_url = parsed.runbook_base_url.rstrip("/")
        self.drift: DriftConfig = parsed.drift.config()
        self.candidates: CandidateConfig = parsed.candidates.config()
        self.current_days = parsed.eval_set.current_days
        self._per_loop = dict(per_loop)
        self._default = default

    def for_loop(self, loop: str) -> LoopRules:
        return self._per_loop.get(loop, self._default)

    @property
    def default_rules(self) -> LoopRules:
        """The rules of every loop without a [loops.<loop>] section."""
        return self._default

    @property
    def loop_rules(self) -> Mapping[str, LoopRules]:
        """The rules of the loops with a [loops.<loop>] section (defaults merged in)."""
        return dict(self._per_loop)

    def runbook(self, rule: str, configured: str | None) -> str:
        return configured or f"{self.runbook_base_url}/{rule}.md"

    @classmethod
    def parse(cls, raw: Mapping[str, Any], source: str = "rules") -> AlertRules:
        try:
            parsed = RulesFile.model_validate(raw)
        except ValidationError as exc:
            raise RulesError(_describe(source, exc)) from None
        try:
            default = LoopRules.model_validate(parsed.defaults)
        except ValidationError as exc:
            raise RulesError(_describe(source, exc, prefix="defaults")) from None
        per_loop: dict[str, LoopRules] = {}
        for loop, overrides in parsed.loops.items():
            try:
                per_loop[loop] = LoopRules.model_validate(_deep_merge(parsed.defaults, overrides))
            except ValidationError as exc:
                raise RulesError(_describe(source, exc, prefix=f"loops.{loop}")) from None
        if parsed.drift.window_ms > 2 * HOUR:
            raise RulesError(f"{source}: drift.window: at most 2h (the fine buckets' retention)")
        if parsed.evaluation_interval_ms <= 0:
            raise RulesError(f"{source}: evaluation_interval: must be positive")
        try:
            return cls(parsed, per_loop, default)
        except RulesError as exc:
            raise RulesError(f"{source}: {exc}") from None

    @classmethod
    def default(cls) -> AlertRules:
        return cls.parse({})

    @classmethod
    def load(cls, path: Path | None) -> AlertRules:
        """The file's rules, or every default when no file is configured."""
        if path is None:
            return cls.parse({})
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise RulesError(f"{path}: cannot read the rules file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{path}: not valid TOML: {exc}") from None
        return cls.parse(raw, str(path))


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(source: str, exc: ValidationError, prefix: str = "") -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s)"]
    for error in exc.errors():
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
