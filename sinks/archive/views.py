"""The analysts' views over the archive tables, created (or replaced) whenever the sink opens it.

Weeks are ISO weeks in UTC (``2026-W47``, Monday to Sunday). The counting rules are DESIGN.md's:
every resolution is one resolved case; a verdict counts at its own ts, an online verdict on a
resolution as a CURRENT one; latency is a resolution's ts minus the ts of its case's first
input (earliest ts; clock skew counts as 0); cost prices human minutes at the hourly rate the
sink was configured with when it archived the resolution. Quantiles are exact here
(quantile_cont, linear interpolation), where the live workers use a 1 % sketch.
"""

from __future__ import annotations

#: (column, direction): +1 when a rise is good, -1 when a fall is good, 0 when neither.
SCORECARD_NUMBERS: tuple[tuple[str, int], ...] = (
    ("coverage", 1),
    ("assisted", 0),
    ("quality_all", 1),
    ("quality_current", 1),
    ("quality_historical", 1),
    ("latency_p50_seconds", -1),
    ("latency_p90_seconds", -1),
    ("latency_p99_seconds", -1),
    ("cost_per_resolution_usd", -1),
    ("toil_hours", -1),
)

#: The five numbers a scorecard leads with (the other columns give detail).
HEADLINE = (
    "coverage",
    "quality_all",
    "latency_p90_seconds",
    "cost_per_resolution_usd",
    "toil_hours",
)


def _week(ts: str) -> str:
    return f"CAST(date_trunc('week', {ts} AT TIME ZONE 'UTC') AS DATE)"


def _trend_columns() -> str:
    parts = []
    for column, direction in SCORECARD_NUMBERS:
        change = f"n.{column} - p.{column}"
        parts.append(f"{change} AS {column}_wow_delta")
        if direction:
            good, bad = (">", "<") if direction > 0 else ("<", ">")
            parts.append(
                f"CASE WHEN {change} {good} 0 THEN true WHEN {change} {bad} 0 THEN false END"
                f" AS {column}_improved"
            )
    return ",\n    ".join(parts)


def views_sql() -> str:
    """Every view's CREATE OR REPLACE statement, in dependency order."""
    return f"""
CREATE OR REPLACE VIEW v_verdicts AS
SELECT loop, ts, release, lower(suite) AS suite, passed, eval_case_id AS subject,
       'eval' AS source
FROM eval_results
UNION ALL
SELECT loop, ts, release, 'current', eval_passed, case_id, 'online'
FROM resolutions WHERE eval_passed IS NOT NULL;

CREATE OR REPLACE VIEW v_resolution_facts AS
WITH first_input AS (SELECT case_id, min(ts) AS input_ts FROM inputs GROUP BY case_id)
SELECT r.*,
       r.model_cost_usd + r.other_cost_usd
         + r.human_minutes / 60.0 * coalesce(r.hourly_rate_usd, 0.0) AS cost_usd,
       -- greatest() skips NULLs, so a resolution without an input needs its own case
       CASE WHEN f.input_ts IS NOT NULL
            THEN greatest(epoch_ms(r.ts) - epoch_ms(f.input_ts), 0) / 1000.0 END
         AS latency_seconds
FROM resolutions r LEFT JOIN first_input f USING (case_id);

CREATE OR REPLACE VIEW v_weekly_scorecard AS
WITH res AS (
    SELECT loop, {_week("ts")} AS week_start,
           count(*) AS resolved,
           count(*) FILTER (WHERE resolver = 'SYSTEM') AS by_system,
           count(*) FILTER (WHERE resolver = 'HYBRID') AS by_hybrid,
           quantile_cont(latency_seconds, 0.5) AS latency_p50_seconds,
           quantile_cont(latency_seconds, 0.9) AS latency_p90_seconds,
           quantile_cont(latency_seconds, 0.99) AS latency_p99_seconds,
           sum(cost_usd) AS cost_usd,
           sum(human_minutes) AS human_minutes
    FROM v_resolution_facts GROUP BY ALL),
ver AS (
    SELECT loop, {_week("ts")} AS week_start,
           count(*) AS verdicts,
           count(*) FILTER (WHERE passed) AS passed,
           count(*) FILTER (WHERE suite = 'current') AS verdicts_current,
           count(*) FILTER (WHERE suite = 'current' AND passed) AS passed_current,
           count(*) FILTER (WHERE suite = 'historical') AS verdicts_historical,
           count(*) FILTER (WHERE suite = 'historical' AND passed) AS passed_historical
    FROM v_verdicts GROUP BY ALL),
weeks AS (SELECT loop, week_start FROM res UNION SELECT loop, week_start FROM ver),
numbers AS (
    SELECT w.loop, strftime(w.week_start, '%G-W%V') AS week, w.week_start,
           coalesce(res.resolved, 0) AS resolved,
           coalesce(ver.verdicts, 0) AS verdicts,
           res.by_system / nullif(res.resolved, 0) AS coverage,
           res.by_hybrid / nullif(res.resolved, 0) AS assisted,
           ver.passed / nullif(ver.verdicts, 0) AS quality_all,
           ver.passed_current / nullif(ver.verdicts_current, 0) AS quality_current,
           ver.passed_historical / nullif(ver.verdicts_historical, 0) AS quality_historical,
           res.latency_p50_seconds, res.latency_p90_seconds, res.latency_p99_seconds,
           res.cost_usd / nullif(res.resolved, 0) AS cost_per_resolution_usd,
           coalesce(res.human_minutes, 0.0) / 60.0 AS toil_hours
    FROM weeks w LEFT JOIN res USING (loop, week_start) LEFT JOIN ver USING (loop, week_start))
SELECT n.*,
    {_trend_columns()}
FROM numbers n
LEFT JOIN numbers p ON p.loop = n.loop AND p.week_start = n.week_start - 7;

CREATE OR REPLACE VIEW v_release_quality AS
SELECT loop, release, suite,
       count(*) AS verdicts,
       count(DISTINCT subject) AS cases,
       count(*) FILTER (WHERE passed) AS passed,
       count(*) FILTER (WHERE NOT passed) AS failed,
       count(*) FILTER (WHERE passed) / count(*) AS pass_rate,
       min(ts) AS first_verdict_at, max(ts) AS last_verdict_at
FROM v_verdicts GROUP BY loop, release, suite;

CREATE OR REPLACE VIEW v_drift_history AS
SELECT s.ts, s.loop,
       json_extract_string(s.labels, '$.feature') AS feature,
       json_extract_string(s.labels, '$.method') AS method,
       s.value AS score,
       f.value = 1 AS feature_drifted,
       d.value = 1 AS loop_drift_detected
FROM metric_snapshots s
LEFT JOIN metric_snapshots f
  ON f.metric = 'drift_feature_drifted' AND f.ts = s.ts AND f.loop = s.loop
 AND json_extract_string(f.labels, '$.feature') = json_extract_string(s.labels, '$.feature')
LEFT JOIN metric_snapshots d ON d.metric = 'drift_detected' AND d.ts = s.ts AND d.loop = s.loop
WHERE s.metric = 'drift_score';

CREATE OR REPLACE VIEW v_alert_episodes AS
SELECT fingerprint, started_at,
       any_value(rule) AS rule, any_value(loop) AS loop,
       arg_max(severity, ts) AS severity,
       min(ts) FILTER (WHERE state = 'RESOLVED') AS resolved_at,
       resolved_at IS NULL AS still_firing,
       (epoch_ms(resolved_at) - epoch_ms(started_at)) / 1000.0 AS duration_seconds,
       arg_min(value, ts) FILTER (WHERE state = 'FIRING') AS value_at_firing,
       arg_max(value, ts) FILTER (WHERE state = 'RESOLVED') AS value_at_resolve,
       any_value(threshold) AS threshold, any_value("window") AS "window",
       arg_min(summary, ts) AS summary, any_value(runbook_url) AS runbook_url
FROM alerts GROUP BY fingerprint, started_at;

CREATE OR REPLACE VIEW v_candidate_funnel AS
WITH decided AS (
    SELECT candidate_id, arg_max(decision, ts) AS decision,
           arg_max(eval_case_id, ts) AS eval_case_id
    FROM reviews GROUP BY candidate_id),
per_candidate AS (
    SELECT c.loop, {_week("c.ts")} AS week_start, d.decision,
           e.eval_case_id IS NOT NULL AS became_eval_case
    FROM eval_candidates c
    LEFT JOIN decided d USING (candidate_id)
    LEFT JOIN eval_cases e
      ON d.decision = 'ACCEPTED' AND e.eval_case_id = d.eval_case_id AND e.origin = 'REVIEWED')
SELECT loop, strftime(week_start, '%G-W%V') AS week, week_start,
       count(*) AS candidates,
       count(decision) AS reviewed,
       count(*) FILTER (WHERE decision = 'ACCEPTED') AS accepted,
       count(*) FILTER (WHERE decision = 'REJECTED') AS rejected,
       count(*) FILTER (WHERE decision = 'DUPLICATE') AS duplicates,
       count(*) FILTER (WHERE became_eval_case) AS eval_cases,
       count(decision) / count(*) AS reviewed_ratio,
       accepted / nullif(count(decision), 0) AS acceptance_ratio
FROM per_candidate GROUP BY loop, week_start;

CREATE OR REPLACE VIEW v_eval_set_growth AS
WITH weekly AS (
    SELECT loop, {_week("ts")} AS week_start,
           count(*) AS added,
           count(*) FILTER (WHERE origin = 'REVIEWED') AS added_reviewed
    FROM eval_cases GROUP BY ALL)
SELECT loop, strftime(week_start, '%G-W%V') AS week, week_start, added, added_reviewed,
       sum(added) OVER (PARTITION BY loop ORDER BY week_start) AS eval_cases_total
FROM weekly;
"""
