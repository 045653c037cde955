"""The review page in a real browser (Debian's chromium through Playwright) on the real broker:
login, filters, claims, accept and reject, and the decisions on loopline.reviews and
loopline.eval-cases."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from pipeline.kafka_local import LocalBroker
from pipeline.publisher import Publisher
from pipeline.review.feed import DECISION_TIMEOUT_MS, DECISION_WAIT_SECONDS
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import free_port, read_topic
from tests.review.conftest import ReviewProcess
from tests.sinks.factories import candidate, eval_case

pytestmark = pytest.mark.broker
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TS = datetime(2026, 11, 25, 12, tzinfo=UTC)
TOKEN = "s3cret-review-token"


def _seed() -> list[dict[str, object]]:
    """1,000 queued candidates: 600 of refunds, 400 of kyc-review; the top two are known."""
    rng = random.Random(9)
    records = []
    for i in range(998):
        loop = "refunds" if i < 598 else "kyc-review"
        reasons = rng.sample(["failed_eval", "escalated", "low_confidence", "novel_category"], 2)
        records.append(
            candidate(
                f"k{i:04d}",
                TS + timedelta(seconds=i),
                loop=loop,
                priority=round(rng.uniform(0.1, 1.0), 3),
                reasons=reasons,
                category=rng.choice(["late", "damaged", "chargeback"]),
                input_text=f"request number {i} about an order",
            )
        )
    records.append(
        candidate(
            "k-top",
            TS,
            priority=5.0,
            reasons=["failed_eval", "novel_category"],
            category="chargeback",
            input_text="my bank charged me back for the parcel [EMAIL]",
            output="refund declined",
            features={"order_value_usd": 120.0},
            tokens=480,
        )
    )
    records.append(candidate("k-second", TS, priority=4.0, input_text="parcel came late"))
    return records


async def _publish(settings: Settings) -> None:
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        await publisher.publish_many("eval-candidates", _seed())
        await publisher.publish(
            "eval-cases", eval_case("imported-1", TS, category="chargeback", text="charged back")
        )


def _login(page: Page, url: str, name: str, token: str = TOKEN, then: str = "") -> None:
    page.goto(f"{url}/login" + (f"?next={then}" if then else ""))
    page.fill("input[name=reviewer]", name)
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def _seeded_page(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
    broker: LocalBroker,
) -> tuple[Settings, ReviewProcess]:
    """The seeded candidates on ``broker`` and a review page on them."""
    settings = make_settings(
        bootstrap_servers=broker.bootstrap, review_token=TOKEN, review_port=free_port()
    )
    asyncio.run(_publish(settings))
    return settings, start_review(settings)


def _browser(playwright: Playwright) -> Browser:
    assert CHROMIUM, "Debian's chromium is needed (make test installs it)"
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
    )


@contextmanager
def _logged_in(review: ReviewProcess, reviewer: str) -> Iterator[tuple[Browser, Page]]:
    """A browser, and a page of it logged in to ``review`` as ``reviewer``."""
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_context().new_page()
        _login(page, review.url, reviewer)
        yield browser, page


def test_reviewers_log_in_filter_claim_accept_and_reject(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
) -> None:
    settings = make_settings(review_token=TOKEN, review_port=free_port())
    asyncio.run(_publish(settings))
    review = start_review(settings)
    url = review.url
    with sync_playwright() as p:
        browser = _browser(p)
        ana = browser.new_context().new_page()
        # Without a login the page refuses: the queue redirects, a decision is forbidden.
        ana.goto(f"{url}/")
        assert ana.url.startswith(f"{url}/login")
        refused = ana.request.post(
            f"{url}/candidates/k-top/decide", form={"decision": "REJECTED", "csrf": "x"}
        )
        assert refused.status == 403
        _login(ana, url, "ana", token="wrong")
        expect(ana.get_by_role("alert")).to_contain_text("Unknown token")

        _login(ana, url, "ana", then="//example.com/phish")  # never redirected off-site
        assert ana.url == f"{url}/"
        expect(ana.locator("h1")).to_contain_text("1000 open")
        assert ana.locator("#queue tbody tr").count() == 50  # one page of 50
        ana.select_option("select[name=loop]", "refunds")
        expect(ana.locator("h1")).to_contain_text("600 open")
        assert set(ana.locator("#queue tbody tr td:nth-child(2)").all_inner_texts()) == {"refunds"}

        # The top row is k-top (priority 5): open it with the keyboard, accept it.
        ana.keyboard.press("o")
        expect(ana.locator("#input-text")).to_contain_text("charged me back")
        expect(ana.locator("body")).to_contain_text("imported-1")  # a similar eval case
        ana.fill("#expected", "ESCALATED to the payments team")
        ana.locator("body").click(position={"x": 5, "y": 5})
        ana.keyboard.press("a")
        # Accepting moves on to the next candidate, k-second: reject it with "r".
        expect(ana.locator("#input-text")).to_contain_text("parcel came late")
        ana.keyboard.press("r")
        # The page moves on once the rejection is confirmed: wait for that, not for the text
        # box, which k-second's page shows too (reading the URL early read k-second's).
        expect(ana).not_to_have_url(re.compile(r"/candidates/k-second$"))
        expect(ana.locator("#input-text")).to_be_visible()
        third = ana.url.rsplit("/", 1)[-1]  # ana holds the third candidate now

        # Another reviewer neither sees nor can open what ana holds.
        omar = browser.new_context().new_page()
        _login(omar, url, "omar")
        expect(omar.locator("h1")).to_contain_text("997 open")
        omar.goto(f"{url}/candidates/{third}")
        expect(omar.get_by_role("alert")).to_contain_text("being reviewed by ana")
        browser.close()

    reviews = [r for _, r in asyncio.run(read_topic(settings, "reviews"))]
    assert [(r["candidate_id"], r["decision"], r["reviewer"]) for r in reviews] == [
        ("k-top", "ACCEPTED", "ana"),
        ("k-second", "REJECTED", "ana"),
    ]
    assert reviews[0]["expected"] == "ESCALATED to the payments team"
    assert reviews[0]["suite"] == "CURRENT"
    cases = {r["eval_case_id"]: r for _, r in asyncio.run(read_topic(settings, "eval-cases"))}
    accepted = cases["reviewed-case-k-top"]
    assert (accepted["origin"], accepted["suite"], accepted["category"]) == (
        "REVIEWED",
        "CURRENT",
        "chargeback",
    )
    assert accepted["features"] == {"order_value_usd": 120.0} and accepted["tokens"] == 480


def test_a_decision_the_broker_cannot_take_is_refused_on_the_page_and_taken_once_back(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
    own_broker: LocalBroker,
) -> None:
    """With the broker away a decision used to end in "Internal Server Error" after 40 s and
    be lost. Now the reviewer is told on the candidate's page within DECISION_TIMEOUT_MS (the
    claim and the queue as they were), and the same decision, made again once the broker is
    back, is written once."""
    settings, review = _seeded_page(make_settings, start_review, own_broker)
    with _logged_in(review, "ana") as (browser, ana):
        ana.goto(f"{review.url}/candidates/k-second")
        expect(ana.locator("#input-text")).to_contain_text("parcel came late")
        own_broker.down()
        asked = time.monotonic()
        ana.keyboard.press("r")
        alert = ana.get_by_role("alert")
        expect(alert).to_contain_text("not saved: Kafka did not confirm", timeout=30_000)
        assert time.monotonic() - asked < DECISION_TIMEOUT_MS / 1000 + 10
        expect(alert).to_contain_text("try again")
        assert ana.url.startswith(f"{review.url}/candidates/k-second?error=")

        # up() runs its own event loop, which Playwright's thread already has
        restart = threading.Thread(target=own_broker.up, kwargs={"echo": lambda _: None})
        restart.start()
        restart.join()
        ana.goto(f"{review.url}/candidates/k-second")  # still ana's: her claim held
        expect(ana.locator("#input-text")).to_contain_text("parcel came late")
        ana.keyboard.press("r")
        expect(ana).not_to_have_url(re.compile(r"/candidates/k-second"), timeout=30_000)
        browser.close()
    reviews = [r for _, r in asyncio.run(read_topic(settings, "reviews"))]
    assert [(r["candidate_id"], r["decision"]) for r in reviews] == [("k-second", "REJECTED")]


def test_a_decision_kafka_does_not_confirm_is_held_then_written_once_or_said_lost_at_stop(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
    own_broker: LocalBroker,
) -> None:
    """Once the page has sent a decision, the broker's leaders are known, and aiokafka retries
    a later send for as long as the broker is away: a decision used to leave the reviewer's
    page loading until the broker came back, and stopping the page hung. Now the page says
    within DECISION_WAIT_SECONDS that the decision waits for Kafka and holds the candidate
    from everyone; once the broker is back it is written, once. A page stopped meanwhile stops
    within the same bound and says which decision was not saved."""
    settings, review = _seeded_page(make_settings, start_review, own_broker)
    with _logged_in(review, "ana") as (browser, ana):
        ana.goto(f"{review.url}/candidates/k-top")
        ana.keyboard.press("r")  # written: the producer knows the leaders from now on
        expect(ana).to_have_url(f"{review.url}/candidates/k-second")
        expect(ana.locator("#input-text")).to_contain_text("parcel came late")

        own_broker.down()
        asked = time.monotonic()
        ana.keyboard.press("r")
        alert = ana.get_by_role("alert")
        expect(alert).to_contain_text(
            "k-second was decided (REJECTED), and Kafka has not confirmed it yet",
            timeout=60_000,
        )
        assert time.monotonic() - asked < DECISION_WAIT_SECONDS + 10
        omar = browser.new_context().new_page()
        _login(omar, review.url, "omar")
        expect(omar.locator("h1")).to_contain_text("998 open")  # not k-top nor k-second
        omar.goto(f"{review.url}/candidates/k-second")
        expect(omar.get_by_role("alert")).to_contain_text("Kafka has not confirmed it yet")

        restart = threading.Thread(target=own_broker.up, kwargs={"echo": lambda _: None})
        restart.start()
        restart.join()
        deadline = time.monotonic() + 60
        while "Kafka confirmed the decision on k-second late" not in review.log():
            assert time.monotonic() < deadline, review.log_tail()
            time.sleep(0.5)
        omar.goto(f"{review.url}/candidates/k-second")
        expect(omar.get_by_role("alert")).to_contain_text("already decided (REJECTED)")

        own_broker.down()  # again, and the page is stopped before it comes back
        ana.goto(f"{review.url}/candidates/k0000")
        expect(ana.locator("#input-text")).to_contain_text("request number 0 ")
        ana.keyboard.press("r")
        expect(ana.get_by_role("alert")).to_contain_text(
            "k0000 was decided (REJECTED), and Kafka has not", timeout=60_000
        )
        browser.close()
    stopping = time.monotonic()
    review.stop()
    assert time.monotonic() - stopping < DECISION_WAIT_SECONDS + 10
    lost = r"before Kafka confirmed the decisions on k0000 \(.*\): they are not saved"
    assert re.search(lost, review.log())

    own_broker.up(echo=lambda _: None)
    reviews = [r for _, r in asyncio.run(read_topic(settings, "reviews"))]
    assert [(r["candidate_id"], r["decision"]) for r in reviews] == [
        ("k-top", "REJECTED"),
        ("k-second", "REJECTED"),
    ]
