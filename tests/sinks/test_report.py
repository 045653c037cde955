"""The weekly report renders in a real headless Chromium, charts present, numbers = the view."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from playwright.sync_api import sync_playwright

from pipeline.cli import main
from tests.sinks import factories as f
from tests.sinks.test_store import fetch, make_archive
from tests.sinks.test_views import RATES, _two_weeks, _write

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def archive_with_two_weeks(tmp_path: Path) -> Path:
    archive = make_archive(tmp_path / "a.duckdb", RATES)
    drift = {"detected": True, "features": {"category": {"js": 0.31, "psi": 0.42, "drifted": True}}}
    _write(
        archive,
        [
            *_two_weeks(seed=3),
            ("metrics", f.snapshot(f.at(2), drift=drift)),
            ("metrics", f.snapshot(f.at(3), drift={**drift, "detected": False})),
            ("alerts", f.alert("FIRING", f.at(2), f.at(2))),
            ("alerts", f.alert("RESOLVED", f.at(2, 1800), f.at(2))),
            ("eval-candidates", f.candidate("k1", f.at(1))),
            ("reviews", f.review("k1", "ACCEPTED", f.at(1, 60), eval_case_id="e-k1")),
            ("eval-cases", f.eval_case("e0", f.at(-7))),
            ("eval-cases", f.eval_case("e-k1", f.at(1, 60), origin="REVIEWED")),
        ],
    )
    return archive.path


def test_the_report_renders_with_charts_and_the_views_numbers(
    archive_with_two_weeks: Path, tmp_path: Path
) -> None:
    assert CHROMIUM, "Debian's chromium is needed (make test installs it)"
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        main, ["report", "--week", "2026-W47", "-o", str(out), "--db", str(archive_with_two_weeks)]
    )
    assert result.exit_code == 0, result.output
    html = out.read_text()
    # Self-contained: nothing to fetch (namespace URIs in the SVG metadata are not fetched).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)

    archive = make_archive(archive_with_two_weeks)
    expected = {
        (loop, name): value
        for loop, *values in fetch(
            archive,
            "SELECT loop, coverage, quality_all, latency_p90_seconds, cost_per_resolution_usd, "
            "toil_hours FROM v_weekly_scorecard WHERE week = '2026-W47'",
        )
        for name, value in zip(
            [
                "coverage",
                "quality_all",
                "latency_p90_seconds",
                "cost_per_resolution_usd",
                "toil_hours",
            ],
            values,
            strict=True,
        )
    }
    improved = dict(
        fetch(
            archive,
            "SELECT loop, coverage_improved FROM v_weekly_scorecard WHERE week = '2026-W47'",
        )
    )

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(out.as_uri())
        loops = page.eval_on_selector_all("section.loop", "els => els.map(e => e.dataset.loop)")
        assert loops == ["refunds", "support-triage"]
        cards = page.eval_on_selector_all(
            "section.loop .card",
            "els => els.map(e => [e.closest('section').dataset.loop, e.dataset.metric,"
            " e.dataset.value, e.dataset.verdict])",
        )
        assert {(loop, name): float(value) for loop, name, value, _ in cards} == expected
        assert {loop: v for loop, name, _, v in cards if name == "coverage"} == {
            loop: {True: "better", False: "worse", None: "same"}[improved[loop]] for loop in loops
        }
        # Every chart is drawn: an inline SVG with a visible size and plotted lines or bars.
        charts = page.eval_on_selector_all(
            "figure.chart",
            "els => els.map(e => { const s = e.querySelector('svg');"
            " const r = s.getBoundingClientRect();"
            " return [e.closest('section').dataset.loop, e.dataset.chart, r.width, r.height,"
            " s.querySelectorAll('path').length]; })",
        )
        names = {(loop, chart) for loop, chart, *_ in charts}
        for loop in loops:
            for chart in (
                "coverage",
                "quality_all",
                "latency_p90_seconds",
                "cost_per_resolution_usd",
                "toil_hours",
            ):
                assert (loop, chart) in names
        assert ("refunds", "drift") in names and ("refunds", "eval_set_growth") in names
        assert all(w > 100 and h > 50 and paths > 3 for *_, w, h, paths in charts), charts
        alerts = page.inner_text("section[data-loop=refunds] table.alerts")
        assert "quality_floor\tCRITICAL\tWed 00:00\tWed 00:30\t30 min" in alerts
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()


def test_a_bad_week_is_a_clear_error(archive_with_two_weeks: Path) -> None:
    result = CliRunner().invoke(
        main, ["report", "--week", "47", "--db", str(archive_with_two_weeks)]
    )
    assert result.exit_code == 2
    assert "week must look like 2026-W47, got '47'" in result.output


def test_a_loop_the_archive_has_no_data_of_is_a_clear_error(
    archive_with_two_weeks: Path, tmp_path: Path
) -> None:
    """A misspelt loop gave a report of empty cards; it is refused, naming the loops there
    are. A loop with data in other weeks only still gets its report (its trends)."""
    out = tmp_path / "r.html"
    db = str(archive_with_two_weeks)
    result = CliRunner().invoke(
        main, ["report", "--week", "2026-W47", "--loop", "refund", "--db", db, "-o", str(out)]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: Invalid value for --loop: the archive has no resolutions or verdicts of loop "
        "'refund'; loops: refunds, support-triage"
    )
    assert not out.exists()
    result = CliRunner().invoke(
        main, ["report", "--week", "2026-W40", "--loop", "refunds", "--db", db, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "refunds" in out.read_text()
