"""Runbooks: one page per alert, every alert's runbook URL points at its page, and every DuckDB
query a runbook tells an SRE to run works on the archive's schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.rules import AlertRules, LoopRules
from tests.sinks.test_store import make_archive

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
QUERY = re.compile(r'loopline query "([^"]+)"')


def _pages() -> list[Path]:
    return sorted(RUNBOOKS.glob("*.md"))


def test_every_alert_rule_links_to_its_own_page() -> None:
    rules = AlertRules.default()
    for rule in LoopRules.model_fields:
        url = rules.runbook(rule, None)
        assert url.endswith(f"/docs/runbooks/{rule}.md"), url
        page = RUNBOOKS / f"{rule}.md"
        assert page.exists(), page
        text = page.read_text()
        for section in (
            "## First checks",
            "## Likely causes",
            "## How to fix",
            "## How to silence",
        ):
            assert section in text, (page.name, section)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_the_runbook_queries_run_on_the_archive(page: Path, tmp_path: Path) -> None:
    queries = QUERY.findall(page.read_text())
    assert queries, f"{page.name} gives no DuckDB query"
    archive = make_archive(tmp_path / "a.duckdb")
    with archive.connect() as con:
        archive.ensure_schema(con)
        for sql in queries:
            con.execute(sql).fetchall()
