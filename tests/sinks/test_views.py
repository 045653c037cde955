"""The analysts' views on made-up weeks with known answers, and the release gate's exit codes."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from sinks.archive.gate import KNOWN_QUERY, unknown_hint
from sinks.archive.store import Archive
from sinks.archive.views import SCORECARD_NUMBERS
from tests.sinks import factories as f
from tests.sinks.test_store import fetch, make_archive, make_sink

RATES = {"refunds": 40.0}  # support-triage has no rate: its human time costs 0


def _write(archive: Archive, records: list[tuple[str, dict[str, Any]]]) -> None:
    sink = make_sink(archive)
    for offset, (topic, record) in enumerate(records):
        sink.add_record(topic, record, f"t.{topic}", 0, offset)
    sink.flush()


def _two_weeks(seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Cases in weeks 46 and 47 of two loops, with resolutions lacking inputs, duplicated
    inputs with an earlier copy, resolutions before their input, and online verdicts."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    start = datetime(2026, 11, 9, tzinfo=UTC)  # Monday of 2026-W46
    for n in range(400):
        loop = rng.choice(["refunds", "support-triage"])
        case = f"c{n}"
        t0 = start + timedelta(
            seconds=round(rng.uniform(0, 14 * 86400 - 7200), 3)
        )  # ms, as on the wire
        if rng.random() > 0.1:  # 10 % of resolutions never get an input
            out.append(("inputs", f.input_event(f"i{n}", case, t0, loop)))
            if rng.random() < 0.2:  # a second input for the case: the earliest ts counts
                early = t0 - timedelta(seconds=round(rng.uniform(1, 50), 3))
                out.append(("inputs", f.input_event(f"i{n}b", case, early, loop)))
        latency = round(rng.uniform(-5, 3600), 3)  # negative: clock skew, counts as 0
        resolver = rng.choice(["SYSTEM", "SYSTEM", "HUMAN", "HYBRID"])
        online = rng.choice([None, True, False])
        out.append(
            (
                "resolutions",
                f.resolution(
                    f"r{n}",
                    case,
                    t0 + timedelta(seconds=latency),
                    loop,
                    resolver=resolver,
                    model_cost_usd=round(rng.uniform(0, 0.05), 4),
                    other_cost_usd=round(rng.uniform(0, 0.01), 4),
                    human_minutes=0.0 if resolver == "SYSTEM" else round(rng.uniform(1, 30), 2),
                    eval_passed=online,
                    release=rng.choice(["r1", "r2"]),
                ),
            )
        )
        if rng.random() < 0.5:
            suite = rng.choice(["CURRENT", "HISTORICAL"])
            out.append(
                ("eval-results", f.eval_result(f"v{n}", t0, rng.random() < 0.8, loop, suite=suite))
            )
    return out


def _week(ts: datetime) -> str:
    year, week, _ = ts.isocalendar()
    return f"{year}-W{week:02d}"


def _reference(records: list[tuple[str, dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The scorecard recomputed straight from the records with numpy."""
    first_input: dict[str, datetime] = {}
    for topic, r in records:
        if topic == "inputs":
            first_input[r["case_id"]] = min(first_input.get(r["case_id"], r["ts"]), r["ts"])
    res: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    verdicts: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
    for topic, r in records:
        key = (r["loop"], _week(r["ts"]))
        if topic == "resolutions":
            res[key].append(r)
            if r["eval_passed"] is not None:
                verdicts[key].append(("CURRENT", r["eval_passed"]))
        elif topic == "eval-results":
            verdicts[key].append((r["suite"], r["passed"]))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key in set(res) | set(verdicts):
        rows, vs = res.get(key, []), verdicts.get(key, [])
        lat = np.array(
            [
                max((r["ts"] - first_input[r["case_id"]]).total_seconds(), 0.0)
                for r in rows
                if r["case_id"] in first_input
            ]
        )
        cost = sum(
            r["model_cost_usd"]
            + r["other_cost_usd"]
            + r["human_minutes"] / 60 * RATES.get(r["loop"], 0.0)
            for r in rows
        )
        quantiles = [float(np.quantile(lat, q)) if len(lat) else None for q in (0.5, 0.9, 0.99)]
        out[key] = {
            "resolved": len(rows),
            "coverage": ratio(sum(r["resolver"] == "SYSTEM" for r in rows), len(rows)),
            "assisted": ratio(sum(r["resolver"] == "HYBRID" for r in rows), len(rows)),
            "quality_all": ratio(sum(p for _, p in vs), len(vs)),
            "quality_current": ratio(
                sum(p for s, p in vs if s == "CURRENT"), sum(s == "CURRENT" for s, _ in vs)
            ),
            "quality_historical": ratio(
                sum(p for s, p in vs if s == "HISTORICAL"), sum(s == "HISTORICAL" for s, _ in vs)
            ),
            "latency_p50_seconds": quantiles[0],
            "latency_p90_seconds": quantiles[1],
            "latency_p99_seconds": quantiles[2],
            "cost_per_resolution_usd": cost / len(rows) if rows else None,
            "toil_hours": sum(r["human_minutes"] for r in rows) / 60,
        }
    return out


def test_weekly_scorecard_equals_a_reference_recomputation(tmp_path: Path) -> None:
    records = _two_weeks(seed=3)
    archive = make_archive(tmp_path / "a.duckdb", RATES)
    _write(archive, records)
    reference = _reference(records)
    with archive.connect(read_only=True) as con:
        cursor = con.execute("SELECT * FROM v_weekly_scorecard ORDER BY loop, week")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    assert (
        {(r["loop"], r["week"]) for r in rows}
        == set(reference)
        == {
            (loop, week)
            for loop in ("refunds", "support-triage")
            for week in ("2026-W46", "2026-W47")
        }
    )
    for row in rows:
        expected = reference[(row["loop"], row["week"])]
        assert row["resolved"] == expected["resolved"]
        for name in (
            "coverage",
            "assisted",
            "quality_all",
            "quality_current",
            "quality_historical",
        ):
            assert row[name] == expected[name], name  # the same division: exact
        for name in (
            "latency_p50_seconds",
            "latency_p90_seconds",
            "latency_p99_seconds",
            "cost_per_resolution_usd",
            "toil_hours",
        ):
            assert row[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
        previous = reference.get((row["loop"], "2026-W46")) if row["week"] == "2026-W47" else None
        for name, direction in SCORECARD_NUMBERS:
            if previous is None or previous[name] is None or expected[name] is None:
                assert row[f"{name}_wow_delta"] is None
                continue
            change = expected[name] - previous[name]
            assert row[f"{name}_wow_delta"] == pytest.approx(change, rel=1e-9, abs=1e-12)
            if direction:
                assert row[f"{name}_improved"] == (
                    None if change == 0 else (change * direction > 0)
                )


def test_release_quality_alert_episodes_and_candidate_funnel(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.duckdb")
    _write(
        archive,
        [
            ("eval-results", f.eval_result("v1", f.at(0), True, release="r9")),
            (
                "eval-results",
                f.eval_result("v2", f.at(0), False, release="r9", eval_case_id="ec-v1"),
            ),
            ("eval-results", f.eval_result("v3", f.at(1), True, release="r9", suite="HISTORICAL")),
            ("resolutions", f.resolution("r1", "c1", f.at(1), release="r9", eval_passed=True)),
            ("alerts", f.alert("FIRING", f.at(2), f.at(2))),
            ("alerts", f.alert("RESOLVED", f.at(2, 900), f.at(2), value=0.85)),
            ("alerts", f.alert("FIRING", f.at(3), f.at(3))),  # a second episode, still firing
            ("eval-candidates", f.candidate("k1", f.at(0))),
            ("eval-candidates", f.candidate("k2", f.at(0))),
            ("eval-candidates", f.candidate("k3", f.at(1))),
            ("eval-candidates", f.candidate("k4", f.at(8))),  # next week
            ("reviews", f.review("k1", "ACCEPTED", f.at(1), eval_case_id="e-k1")),
            ("reviews", f.review("k2", "REJECTED", f.at(1))),
            ("eval-cases", f.eval_case("e-k1", f.at(1), origin="REVIEWED")),
        ],
    )
    assert fetch(
        archive,
        "SELECT suite, verdicts, cases, passed, failed, pass_rate "
        "FROM v_release_quality WHERE release = 'r9' ORDER BY suite",
    ) == [
        ("current", 3, 2, 2, 1, 2 / 3),  # v1 and v2 judge one eval case; r1 is an online verdict
        ("historical", 1, 1, 1, 0, 1.0),
    ]
    assert fetch(
        archive,
        "SELECT started_at, resolved_at, still_firing, duration_seconds, "
        "value_at_firing, value_at_resolve FROM v_alert_episodes ORDER BY 1",
    ) == [
        (f.at(2), f.at(2, 900), False, 900.0, 0.7, 0.85),
        (f.at(3), None, True, None, 0.7, None),
    ]
    assert fetch(
        archive,
        "SELECT week, candidates, reviewed, accepted, rejected, eval_cases, "
        "reviewed_ratio, acceptance_ratio FROM v_candidate_funnel ORDER BY week",
    ) == [
        ("2026-W47", 3, 2, 1, 1, 1, 2 / 3, 0.5),
        ("2026-W48", 1, 0, 0, 0, 0, 0.0, None),
    ]


def _verdicts(
    release: str, suite: str, cases: int, failing: int
) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            "eval-results",
            f.eval_result(
                f"{release}-{suite}-{i}", f.at(0, i), i >= failing, release=release, suite=suite
            ),
        )
        for i in range(cases)
    ]


@pytest.mark.parametrize(
    ("release", "code", "says"),
    [
        ("good", 0, "PASS"),  # 29/30 and 24/25
        ("bad", 1, "FAIL"),  # CURRENT 21/30 = 70 %
        ("thin", 2, "INSUFFICIENT EVIDENCE"),  # HISTORICAL has 5 cases
        ("unknown", 2, "INSUFFICIENT EVIDENCE"),
    ],
)
def test_the_release_gate_exit_codes(tmp_path: Path, release: str, code: int, says: str) -> None:
    archive = make_archive(tmp_path / "a.duckdb")
    _write(
        archive,
        [
            *_verdicts("good", "CURRENT", 30, 1),
            *_verdicts("good", "HISTORICAL", 25, 1),
            *_verdicts("bad", "CURRENT", 30, 9),
            *_verdicts("bad", "HISTORICAL", 25, 0),
            *_verdicts("thin", "CURRENT", 30, 0),
            *_verdicts("thin", "HISTORICAL", 5, 0),
        ],
    )
    result = CliRunner().invoke(
        main,
        [
            "gate",
            "--loop",
            "refunds",
            "--release",
            release,
            "--min-pass-rate",
            "0.9",
            "--min-cases",
            "20",
            "--db",
            str(archive.path),
        ],
    )
    assert result.exit_code == code, result.output
    assert result.output.startswith(f"{says}: release {release} of loop refunds")
    if release == "bad":
        assert "current: pass rate 70.0% (21/30) is below 90.0%" in result.output
    if release == "thin":
        assert "historical: 5 cases, need 20" in result.output
    if release == "unknown":  # a misspelt release is named as one, with the releases there are
        assert result.output.endswith(  # their last verdicts are at one time: by name
            "  loop refunds has no eval verdicts of release 'unknown'; its releases, newest "
            "first: bad, good, thin\n"
        )


def test_the_gate_names_the_loops_or_releases_it_knows_when_it_knows_none_asked(
    tmp_path: Path,
) -> None:
    archive = make_archive(tmp_path / "a.duckdb")
    _write(
        archive,
        [
            ("eval-results", f.eval_result("e1", f.at(1), True, release="r1")),
            ("eval-results", f.eval_result("e2", f.at(2), True, release="r2")),
            ("eval-results", f.eval_result("e3", f.at(0), False, release="r9", loop="kyc")),
        ],
    )
    assert fetch(archive, KNOWN_QUERY) == [("kyc", "r9"), ("refunds", "r2"), ("refunds", "r1")]
    known = [("kyc", "r2"), ("kyc", "r1"), ("refunds", "r9")]
    assert unknown_hint("kyc", "r1", known) is None
    assert unknown_hint("refund", "r9", known) == (
        "the archive has no eval verdicts of loop 'refund'; loops: kyc, refunds"
    )
    assert unknown_hint("kyc", "r3", known) == (
        "loop kyc has no eval verdicts of release 'r3'; its releases, newest first: r2, r1"
    )
    assert unknown_hint("kyc", "r1", []) == (
        "the archive has no eval verdicts of loop 'kyc'; it has none of any"
    )
    many = [("kyc", f"r{i:02d}") for i in range(25)]
    assert unknown_hint("kyc", "x", many) == (
        "loop kyc has no eval verdicts of release 'x'; its releases, newest first: "
        "r00, r01, r02, r03, r04, r05, r06, r07, r08, r09 and 15 more"
    )


def test_the_gate_and_the_report_take_loop_as_commands_run_from_a_shell(tmp_path: Path) -> None:
    """As installed commands, not through CliRunner: faust reads --loop out of sys.argv when it
    is imported (its event-loop option), which made `loopline gate --loop refunds` fail."""
    archive = make_archive(tmp_path / "a.duckdb")
    _write(archive, [*_verdicts("good", "CURRENT", 30, 1), *_verdicts("good", "HISTORICAL", 25, 1)])
    cli = [sys.executable, "-m", "pipeline.cli"]
    gate = subprocess.run(
        [*cli, "gate", "--loop", "refunds", "--release", "good", "--db", str(archive.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gate.returncode == 0, gate.stderr
    assert gate.stdout.startswith("PASS: release good of loop refunds")
    report = tmp_path / "week.html"
    week = f.at(0, 0).strftime("%G-W%V")
    options = ["--week", week, "--loop", "refunds", "-o", str(report), "--db", str(archive.path)]
    written = subprocess.run(
        [*cli, "report", *options],
        capture_output=True,
        text=True,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    assert "refunds" in report.read_text()
