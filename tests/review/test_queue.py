"""The review queue: claims, decisions, duplicates, ordering and filters (no Kafka, no web)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.review.metrics import ReviewCollector
from pipeline.review.queue import REVIEW_TEXT_CHARS, Filters, ReviewError, ReviewQueue
from tests.sinks.factories import candidate, eval_case, review

TS = datetime(2026, 11, 25, 12, tzinfo=UTC)
MS = int(TS.timestamp() * 1000)


def _queue(*records: dict[str, object]) -> ReviewQueue:
    queue = ReviewQueue(claim_ms=60_000)
    for record in records:
        queue.add_candidate({**record, "ts": MS})
    return queue


def test_two_reviewers_never_hold_the_same_candidate() -> None:
    queue = _queue(candidate("k1", TS, priority=2.0), candidate("k2", TS, priority=1.0))
    queue.claim("k1", "ana", MS)
    assert [c["candidate_id"] for c in queue.pending(Filters(), "omar", MS)] == ["k2"]
    assert [c["candidate_id"] for c in queue.pending(Filters(), "ana", MS)] == ["k1", "k2"]
    with pytest.raises(ReviewError, match="being reviewed by ana"):
        queue.claim("k1", "omar", MS + 59_999)
    with pytest.raises(ReviewError, match="being reviewed by ana"):
        queue.decide("k1", "omar", "REJECTED", MS + 1)
    # The claim expires after claim_ms: then the candidate is open again.
    assert queue.claim("k1", "omar", MS + 60_000).reviewer == "omar"


def test_a_decided_candidate_never_comes_back_and_a_case_is_queued_once() -> None:
    queue = _queue(candidate("k1", TS), candidate("k2", TS))
    queue.add_candidate({**candidate("k1", TS), "ts": MS})  # delivered again
    assert len(queue.pending(Filters(), "ana", MS)) == 2
    decision, created = queue.decide("k1", "ana", "REJECTED", MS, notes="fine as is")
    assert created is None and decision["decision"] == "REJECTED" and decision["suite"] is None
    queue.add_decision(decision)
    queue.add_candidate({**candidate("k1", TS), "ts": MS})  # and again, after the decision
    assert [c["candidate_id"] for c in queue.pending(Filters(), "ana", MS)] == ["k2"]
    with pytest.raises(ReviewError, match="already decided"):
        queue.claim("k1", "omar", MS)


def test_a_decided_candidate_s_record_is_not_kept_whichever_topic_is_read_first() -> None:
    """A page runs for months: every candidate's record (input, output, embedding) was kept
    after its decision. Now only its id and decision stay, also when the decision is read
    before the candidate (the feed reads the topics side by side)."""
    queue = _queue(candidate("k1", TS))
    decision, _ = queue.decide("k1", "ana", "ACCEPTED", MS, expected="refund")
    queue.add_decision(decision)
    queue.add_decision({**review("k2", "REJECTED", TS), "ts": MS})  # before its candidate
    queue.add_candidate({**candidate("k2", TS), "ts": MS})
    queue.add_candidate({**candidate("k1", TS), "ts": MS})  # delivered again
    assert queue.candidates == {} and queue.queued_ms == {}
    assert queue.decided == {"k1": "ACCEPTED", "k2": "REJECTED"}
    assert queue.backlog() == {"refunds": (0, None)}
    with pytest.raises(ReviewError, match=r"^k2 was already decided \(REJECTED\)$"):
        queue.claim("k2", "omar", MS)


def test_accepting_makes_a_reviewed_eval_case_with_the_input_side() -> None:
    queue = _queue(
        candidate(
            "k1",
            TS,
            input_text="where is my parcel",
            channel="chat",
            features={"order_value_usd": 80.0},
            tokens=300,
        )
    )
    with pytest.raises(ReviewError, match="expected outcome"):
        queue.decide("k1", "ana", "ACCEPTED", MS)
    decision, created = queue.decide("k1", "ana", "ACCEPTED", MS, expected=" RESOLVED ")
    assert decision["expected"] == "RESOLVED" and decision["suite"] == "CURRENT"
    assert created is not None
    assert decision["eval_case_id"] == created["eval_case_id"] == "reviewed-case-k1"
    assert (created["origin"], created["suite"], created["expected"]) == (
        "REVIEWED",
        "CURRENT",
        "RESOLVED",
    )
    assert (created["text"], created["channel"], created["category"]) == (
        "where is my parcel",
        "chat",
        "late",
    )
    assert created["features"] == {"order_value_usd": 80.0} and created["tokens"] == 300


def test_duplicate_names_an_existing_eval_case_and_similar_ranks_by_category_then_words() -> None:
    queue = _queue(candidate("k1", TS, input_text="parcel late again"))
    for record in (
        eval_case("e-other", TS, category="damaged", text="parcel late again"),
        eval_case("e-close", TS, category="late", text="my parcel is late"),
        eval_case("e-far", TS, category="late", text="refund please"),
        eval_case("e-kyc", TS, loop="kyc-review", category="late", text="parcel late again"),
    ):
        queue.add_eval_case(record)
    similar = [e["eval_case_id"] for e in queue.similar(queue.candidates["k1"])]
    assert similar == ["e-close", "e-far", "e-other"]
    with pytest.raises(ReviewError, match="names the eval case"):
        queue.decide("k1", "ana", "DUPLICATE", MS, duplicate_of="nope")
    decision, created = queue.decide("k1", "ana", "DUPLICATE", MS, duplicate_of="e-close")
    assert created is None and decision["eval_case_id"] == "e-close"


def test_the_queue_is_ordered_by_priority_and_filtered() -> None:
    queue = _queue(
        candidate("low", TS, priority=0.5, loop="kyc-review", category="crypto"),
        candidate("high", TS, priority=1.5, reasons=["failed", "novel_category"]),
        candidate("mid", TS, priority=1.0),
    )
    assert [c["candidate_id"] for c in queue.pending(Filters(), "ana", MS)] == [
        "high",
        "mid",
        "low",
    ]
    assert [c["candidate_id"] for c in queue.pending(Filters(loop="kyc-review"), "a", MS)] == [
        "low"
    ]
    assert [c["candidate_id"] for c in queue.pending(Filters(reason="failed"), "a", MS)] == ["high"]
    assert [c["candidate_id"] for c in queue.pending(Filters(category="late"), "a", MS)] == [
        "high",
        "mid",
    ]
    assert queue.facets()["loop"] == ["kyc-review", "refunds"]


def test_a_decision_kafka_has_not_confirmed_holds_its_candidate_from_everyone() -> None:
    """The page's decision on k1 was sent and not confirmed yet (the broker away): nobody may
    open or decide k1 meanwhile, its own reviewer neither, or it would be written twice."""
    queue = _queue(
        candidate("k1", TS, loop="kyc-review", priority=2.0), candidate("k2", TS, priority=1.0)
    )
    decision, _ = queue.decide("k1", "ana", "REJECTED", MS)
    queue.hold_unconfirmed(decision)
    assert queue.facets()["loop"] == ["refunds"]  # the filters offer no loop of k1's alone
    for reviewer in ("ana", "omar"):
        assert [c["candidate_id"] for c in queue.pending(Filters(), reviewer, MS)] == ["k2"]
        with pytest.raises(ReviewError, match=r"k1 was decided \(REJECTED\), and Kafka has not"):
            queue.claim("k1", reviewer, MS + 120_000)  # past ana's claim too
    # Kafka confirmed it: decided for good.
    queue.add_decision(decision)
    queue.release_unconfirmed("k1")
    with pytest.raises(ReviewError, match="already decided"):
        queue.claim("k1", "ana", MS)
    # Or it was not written: open again, to anyone once ana's claim has expired.
    queue.hold_unconfirmed(queue.decide("k2", "ana", "REJECTED", MS)[0])
    queue.release_unconfirmed("k2")
    assert [c["candidate_id"] for c in queue.pending(Filters(), "omar", MS + 60_000)] == ["k2"]
    assert queue.claim("k2", "omar", MS + 60_000).reviewer == "omar"


def test_the_backlog_counts_open_candidates_per_loop_and_the_oldest_wait() -> None:
    """What the page's /metrics exports, worked out by hand: refunds has k1 (queued at MS +
    5 s), k2 (MS + 1 s, delivered again at MS + 9 s: its first time stays) and k3 (decided);
    kyc has k4, held as decided while Kafka has not confirmed it, so none open."""
    queue = ReviewQueue()
    queue.add_candidate({**candidate("k1", TS), "ts": MS}, queued_ms=MS + 5_000)
    queue.add_candidate({**candidate("k2", TS), "ts": MS}, queued_ms=MS + 1_000)
    queue.add_candidate({**candidate("k2", TS), "ts": MS}, queued_ms=MS + 9_000)
    queue.add_candidate({**candidate("k3", TS), "ts": MS})  # no message time: its ts
    queue.add_candidate({**candidate("k4", TS, loop="kyc"), "ts": MS}, queued_ms=MS)
    queue.claim("k1", "ana", MS)  # claimed is still open
    decision, _ = queue.decide("k3", "ana", "REJECTED", MS)
    queue.add_decision(decision)
    queue.add_decision(decision)  # read back from the topic: counted once
    queue.hold_unconfirmed(queue.decide("k4", "ana", "REJECTED", MS)[0])
    assert queue.backlog() == {"refunds": (2, MS + 1_000), "kyc": (0, None)}
    assert queue.decision_counts == {("refunds", "REJECTED"): 1}

    registry = CollectorRegistry()
    registry.register(ReviewCollector(queue, now=lambda: (MS + 61_000) / 1000))
    assert [line for line in generate_latest(registry).decode().splitlines() if line[0] != "#"] == [
        'loopline_review_open_candidates{loop="kyc"} 0.0',
        'loopline_review_open_candidates{loop="refunds"} 2.0',
        'loopline_review_oldest_open_age_seconds{loop="kyc"} 0.0',
        'loopline_review_oldest_open_age_seconds{loop="refunds"} 60.0',  # k2: 61 - 1 s
        'loopline_review_decisions_total{decision="REJECTED",loop="refunds"} 1.0',
    ]


def test_a_reviewer_s_texts_are_bounded_with_a_clear_error() -> None:
    """A decision is one Kafka record: a pasted document in the notes made Kafka refuse it
    (1 MB), said as "not saved". Now the queue says what is too long before any send."""
    queue = _queue(candidate("k1", TS))
    with pytest.raises(ReviewError) as refused:
        queue.decide("k1", "ana", "REJECTED", MS, notes="x" * (REVIEW_TEXT_CHARS + 1))
    assert str(refused.value) == "notes too long: 4,001 characters, at most 4,000"
    with pytest.raises(ReviewError, match="expected outcome too long: 5,000 characters"):
        queue.decide("k1", "ana", "ACCEPTED", MS, expected="y" * 5000)
    decision, _ = queue.decide("k1", "ana", "REJECTED", MS, notes="x" * REVIEW_TEXT_CHARS)
    assert decision["notes"] == "x" * 4000
