"""The provisioned Grafana dashboard: valid JSON, one datasource, every query valid PromQL
(promtool parses it) over metric names that loopline really exports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.test_prometheus import METRIC, PROMTOOL, ROOT, exported_names

GRAFANA = ROOT / "deploy" / "grafana"


def _dashboard() -> dict[str, Any]:
    data = json.loads((GRAFANA / "dashboards" / "loopline.json").read_text())
    assert isinstance(data, dict)
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_the_dashboard_covers_the_numbers_drift_alerts_candidates_dlq_and_lag() -> None:
    dashboard = _dashboard()
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}
    used = {name for expr in _exprs(dashboard) for name in METRIC.findall(expr)}
    assert used <= exported_names(), used - exported_names()
    for needed in (
        "loopline_coverage_ratio",
        "loopline_eval_pass_rate",
        "loopline_resolution_latency_seconds_bucket",
        "loopline_cost_per_resolution_usd",
        "loopline_toil_hours",
        "loopline_drift_score",
        "loopline_alerts_firing",
        "loopline_eval_candidates_total",
        "loopline_dead_letters_total",
        "loopline_consumer_lag_messages",
        "loopline_held_cases",
        "loopline_restore_remaining_records",
        "loopline_records_deleted_unread_total",
        "loopline_sink_consumer_lag_messages",
        "loopline_sink_batches_total",
        "loopline_review_open_candidates",
        "loopline_review_oldest_open_age_seconds",
    ):
        assert needed in used, needed
    assert any("offset 7d" in e for e in _exprs(dashboard))  # week-over-week change
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    assert PROMTOOL, "Debian's prometheus package (promtool) is needed; make test installs it"
    dashboard = _dashboard()
    rules = [
        {"record": f"check:expr{i}", "expr": e.replace("$loop", ".*")}
        for i, e in enumerate(_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
