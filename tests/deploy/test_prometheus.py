"""The shipped Prometheus config and rules: promtool checks and rule unit tests, runbook links,
metric names that loopline really exports, and a live Prometheus scraping a real worker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from pipeline.metrics import PipelineMetrics
from pipeline.promrules import render
from pipeline.review.metrics import review_registry
from pipeline.review.queue import ReviewQueue
from pipeline.rules import AlertRules
from pipeline.settings import Settings
from sinks.metrics import SinkMetrics
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS_BIN = shutil.which("prometheus")
METRIC = re.compile(r"\b(loopline_[a-z_]+)\b")


def exported_names() -> set[str]:
    """Every sample name a worker's, the archive sink's or the review page's /metrics can
    carry (families listed even when empty)."""
    sink = generate_latest(SinkMetrics("archive").registry).decode()
    review = generate_latest(review_registry(ReviewQueue())).decode()
    text = PipelineMetrics.create().exposition().decode() + sink + review
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_count", "_sum"))
            else:  # a counter's TYPE line already names it with _total
                names.add(name)
    return names


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_passes_the_config_and_the_rule_unit_tests() -> None:
    assert PROMTOOL, "Debian's prometheus package (promtool) is needed; make test installs it"
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "rules_test.yml"]):
        done = subprocess.run(
            [PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_has_a_runbook_page_and_only_exported_metrics() -> None:
    known = exported_names() | {"up"}
    tested = (PROMETHEUS / "rules_test.yml").read_text()
    for rule in _rules():
        url = rule["annotations"]["runbook_url"]
        page = ROOT / "docs" / "runbooks" / url.rsplit("/", 1)[-1]
        assert url.endswith(f"/docs/runbooks/{page.name}") and page.exists(), url
        for name in METRIC.findall(rule["expr"]):
            assert name in known, (rule["alert"], name)
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no promtool test"


def _minutes(ms: int) -> str | None:
    return None if ms == 0 else f"{ms // 60_000}m"


def test_the_prometheus_rules_use_loopline_s_default_thresholds() -> None:
    """deploy/prometheus/rules.yml restates the defaults of pipeline/rules.py in PromQL; this
    fails when one side changes without the other."""
    alerts = AlertRules.default()
    rules = alerts.for_loop("any")
    range_of = {"5m": "5m", "1h": "1h", "24h": "1d", "7d": "7d"}
    quality = rules.quality_floor
    assert quality.current == quality.historical and quality.all is None  # one floor in PromQL
    drift_for = rules.drift.consecutive * alerts.evaluation_interval_ms
    expected: dict[str, tuple[list[str], str | None]] = {
        "LooplineQualityFloor": (
            [
                f") < {quality.current:g}",
                f"[{range_of[quality.window]}]",
                f">= {quality.min_samples}",
            ],
            _minutes(quality.for_ms),
        ),
        "LooplineLatencySLO": (
            [
                f"> {rules.latency_slo.p99_seconds:g}",
                f"[{range_of[rules.latency_slo.window]}]",
                f">= {rules.latency_slo.min_samples}",
            ],
            _minutes(rules.latency_slo.for_ms),
        ),
        "LooplineCostBudget": (
            [
                f"> {rules.cost_budget.max_usd:g}",
                f'window="{rules.cost_budget.window}"',
                f">= {rules.cost_budget.min_samples}",
            ],
            _minutes(rules.cost_budget.for_ms),
        ),
        "LooplineCoverageDrop": (
            [
                f"> {rules.coverage_drop.max_drop:g}",
                f"[{range_of[rules.coverage_drop.window]}] offset 7d",
                f">= {rules.coverage_drop.min_samples}",
            ],
            _minutes(rules.coverage_drop.for_ms),
        ),
        "LooplineToilRise": (
            [f"- 1 > {rules.toil_rise.max_rise:g}", f'window="{rules.toil_rise.window}"'],
            _minutes(rules.toil_rise.for_ms),
        ),
        "LooplineDrift": (["== 1"], _minutes(drift_for)),
        "LooplineUnresolved": ([f"> {rules.unresolved.max_cases}"], _minutes(0)),
        "LooplineDeadLetters": (
            [
                f"> {rules.dead_letter_rate.max_ratio:g}",
                f"[{range_of[rules.dead_letter_rate.window]}]",
                f">= {rules.dead_letter_rate.min_samples}",
            ],
            _minutes(rules.dead_letter_rate.for_ms),
        ),
    }
    shipped = {rule["alert"]: rule for rule in _rules()}
    for name, (fragments, for_) in expected.items():
        rule = shipped[name]
        for fragment in fragments:
            assert fragment in rule["expr"], (name, fragment, rule["expr"])
        assert rule.get("for") == for_, (name, rule.get("for"), for_)


def test_the_shipped_rules_are_the_rendering_of_the_default_rules() -> None:
    shipped = (PROMETHEUS / "rules.yml").read_text()
    assert shipped == render(AlertRules.default()), (
        "regenerate: loopline rules prometheus -o deploy/prometheus/rules.yml"
    )


OVERRIDES = """
[defaults.quality_floor]
historical = 0.7
[loops.refunds.cost_budget]
max_usd = 2.5
[loops.billing.cost_budget]
max_usd = 2.5
[loops.billing.drift]
enabled = false
"""


def test_loops_with_their_own_values_get_alerts_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(OVERRIDES)
    env = {**os.environ, "LOOPLINE_RULES": str(path)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "rules", "prometheus"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stdout == render(AlertRules.load(path), f"LOOPLINE_RULES={path}")
    rendered = tmp_path / "rules.yml"
    rendered.write_text(done.stdout)
    assert PROMTOOL, "Debian's prometheus package (promtool) is needed; make test installs it"
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(rendered)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr

    groups = yaml.safe_load(done.stdout)["groups"]
    alerts: dict[str, list[dict[str, Any]]] = {}
    for rule in groups[0]["rules"]:
        alerts.setdefault(rule["alert"], []).append(rule)
    cost = alerts["LooplineCostBudget"]
    gauge = "max by (loop) (loopline_cost_per_resolution_usd"
    assert [c["expr"].split("\n")[0] for c in cost] == [
        f'{gauge}{{window="1h",loop!~"billing|refunds"}}) > 1',
        f'{gauge}{{window="1h",loop=~"billing|refunds"}}) > 2.5',
    ]
    assert [c["labels"] for c in cost] == [
        {"severity": "warning"},
        {"severity": "warning", "rule_scope": "billing|refunds"},
    ]
    quality = alerts["LooplineQualityFloor"]
    assert [(q["labels"]["suite"], q["expr"].split("\n")[3]) for q in quality] == [
        ("current", ") < 0.8"),
        ("historical", ") < 0.7"),
    ]
    assert 'suite="historical"' in quality[1]["expr"]
    # billing's drift alert is off: only the defaults' one, which leaves billing out.
    assert [d["expr"] for d in alerts["LooplineDrift"]] == [
        'max by (loop) (loopline_drift_detected{loop!~"billing"}) == 1'
    ]


def _api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.broker
def test_a_live_prometheus_scrapes_a_worker_and_raises_an_alert(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    assert PROMETHEUS_BIN, "Debian's prometheus package is needed; make test installs it"
    settings = make_settings()
    # A case whose input is 90 minutes older than the newest event and that has no resolution:
    # unresolved past the 1 h SLA, so LooplineUnresolved fires (it has no `for`).
    start = datetime(2026, 11, 25, 9, tzinfo=UTC)
    events = [
        (
            "inputs",
            {
                "event_id": f"e{i}",
                "case_id": f"c{i}",
                "loop": "refunds",
                "source": "t",
                "ts": start + timedelta(minutes=90 * i),
            },
        )
        for i in range(2)
    ]
    asyncio.run(_publish(settings, events))
    worker = start_worker(settings)
    wait_for(
        lambda: worker.metric("loopline_unresolved_cases", loop="refunds") == 1,
        60,
        "the worker's unresolved count",
    )

    # The shipped config and rules, with the worker as the static target instead of DNS.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{settings.web_port}"]}]
    job["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS / "rules.yml")]
    config.pop("alerting")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={path}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def scraped() -> bool:
            try:
                found = _api(
                    url, "/api/v1/query", query='loopline_unresolved_cases{loop="refunds"}'
                )
            except OSError:
                return False
            return bool(found["result"]) and found["result"][0]["value"][1] == "1"

        wait_for(scraped, 60, f"Prometheus to scrape the worker ({tmp_path / 'prometheus.log'})")
        up = _api(url, "/api/v1/query", query='up{job="loopline"}')["result"]
        assert [r["value"][1] for r in up] == ["1"]
        events_total = _api(url, "/api/v1/query", query="sum(loopline_events_total)")["result"]
        assert float(events_total[0]["value"][1]) == 2
        # The worker's consumer lag per partition it holds: all caught up here.
        lag = 'sum by (topic) (loopline_consumer_lag_messages{topic=~".*inputs"})'
        wait_for(lambda: bool(_api(url, "/api/v1/query", query=lag)["result"]), 30, "the lag")
        assert _api(url, "/api/v1/query", query=lag)["result"][0]["value"][1] == "0"

        def firing() -> list[dict[str, Any]]:
            alerts = _api(url, "/api/v1/alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "LooplineUnresolved"]

        wait_for(lambda: bool(firing()), 30, "LooplineUnresolved in Prometheus")
        [alert] = firing()
        assert alert["state"] == "firing" and alert["labels"]["loop"] == "refunds"
        assert alert["annotations"]["runbook_url"].endswith("/docs/runbooks/unresolved.md")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
