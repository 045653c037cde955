"""The review page's login on the real broker: failed logins per address are bounded."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from urllib.parse import urlencode

import pytest

from pipeline.review.web import FAILED_LOGINS
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.review.conftest import ReviewProcess

pytestmark = pytest.mark.broker
TOKEN = "s3cret-review-token"


def _log_in(review: ReviewProcess, token: str) -> http.client.HTTPResponse:
    """POST the login form as a browser does; the response as it came (no redirect followed)."""
    connection = http.client.HTTPConnection("127.0.0.1", review.settings.review_port, timeout=10)
    body = urlencode({"reviewer": "ana", "token": token})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    connection.request("POST", "/login", body, headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_failed_logins_from_an_address_are_bounded_then_every_login_waits(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
) -> None:
    """The token is all a login asks for: guessing it was unbounded. Ten failures in ten
    minutes from an address make every login from it wait (429, Retry-After) until the oldest
    leaves the window, the right token too; a login that succeeds clears the count."""
    assert (FAILED_LOGINS.amount, FAILED_LOGINS.get_expiry()) == (10, 600)
    review = start_review(make_settings(review_token=TOKEN, review_port=free_port()))
    first = _log_in(review, "guess")
    assert first.status == 401
    # every response keeps the page out of other sites' frames (a click there would decide)
    assert first.headers["X-Frame-Options"] == "DENY"
    assert first.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert first.headers["X-Content-Type-Options"] == "nosniff"
    assert [_log_in(review, "guess").status for _ in range(8)] == [401] * 8
    assert _log_in(review, TOKEN).status == 303  # the tenth attempt: in, and the count cleared
    assert [_log_in(review, "guess").status for _ in range(10)] == [401] * 10
    refused = _log_in(review, TOKEN)
    assert refused.status == 429
    wait = int(refused.headers["Retry-After"])
    assert 590 <= wait <= 601, wait  # the oldest of the ten failures leaves the window then
    assert _log_in(review, "guess").status == 429  # not counted: the window stays
    log = review.log()
    assert "a failed login from 127.0.0.1 (9 more before it must wait)" in log
    assert "a failed login from 127.0.0.1 (0 more before it must wait)" in log
    assert log.count("a failed login from") == 19  # the refused ones are not logged
    assert TOKEN not in log
