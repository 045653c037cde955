"""The rules file: defaults, per-loop overrides, durations, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.drift import DEFAULT_THRESHOLDS
from pipeline.rules import AlertRules, RulesError
from pipeline.settings import Settings

EXAMPLE = """
evaluation_interval = "30s"

[drift]
window = "30m"
min_samples = 150
drift_share = 0.4
thresholds = { psi = 0.2 }
features."features.order_value_usd" = { wasserstein = 0.3 }

[defaults.quality_floor]
current = 0.85
for = "2m"

[loops.refunds.quality_floor]
historical = 0.95
resolve_after = 90

[loops.refunds.cost_budget]
enabled = false
"""


def test_no_file_means_every_default() -> None:
    rules = AlertRules.load(None)
    assert rules.evaluation_interval_ms == 60_000
    refunds = rules.for_loop("refunds")
    assert refunds.quality_floor.current == 0.8 and refunds.quality_floor.for_ms == 300_000
    assert refunds.drift.consecutive == 3 and refunds.dead_letter_rate.severity == "CRITICAL"
    assert rules.drift.window_ms == 3_600_000 and rules.drift.min_samples == 200
    assert dict(rules.drift.thresholds) == dict(DEFAULT_THRESHOLDS)


def test_loop_overrides_merge_key_by_key_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(EXAMPLE)
    rules = AlertRules.load(path)
    assert rules.evaluation_interval_ms == 30_000
    refunds, kyc = rules.for_loop("refunds"), rules.for_loop("kyc-review")
    # refunds: the default's current floor and for, its own historical and resolve_after
    assert (refunds.quality_floor.current, refunds.quality_floor.historical) == (0.85, 0.95)
    assert (refunds.quality_floor.for_ms, refunds.quality_floor.resolve_after_ms) == (
        120_000,
        90_000,
    )
    assert refunds.cost_budget.enabled is False and kyc.cost_budget.enabled is True
    assert (kyc.quality_floor.current, kyc.quality_floor.historical) == (0.85, 0.8)
    drift = rules.drift
    assert (drift.window_ms, drift.min_samples, drift.drift_share) == (1_800_000, 150, 0.4)
    assert drift.threshold("category", "psi") == 0.2
    assert drift.threshold("features.order_value_usd", "wasserstein") == 0.3
    assert drift.threshold("features.order_value_usd", "js") == DEFAULT_THRESHOLDS["js"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults.quality_floor]\ncurrent = 1.5\n", "defaults.quality_floor.current"),
        ('[loops.refunds.latency_slo]\nfor = "soon"\n', "loops.refunds.latency_slo.for"),
        ("[defaults.cost_budgt]\nmax_usd = 1\n", "defaults.cost_budgt"),
        ("[drift]\nthresholds = { chi2 = 0.1 }\n", "drift.thresholds.chi2"),
        ('[drift]\nwindow = "3h"\n', "drift.window: at most 2h"),
        ('[defaults.drift]\nseverity = "PAGE"\n', "defaults.drift.severity"),
        ("evaluation_interval = = 1", "not valid TOML"),
        # nan passes no bound it meets later, inf never fires: neither is a threshold
        ("[defaults.cost_budget]\nmax_usd = inf\n", "max_usd: Input should be a finite number"),
        ("[drift.thresholds]\njs = nan\n", "drift.thresholds.js: Input should be a finite number"),
        ("[defaults.cost_budget]\nfor = inf\n", "for: Value error, a duration must be a finite"),
    ],
)
def test_a_bad_file_is_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as caught:
        AlertRules.load(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_settings_read_the_rules_path_and_a_missing_file_is_named(tmp_path: Path) -> None:
    settings = Settings.from_env({"LOOPLINE_RULES": str(tmp_path / "nope.toml")})
    assert settings.rules == tmp_path / "nope.toml"
    with pytest.raises(RulesError, match=r"nope\.toml: cannot read the rules file"):
        settings.core_config()
