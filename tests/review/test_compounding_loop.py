"""The whole loop on the real broker, worker never restarted: a failing production case becomes
a candidate, a reviewer accepts it in the page, it becomes an eval case, and the loop's
uncovered_ratio and drift score move at the next evaluation."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from pipeline.candidates import CandidateConfig, shown_input
from pipeline.codec import Codec
from pipeline.generator import LOOPS, Scenario, TrafficGenerator, eval_set
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from tests.agents.test_drift_live import _gauge
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, free_port, read_topic, wait_for
from tests.review.conftest import ReviewProcess
from tests.review.test_review_page import TOKEN, _login

pytestmark = pytest.mark.broker
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
REFUNDS = (LOOPS[1],)


def test_a_failing_case_becomes_an_eval_case_and_moves_the_baseline(
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    start_review: Callable[[Settings], ReviewProcess],
    tmp_path: Path,
) -> None:
    assert CHROMIUM, "Debian's chromium is needed (make test installs it)"
    rules = tmp_path / "rules.toml"
    rules.write_text("[candidates]\nsample_rates = { novel_category = 1.0 }\n")
    settings = make_settings(rules=rules, review_token=TOKEN, review_port=free_port())
    worker = start_worker(settings)
    began = time.monotonic()
    baseline = [("eval-cases", r) for r in eval_set(1, START, 300, loops=REFUNDS)]
    asyncio.run(_publish(settings, baseline))
    # Production traffic that drifted: chargebacks, a category no eval case covers.
    traffic = list(islice(TrafficGenerator(8, START, 5.0, Scenario(drift_at=0), REFUNDS), 1500))
    expected = asyncio.run(_publish(settings, traffic))
    wait_for(
        lambda: all(worker.processed(t) >= expected[t] for t in SOURCE_TOPICS if t != "eval-cases"),
        120,
        f"the traffic processed (log {worker.log_path})",
    )

    def chargebacks() -> list[dict[str, object]]:
        return [
            r
            for _, r in asyncio.run(read_topic(settings, "eval-candidates"))
            if r["category"] == "chargeback" and "novel_category" in r["reasons"]  # type: ignore[operator]
        ]

    wait_for(lambda: bool(chargebacks()), 60, "a chargeback candidate")
    picked = chargebacks()[0]
    # Its input as the worker's case kept it (the message as it came) and stage 2 read it:
    # the fields of the input published for the case, redacted as candidates are.
    codec = Codec.load()
    published = next(r for t, r in traffic if t == "inputs" and r["case_id"] == picked["case_id"])
    shown = shown_input(codec.decode(codec.encode("InputEvent", published)).record)
    for name in ("channel", "category", "language", "tokens", "features", "attributes"):
        assert picked[name] == shown[name], name
    assert picked["embedding"] == pytest.approx(shown["embedding"], rel=1e-6)
    assert picked["input_text"] == CandidateConfig().redactor()(shown["text"])
    assert worker.metric("loopline_eval_candidates_total", reason="novel_category") > 0
    window = {"loop": "refunds", "window": "1h"}
    js = {"loop": "refunds", "feature": "category", "method": "js"}
    wait_for(
        lambda: (
            (_gauge(worker, "loopline_uncovered_input_ratio", **window) or 0) > 0.3
            and _gauge(worker, "loopline_drift_score", **js) is not None
        ),
        30,
        "the snapshot with the drifted traffic",
    )
    score = _gauge(worker, "loopline_drift_score", **js)
    assert score is not None

    review = start_review(settings)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        _login(page, review.url, "ana")
        page.goto(f"{review.url}/candidates/{picked['candidate_id']}")
        expect(page.locator("#input-text")).to_be_visible()
        page.fill("#expected", "ESCALATED to payments")
        page.click("#accept")
        page.wait_for_url(lambda u: picked["candidate_id"] not in u)  # type: ignore[operator]
        browser.close()

    def moved() -> bool:
        now = _gauge(worker, "loopline_uncovered_input_ratio", **window)
        return now == 0.0 and _gauge(worker, "loopline_drift_score", **js) != score

    wait_for(moved, 60, "uncovered_ratio and the drift score to move")
    assert not worker.exited()
    cases = [r for _, r in asyncio.run(read_topic(settings, "eval-cases"))]
    assert [c["origin"] for c in cases].count("REVIEWED") == 1
    took = time.monotonic() - began
    print(f"failing case -> candidate -> review -> eval case -> baseline: {took:.1f}s")
