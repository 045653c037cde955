"""``loopline review``: the reviewers' page (Starlette), a thin edge over ReviewQueue.

Login with a name and the token from LOOPLINE_REVIEW_TOKEN; the session is a signed cookie
(itsdangerous, through Starlette's SessionMiddleware) holding the reviewer and a CSRF token that
every form posts back. Opening a candidate claims it for LOOPLINE_REVIEW_CLAIM_SECONDS; the
queue hides it from everyone else meanwhile.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiokafka.errors import KafkaError
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.publisher import NotDelivered
from pipeline.review.feed import DecisionUnconfirmed, ReviewFeed
from pipeline.review.metrics import review_registry
from pipeline.review.queue import REVIEW_TEXT_CHARS, Filters, ReviewError, ReviewQueue
from pipeline.settings import Settings

log = logging.getLogger(__name__)
PAGE_SIZE = 50
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
Handler = Callable[[Request], Awaitable[Response]]
#: Failed logins an address may make in a moving window before every login from it is refused
#: (429) until the oldest of them leaves the window: the token is all a login asks for, so
#: guessing it is bounded to this rate. A login that succeeds clears the address's count.
FAILED_LOGINS: RateLimitItem = parse("10 per 10 minutes")


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_review_app(settings: Settings) -> Starlette:
    if not settings.review_token:
        raise ValueError("LOOPLINE_REVIEW_TOKEN is not set: the review page needs a login token")
    token: str = settings.review_token
    queue = ReviewQueue(claim_ms=int(settings.review_claim_seconds * 1000))
    follow = ReviewFeed(settings, queue)
    registry = review_registry(queue)
    failed_logins = MovingWindowRateLimiter(MemoryStorage())

    def reviewer_of(request: Request) -> str | None:
        name = request.session.get("reviewer")
        return str(name) if name else None

    def login_required(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if reviewer_of(request) is None:
                if request.method != "GET":
                    return PlainTextResponse("log in first", status_code=403)
                return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", 303)
            return await handler(request)

        return guarded

    def csrf_ok(request: Request, form: Any) -> bool:
        expected = str(request.session.get("csrf", ""))
        return bool(expected) and hmac.compare_digest(expected, str(form.get("csrf", "")))

    async def login_page(request: Request) -> Response:
        if request.method == "GET":
            return TEMPLATES.TemplateResponse(request, "login.html", {"error": None})
        address = request.client.host if request.client else "unknown"
        if not failed_logins.test(FAILED_LOGINS, address):
            return _login_refused(request, failed_logins, address)
        form = await request.form()
        name = str(form.get("reviewer", "")).strip()
        given = str(form.get("token", ""))
        if not name or not hmac.compare_digest(given.encode(), token.encode()):
            failed_logins.hit(FAILED_LOGINS, address)
            left = failed_logins.get_window_stats(FAILED_LOGINS, address).remaining
            log.warning("a failed login from %s (%d more before it must wait)", address, left)
            context = {"error": "Unknown token, or no name given."}
            return TEMPLATES.TemplateResponse(request, "login.html", context, status_code=401)
        failed_logins.clear(FAILED_LOGINS, address)
        request.session.clear()
        request.session.update({"reviewer": name[:80], "csrf": secrets.token_urlsafe(24)})
        target = str(request.query_params.get("next", "/"))
        local = target.startswith("/") and not target.startswith(("//", "/\\"))
        return RedirectResponse(target if local else "/", 303)  # never off-site

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", 303)

    @login_required
    async def queue_page(request: Request) -> Response:
        params = request.query_params
        filters = Filters(params.get("loop"), params.get("reason"), params.get("category"))
        reviewer = reviewer_of(request) or ""
        pending = queue.pending(filters, reviewer, _now_ms())
        page = max(int(params.get("page", "1") or 1), 1)
        shown = pending[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        context = {
            "reviewer": reviewer,
            "rows": shown,
            "total": len(pending),
            "page": page,
            "pages": max((len(pending) + PAGE_SIZE - 1) // PAGE_SIZE, 1),
            "filters": filters,
            "facets": queue.facets(),
            "ready": follow.ready.is_set(),
            "query": {k: v for k, v in params.items() if k != "page" and v},
        }
        return TEMPLATES.TemplateResponse(request, "queue.html", context)

    @login_required
    async def candidate_page(request: Request) -> Response:
        candidate_id = request.path_params["candidate_id"]
        reviewer = reviewer_of(request) or ""
        try:
            claim = queue.claim(candidate_id, reviewer, _now_ms())
        except ReviewError as exc:
            return TEMPLATES.TemplateResponse(
                request, "message.html", {"message": str(exc)}, status_code=409
            )
        candidate = queue.candidates[candidate_id]
        context = {
            "reviewer": reviewer,
            "c": candidate,
            "claim_until": time.strftime("%H:%M:%S", time.gmtime(claim.expires_ms / 1000)),
            "similar": queue.similar(candidate),
            "csrf": request.session.get("csrf"),
            "error": request.query_params.get("error"),
            "text_chars": REVIEW_TEXT_CHARS,
        }
        return TEMPLATES.TemplateResponse(request, "candidate.html", context)

    @login_required
    async def decide(request: Request) -> Response:
        candidate_id = request.path_params["candidate_id"]
        form = await request.form()
        if not csrf_ok(request, form):
            return PlainTextResponse("bad or missing CSRF token", status_code=403)
        reviewer = reviewer_of(request) or ""
        try:
            decision, eval_case = queue.decide(
                candidate_id,
                reviewer,
                str(form.get("decision", "")),
                _now_ms(),
                expected=str(form.get("expected", "")) or None,
                suite=str(form.get("suite", "")) or None,
                duplicate_of=str(form.get("duplicate_of", "")) or None,
                notes=str(form.get("notes", "")).strip() or None,
            )
        except ReviewError as exc:
            return _back_to(candidate_id, str(exc))
        try:
            await follow.publish_decision(decision, eval_case)
        except DecisionUnconfirmed as exc:  # still being sent: its page says so until it ends
            log.warning("a decision on %s is not confirmed yet: %s", candidate_id, exc)
            return RedirectResponse(f"/candidates/{candidate_id}", 303)
        except (KafkaError, NotDelivered) as exc:  # the queue is as it was: the claim holds
            log.warning("a decision on %s was not saved: %s", candidate_id, exc)
            return _back_to(
                candidate_id, f"not saved: Kafka did not confirm the decision ({exc}); try again"
            )
        following = queue.pending(Filters(), reviewer, _now_ms())
        target = f"/candidates/{following[0]['candidate_id']}" if following else "/"
        return RedirectResponse(target, 303)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok" if follow.ready.is_set() else "loading", status_code=200)

    async def readyz(request: Request) -> Response:
        """503 until the queue was read up to the topics' end: a page behind a load balancer
        gets reviewers only once it shows every open candidate."""
        ready = follow.ready.is_set()
        return PlainTextResponse("ready" if ready else "loading", status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        """For Prometheus, without a login: counts per loop, no candidate's content."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await follow.start()
        try:
            yield
        finally:
            await follow.stop()

    secret = settings.review_secret or secrets.token_urlsafe(32)
    return Starlette(
        routes=[
            Route("/", queue_page),
            Route("/login", login_page, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/candidates/{candidate_id}", candidate_page),
            Route("/candidates/{candidate_id}/decide", decide, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(SessionMiddleware, secret_key=secret, same_site="strict", max_age=12 * 3600),
        ],
        lifespan=lifespan,
    )


#: On every response: no other site may show the page in a frame (where a reviewer's click
#: would decide a candidate for it), and no response is read as another type than it says.
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to each HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _back_to(candidate_id: str, error: str) -> Response:
    """The candidate's page again, saying why the decision was not taken."""
    return RedirectResponse(f"/candidates/{candidate_id}?{urlencode({'error': error})}", 303)


def _login_refused(
    request: Request, failed_logins: MovingWindowRateLimiter, address: str
) -> Response:
    """429, with when the address may try again (its oldest failure leaves the window). Not
    logged: the failures that led here were, and a client hammering on would flood the log."""
    reset = failed_logins.get_window_stats(FAILED_LOGINS, address).reset_time
    wait = max(int(reset - time.time()) + 1, 1)
    error = f"Too many failed logins from this address: try again in {wait} s."
    response = TEMPLATES.TemplateResponse(request, "login.html", {"error": error}, 429)
    response.headers["Retry-After"] = str(wait)
    return response
