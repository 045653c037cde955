"""Eval candidates: reasons, deterministic sampling under budgets, near-duplicates, redaction."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.candidates import (
    REASONS,
    SEVERITY,
    CandidateConfig,
    CandidateSampler,
    CaseProposal,
    LoopContext,
    extrinsic_reasons,
    shown_input,
    text_fingerprint,
    unit_hash,
)
from pipeline.codec import Codec, CodecError
from pipeline.generator import Scenario
from pipeline.loopview import LoopView
from pipeline.partition import INPUT_AVRO_BYTES
from pipeline.processor import Processor
from pipeline.redact import DEFAULT_PATTERNS, Redactor
from pipeline.topics import RECORD_OF
from pipeline.windows import DAY
from tests.pipeline.test_alerts import START, START_MS, config, replay, stationary, traffic

EVERYTHING = Scenario(drift_at=3600, cost_spike_at=2 * 3600, quality_drop_at=3 * 3600)


def _events(hours: float = 4.0) -> list[tuple[str, dict[str, Any]]]:
    return list(stationary(hours, EVERYTHING))


def _rules(budget: int, cap: int) -> dict[str, Any]:
    return {"candidates": {"daily_budget": budget, "stratum_daily_cap": cap}}


def _primary(candidate: dict[str, Any]) -> str:
    reason = max(candidate["reasons"], key=lambda r: (SEVERITY[r], r))
    return f"{reason}/{candidate['category'] or ''}"


def test_every_reason_is_reachable_and_no_case_is_queued_twice() -> None:
    processor = replay(iter(_events()), config(_rules(10_000, 10_000)))
    found = Counter(r for c in processor.candidates for r in c["reasons"])
    assert set(found) == set(REASONS), found
    case_ids = [c["case_id"] for c in processor.candidates]
    assert len(case_ids) == len(set(case_ids))
    # Near-duplicates (same text but for numbers) are suppressed within a loop.
    prints = [text_fingerprint(c["input_text"]) for c in processor.candidates]
    assert len(prints) == len(set(prints))


def test_budgets_hold_per_day_and_stratum() -> None:
    # Two days of traffic, so the daily budget resets once.
    events = list(traffic(START - timedelta(hours=20), 24.0, Scenario(drift_at=19 * 3600)))
    processor = replay(iter(events), config(_rules(12, 3)))
    per_day = Counter(c["ts"] // DAY for c in processor.candidates)
    assert len(per_day) == 2 and max(per_day.values()) == 12
    per_stratum = Counter((c["ts"] // DAY, _primary(c)) for c in processor.candidates)
    assert max(per_stratum.values()) == 3


def test_the_same_events_give_the_same_picks_in_replay_and_across_a_restart() -> None:
    events = _events(3.0)
    first = replay(iter(events), config(_rules(60, 6)))
    second = replay(iter(events), config(_rules(60, 6)))
    days = {c["ts"] // DAY for c in first.candidates}
    assert first.candidates == second.candidates and len(first.candidates) == 60 * len(days)

    split = len(events) // 2
    before = replay(iter(events[:split]), config(_rules(60, 6)))
    restored = LoopView.from_records(before.config, before.stage2.changed_records().items())
    after = Processor.resumed(before.stage1, restored)
    for event in events[split:]:
        after.process(*event)
    after.snapshot()  # hands the last proposals over
    assert before.candidates + after.candidates == first.candidates


def _proposal(case_id: str, text: str, **resolution: Any) -> CaseProposal:
    return CaseProposal(
        case_id,
        "refunds",
        START_MS,
        {"category": "late", "text": text},
        {"resolver": "SYSTEM", "outcome": "FAILED", **resolution},
        12.0,
        {},
    )


def test_a_near_duplicate_text_is_not_queued_again() -> None:
    sampler = CandidateSampler("refunds", CandidateConfig())
    context = LoopContext(frozenset({"late"}), {}, None, None)
    first = sampler.offer(_proposal("a", "Where is order 123?  Call me"), context)
    assert first is not None and first["reasons"] == ["failed"]
    assert sampler.offer(_proposal("b", "where is ORDER 987? call me!"), context) is None
    assert sampler.offer(_proposal("c", "a different question"), context) is not None
    assert sampler.offer(_proposal("a", "yet another text"), context) is None  # same case


def test_cases_that_keep_their_input_messages_give_the_same_candidates() -> None:
    # A worker's case keeps its input as the message came (Case.inp_avro), which stage 2
    # reads only when its budget may still pick the case; replay's keeps the shown fields.
    # Over the same records, decoded as a worker has them, both give the same candidates.
    codec = Codec.load()
    wire = []
    for topic, record in _events(2.0):
        message = codec.encode(RECORD_OF[topic], record)
        wire.append((topic, codec.decode(message).record, message))
    rules = config(_rules(10_000, 10_000))
    fields = replay(iter((topic, record) for topic, record, _ in wire), rules)
    kept = replay(iter(()), rules)  # the eval set only
    core, plain = kept.stage1, kept.stage1.process
    by_record = {id(record): message for _, record, message in wire}

    def with_message(topic: str, key: str, record: Any, message: bytes | None = None) -> str:
        return plain(topic, key, record, by_record[id(record)])

    core.process = with_message  # type: ignore[method-assign]
    for topic, record, _ in wire:
        kept.process(topic, record)
    fields.snapshot(), kept.snapshot()  # hand the last proposals over
    assert len(fields.candidates) > 100 and kept.candidates == fields.candidates
    assert all(c.inp is None for c in kept.stage1.cases.values() if c.inp_avro is not None)
    assert sum(c.inp_avro is not None for c in kept.stage1.cases.values()) > 100
    assert all(c.inp_avro is None for c in fields.stage1.cases.values())


def test_an_input_message_too_large_to_keep_is_kept_as_its_shown_fields() -> None:
    codec = Codec.load()
    topic, record = next((t, r) for t, r in _events(0.1) if t == "inputs")
    large = dict(record, text="x" * INPUT_AVRO_BYTES)
    core = replay(iter(()), config()).stage1
    for n, value in enumerate((record, large)):
        message = codec.encode("InputEvent", dict(value, case_id=f"c{n}", event_id=f"e{n}"))
        core.process(topic, f"c{n}", codec.decode(message).record, message)
    small_case, large_case = core.cases["c0"], core.cases["c1"]
    assert small_case.inp is None and small_case.inp_avro is not None
    assert large_case.inp_avro is None and large_case.inp is not None
    assert len(large_case.inp) < 2500  # the text cut to TEXT_LIMIT (2,000 characters)


def test_stage_2_reads_an_input_message_only_while_its_budget_may_pick_the_case() -> None:
    context = LoopContext(frozenset({"late"}), {}, None, None)
    codec = Codec.load()
    _, record = next((t, r) for t, r in _events(0.1) if t == "inputs")
    message = codec.encode("InputEvent", record)
    read = CaseProposal(
        "a", "refunds", START_MS, {}, {"resolver": "SYSTEM", "outcome": "FAILED"}, 1.0, {}, message
    ).with_input()
    assert read.input_avro is None
    assert read.input == shown_input(codec.decode(message).record)

    sampler = CandidateSampler("refunds", CandidateConfig(daily_budget=1))
    assert sampler.offer(_proposal("a", "first"), context) is not None  # the day's budget
    damaged = CaseProposal(
        "b", "refunds", START_MS, {}, {"resolver": "SYSTEM", "outcome": "FAILED"}, 1.0, {}, b"?"
    )
    assert sampler.offer(damaged, context) is None  # refused before its input is read
    fresh = CandidateSampler("refunds", CandidateConfig(daily_budget=1))
    with pytest.raises(CodecError):  # read, with the budget left
        fresh.offer(damaged, context)


def test_candidates_leave_the_pipeline_redacted() -> None:
    processor = replay(iter(_events(2.0)), config(_rules(10_000, 10_000)))
    texts = [c["input_text"] for c in processor.candidates if c["input_text"]]
    assert any("[EMAIL]" in t for t in texts) and any("[CARD]" in t for t in texts)
    for _, pattern in DEFAULT_PATTERNS:
        assert not any(re.search(pattern, t) for t in texts)


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=12)
_email = st.builds(
    lambda user, host, tld: f"{user}@{host}.{tld}",
    _name.filter(lambda s: s[0].isalnum()),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10),
    st.sampled_from(["com", "org", "de", "co.uk"]),
)
_digits = st.integers(min_value=0, max_value=9)
_card = st.lists(_digits, min_size=13, max_size=19).map(
    lambda ds: " ".join("".join(map(str, ds[i : i + 4])) for i in range(0, len(ds), 4))
)
_phone = st.builds(
    lambda cc, number: f"+{cc} {number}",
    st.integers(min_value=1, max_value=99),
    st.lists(_digits, min_size=8, max_size=11).map(lambda ds: "".join(map(str, ds))),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_email, _card, _phone), min_size=1, max_size=4),
    st.lists(st.sampled_from(["please", "help", "order", "late", ":", "-", ","]), max_size=6),
)
def test_no_match_of_a_default_pattern_survives_redaction(pii: list[str], words: list[str]) -> None:
    rng = random.Random(len(pii))
    parts = words + pii
    rng.shuffle(parts)
    redacted = Redactor()(" ".join(parts))
    assert redacted is not None
    for _, pattern in DEFAULT_PATTERNS:
        assert re.search(pattern, redacted) is None, (pattern, redacted)
    for item in pii:
        assert item not in redacted


def test_the_coin_is_the_blake2b_of_salt_and_case_id_whatever_salts_came_before() -> None:
    def reference(case_id: str, salt: str) -> float:
        digest = hashlib.blake2b(f"{salt}:{case_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    pairs = [(f"case-{i}", salt) for i in range(50) for salt in ("loopline", "other", "")]
    assert [unit_hash(c, s) for c, s in pairs] == [reference(c, s) for c, s in pairs]
    assert unit_hash("case-1", "loopline") != unit_hash("case-1", "other")
    assert all(0 <= unit_hash(c, s) < 1 for c, s in pairs)


def test_long_categorical_values_are_judged_as_the_summaries_cut_them() -> None:
    """The eval set's categories and the drifted features' usual values are kept cut to 100
    characters (pipeline.features.category_text): a case is judged on its values cut alike."""
    long = "refund because " + "x" * 400
    key = "k" * 150  # an attribute key, cut too
    context = LoopContext(
        frozenset({long[:100]}), {f"attributes.{key[:100]}": frozenset({"y" * 100})}, None, None
    )
    usual = CaseProposal(
        "c1",
        "refunds",
        START_MS,
        {"category": long + " (other words)", "attributes": {key: "y" * 300}},
        {"resolver": "SYSTEM", "outcome": "RESOLVED"},
        1.0,
        {},
    )
    assert extrinsic_reasons(usual, context) == ([], [])
    odd = CaseProposal(
        "c2",
        "refunds",
        START_MS,
        {"category": "damaged", "attributes": {key: "z"}},
        {"resolver": "SYSTEM", "outcome": "RESOLVED"},
        1.0,
        {},
    )
    assert extrinsic_reasons(odd, context) == (
        ["novel_category", "drifted_feature"],
        [f"attributes.{key[:100]}"],
    )
