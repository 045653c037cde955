"""The weekly scorecard report: one self-contained HTML file (charts inlined as SVG).

Every number comes from the archive's views (v_weekly_scorecard, v_drift_history,
v_alert_episodes, v_candidate_funnel, v_eval_set_growth), so the report and an analyst's
query never disagree. Charts are drawn with matplotlib and embedded; the file needs no network.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import jinja2
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from sinks.archive.gate import named
from sinks.archive.store import Archive
from sinks.archive.views import HEADLINE, SCORECARD_NUMBERS

TREND_WEEKS = 8
_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")

LABELS = {
    "coverage": ("Coverage", "ratio"),
    "quality_all": ("Quality (eval pass rate)", "ratio"),
    "latency_p90_seconds": ("Latency p90", "seconds"),
    "cost_per_resolution_usd": ("Cost per resolution", "usd"),
    "toil_hours": ("Toil", "hours"),
}
DIRECTION = dict(SCORECARD_NUMBERS)


def parse_week(text: str) -> date:
    """``2026-W47`` -> the Monday that starts that ISO week."""
    match = _WEEK.match(text)
    if not match:
        raise ValueError(f"week must look like 2026-W47, got {text!r}")
    try:
        return datetime.strptime(f"{text}-1", "%G-W%V-%u").date()
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO week") from None


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "usd":
        return f"${value:,.4f}"
    if unit == "seconds":
        return f"{value:,.1f} s"
    return f"{value:,.2f} h"


def _fmt_delta(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "ratio":
        return f"{value * 100:+.1f} pp"
    sign = "+" if value >= 0 else "-"
    return sign + _fmt(abs(value), unit)


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")  # Figure, not pyplot: no global state
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG is inlined in HTML


def _trend_chart(title: str, weeks: list[str], values: list[float | None], unit: str) -> str:
    fig = Figure(figsize=(4.2, 2.2), dpi=96)
    ax = fig.subplots()
    points = [(w, v) for w, v in zip(weeks, values, strict=True) if v is not None]
    if points:
        ax.plot([w for w, _ in points], [v for _, v in points], marker="o", color="#2463eb")
        ax.plot([points[-1][0]], [points[-1][1]], marker="o", markersize=9, color="#2463eb")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)
    if unit == "ratio":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    return _svg(fig)


def _drift_chart(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    fig = Figure(figsize=(8.5, 2.8), dpi=96)
    ax = fig.subplots()
    series: dict[str, list[tuple[Any, float]]] = {}
    for row in rows:
        if row["score"] is not None:
            series.setdefault(f"{row['feature']} / {row['method']}", []).append(
                (row["ts"], row["score"])
            )
    for name, points in sorted(series.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], label=name, linewidth=1.2)
    ax.set_title("Drift scores over the week", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return _svg(fig)


def _growth_chart(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    fig = Figure(figsize=(4.2, 2.2), dpi=96)
    ax = fig.subplots()
    ax.bar([r["week"] for r in rows], [r["eval_cases_total"] for r in rows], color="#16a34a")
    ax.set_title("Eval cases (total)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)
    return _svg(fig)


@dataclass
class LoopSection:
    loop: str
    numbers: list[dict[str, Any]]
    charts: dict[str, str]
    drift_chart: str | None
    drift_detected: bool | None
    alerts: list[dict[str, Any]]
    funnel: dict[str, Any] | None
    growth_chart: str | None
    growth: dict[str, Any] | None


def _section(con: duckdb.DuckDBPyConnection, loop: str, monday: date) -> LoopSection:
    first = monday - timedelta(weeks=TREND_WEEKS - 1)
    card = _rows(
        con,
        "SELECT * FROM v_weekly_scorecard WHERE loop = ? AND week_start BETWEEN ? AND ? "
        "ORDER BY week_start",
        [loop, first, monday],
    )
    by_week = {row["week_start"]: row for row in card}
    weeks = [first + timedelta(weeks=i) for i in range(TREND_WEEKS)]
    labels = [w.strftime("%G-W%V") for w in weeks]
    current = by_week.get(monday, {})
    numbers, charts = [], {}
    for name in HEADLINE:
        title, unit = LABELS[name]
        value, change = current.get(name), current.get(f"{name}_wow_delta")
        improved = current.get(f"{name}_improved")
        numbers.append(
            {
                "name": name,
                "title": title,
                "value": value,
                "text": _fmt(value, unit),
                "delta": change,
                "delta_text": _fmt_delta(change, unit),
                "arrow": "" if change in (None, 0) else ("▲" if change > 0 else "▼"),
                "verdict": "same" if improved is None else ("better" if improved else "worse"),
                "good_when": "up" if DIRECTION[name] > 0 else "down",
            }
        )
        charts[name] = _trend_chart(
            title, labels, [by_week.get(w, {}).get(name) for w in weeks], unit
        )
    start = datetime.combine(monday, datetime.min.time(), tzinfo=UTC)
    end = start + timedelta(weeks=1)
    drift = _rows(
        con,
        "SELECT ts, feature, method, score, loop_drift_detected FROM v_drift_history "
        "WHERE loop = ? AND ts >= ? AND ts < ? ORDER BY ts",
        [loop, start, end],
    )
    alerts = _rows(
        con,
        "SELECT rule, severity, started_at, resolved_at, still_firing, duration_seconds, summary "
        "FROM v_alert_episodes WHERE loop = ? AND started_at < ? "
        "AND (resolved_at IS NULL OR resolved_at >= ?) ORDER BY started_at",
        [loop, end, start],
    )
    funnel = _rows(
        con, "SELECT * FROM v_candidate_funnel WHERE loop = ? AND week_start = ?", [loop, monday]
    )
    growth = _rows(
        con,
        "SELECT * FROM v_eval_set_growth WHERE loop = ? AND week_start <= ? ORDER BY week_start",
        [loop, monday],
    )
    return LoopSection(
        loop=loop,
        numbers=numbers,
        charts=charts,
        drift_chart=_drift_chart(drift),
        drift_detected=any(r["loop_drift_detected"] for r in drift) if drift else None,
        alerts=alerts,
        funnel=funnel[0] if funnel else None,
        growth_chart=_growth_chart(growth[-TREND_WEEKS:]),
        growth=growth[-1] if growth else None,
    )


class UnknownLoop(ValueError):
    """The report was asked for a loop the archive has no resolutions or verdicts of."""


def render_report(archive: Archive, week: str, loop: str | None = None) -> str:
    """The report's HTML for one ISO week, for one loop or every loop with data that week.
    Raises UnknownLoop for a loop the archive has no data of in any week (a misspelt name
    gave a report of empty cards)."""
    monday = parse_week(week)
    with archive.connect(read_only=True, wait_seconds=15.0) as con:
        if loop is None:
            loops = [
                r["loop"]
                for r in _rows(
                    con,
                    "SELECT DISTINCT loop FROM v_weekly_scorecard WHERE week_start = ? ORDER BY 1",
                    [monday],
                )
            ]
        else:
            known = [
                r["loop"]
                for r in _rows(con, "SELECT DISTINCT loop FROM v_weekly_scorecard ORDER BY 1", [])
            ]
            if loop not in known:
                raise UnknownLoop(
                    f"the archive has no resolutions or verdicts of loop {loop!r}; "
                    + named("loops", known)
                )
            loops = [loop]
        sections = [_section(con, name, monday) for name in loops]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sinks.archive", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html").render(
        week=week,
        monday=monday,
        sunday=monday + timedelta(days=6),
        sections=sections,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
