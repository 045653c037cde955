"""Stage 1's outputs (pipeline.partition): each changed bucket is encoded once per batch for
its partial and its checkpoint records, never from a stale encoding, and its input features
travel only when they changed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.aggregates import Aggregate
from pipeline.codec import CodecError
from pipeline.core import CoreConfig, to_ms
from pipeline.fastjson import dumps, loads
from pipeline.generator import TrafficGenerator
from pipeline.loopview import LoopView, partial_from_json
from pipeline.partials import Partial, encode_change
from pipeline.partition import CASE_EVENTS, Case, PartitionCore, case_from_record
from pipeline.processor import partition_key

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def events(count: int, skip: int = 0) -> list[tuple[str, dict[str, Any]]]:
    generator = TrafficGenerator(3, START, cases_per_second=50.0)
    return list(islice(generator, skip, skip + count))


def feed(core: PartitionCore, batch: list[tuple[str, dict[str, Any]]]) -> None:
    for topic, record in batch:
        core.process(topic, partition_key(topic, record), record)


def bucket_records(records: dict[str, Any], prefix: str = "b/") -> dict[str, Any]:
    """The bucket count ("b/") or feature ("f/") records of ``changed_records``, decoded."""
    return {
        k: None if v is None else loads(bytes(v)) for k, v in records.items() if k[:2] == prefix
    }


def test_partials_and_bucket_records_are_the_buckets_json() -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(600))
    partials = [m for m in core.drain() if isinstance(m, Partial)]
    records = core.changed_records()
    sent = {(p.loop, k): a for p in partials for k, a in p.buckets.items()}
    assert sent and all(isinstance(v, msgspec.Raw) for k, v in records.items() if k[:2] == "b/")
    for partial in partials:
        assert partial.encode() == dumps(partial.to_json())
    assert bucket_records(records) == {
        f"b/{loop}/{index}": aggregate.counts_json() for (loop, index), aggregate in sent.items()
    }
    with_inputs = {key: a for key, a in sent.items() if a.inputs}
    assert with_inputs and bucket_records(records, "f/") == {
        f"f/{loop}/{index}": a.features_json() for (loop, index), a in with_inputs.items()
    }


def test_a_bucket_that_changes_after_its_partial_is_encoded_again() -> None:
    core = PartitionCore(CoreConfig())
    batch = events(400)
    feed(core, batch[:200])
    first = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    encoded = {(p.loop, k): p.encode() for p in first for k in p.buckets}
    feed(core, batch[200:])  # same buckets, more events, before the checkpoint is taken
    records = bucket_records(core.changed_records())
    changed = [key for key in encoded if f"b/{key[0]}/{key[1]}" in records]
    assert changed
    for loop, index in changed:
        assert records[f"b/{loop}/{index}"] == core.buckets[(loop, index)].counts_json()
    later = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    for partial in later:
        assert partial.encode() == dumps(partial.to_json())
    assert any(p.encode() != encoded[(p.loop, k)] for p in later for k in p.buckets)


def test_each_changed_bucket_is_encoded_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(600))
    calls: list[str] = []
    counts_json, features_json = Aggregate.counts_json, Aggregate.features_json

    def counted_counts(self: Aggregate) -> dict[str, Any]:
        calls.append("b/")
        return counts_json(self)

    def counted_features(self: Aggregate) -> dict[str, Any] | None:
        calls.append("f/")
        return features_json(self)

    monkeypatch.setattr(Aggregate, "counts_json", counted_counts)
    monkeypatch.setattr(Aggregate, "features_json", counted_features)
    for message in core.drain():
        if isinstance(message, Partial):
            message.encode()
    records = core.changed_records()
    for prefix in ("b/", "f/"):
        written = [k for k, v in records.items() if k[:2] == prefix and v is not None]
        assert len(written) > 1
        assert calls.count(prefix) == len(written)


def test_restore_from_changed_records_as_they_are() -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(500))
    list(core.drain())
    restored = PartitionCore.from_records(CoreConfig(), 0, core.changed_records())
    assert {k: a.to_json() for k, a in restored.buckets.items()} == {
        k: a.to_json() for k, a in core.buckets.items()
    }
    assert len(core.cases) > 100 and restored.cases == core.cases


def test_a_case_record_is_the_same_json_in_every_form_it_is_read_from() -> None:
    case = Case(
        "support", 1_000, (), True, 2_000, {"e1": 1_000}, '{"text":"hi"}', None, {"x": False}
    )
    record = dumps(case)
    # The keys and order checkpoints have always had (Case.to_json before it was a Struct).
    assert record == (
        b'{"l":"support","i":1000,"q":[],"r":true,"t":2000,"s":{"e1":1000},'
        b'"in":"{\\"text\\":\\"hi\\"}","re":null,"v":{"x":false},"ia":null}'
    )
    assert case_from_record(record) == case
    assert case_from_record(msgspec.Raw(record)) == case
    assert case_from_record(json.loads(record)) == case
    # Written before cases kept what a candidate shows (no "in", "re", "v").
    old = {"l": "support", "i": None, "q": [5], "r": True, "t": 5, "s": {"e2": 5}}
    assert case_from_record(dumps(old)) == Case("support", None, (5,), True, 5, {"e2": 5})
    # An input kept as its message came: base64 in JSON, the same bytes back in every form.
    kept = Case("support", 1_000, inp_avro=b"\xc3\x01\x00\xff")
    assert dumps(kept).endswith(b'"in":null,"re":null,"v":{},"ia":"wwEA/w=="}')
    for form in (dumps(kept), msgspec.Raw(dumps(kept)), json.loads(dumps(kept))):
        assert case_from_record(form) == kept
    # A lone surrogate (JSON input allows one) is escaped by the standard library, read back.
    lone = Case("support", inp=json.loads('"a\\ud800"'))
    assert dumps(lone).endswith(b'"in":"a\\ud800","re":null,"v":{},"ia":null}')
    assert case_from_record(dumps(lone)) == lone


def test_features_travel_only_when_they_changed() -> None:
    batch = events(800)
    core = PartitionCore(CoreConfig())
    feed(core, batch[:600])
    first = {(m.loop, k): m for m in core.drain() if isinstance(m, Partial) for k in m.buckets}
    core.changed_records()
    later = [(t, r) for t, r in batch[600:] if t != "inputs"]  # no input: no feature changes
    feed(core, later)
    again = [m for m in core.drain() if isinstance(m, Partial) and m.buckets]
    assert again and not any(m.with_features for m in again)
    assert all(len(entry) == 2 for m in again for entry in m.to_json()["buckets"])
    assert not any(k.startswith("f/") for k in core.changed_records())
    # Stage 2 keeps the features it has: the same view as if they had been sent again.
    sent_again = [replace(m, with_features=True) for m in again]
    views: list[LoopView] = []
    for messages in (again, sent_again):
        view = LoopView(CoreConfig())
        for message in first.values():
            view.apply(partial_from_json(loads(message.encode())))
        for message in messages:
            view.apply(partial_from_json(loads(message.encode())))
        views.append(view)
    left_out, resent = views
    assert left_out.snapshot() == resent.snapshot()
    for loop, state in resent.loops.items():
        kept = left_out.loops[loop].open
        assert {k: a.to_json() for k, a in kept.items()} == {
            k: a.to_json() for k, a in state.open.items()
        }


def test_partials_and_records_written_before_the_split_are_read() -> None:
    core = PartitionCore(CoreConfig())
    feed(core, events(300))
    partial = next(m for m in core.drain() if isinstance(m, Partial) and m.buckets)
    ((index, aggregate),) = partial.buckets.items()
    old_wire = partial.to_json() | {"buckets": [[index, aggregate.to_json()]]}
    decoded = partial_from_json(loads(dumps(old_wire)))
    assert isinstance(decoded, Partial) and decoded.with_features
    assert decoded.buckets[index].to_json() == aggregate.to_json()
    old_records = {f"b/{partial.loop}/{index}": aggregate.to_json()}
    restored = PartitionCore.from_records(CoreConfig(), 0, old_records)
    assert restored.buckets[(partial.loop, index)].to_json() == aggregate.to_json()
    # The next checkpoint moves the features out, before a counts-only record replaces it.
    moved = bucket_records(restored.changed_records(), "f/")
    assert moved == {f"f/{partial.loop}/{index}": aggregate.features_json()}
    key = json.dumps(["o", partial.loop, 0, index], separators=(",", ":"))
    view = LoopView.from_records(CoreConfig(), [(key, aggregate.to_json())])
    assert view.loops[partial.loop].open[(0, index)].to_json() == aggregate.to_json()
    records = view.changed_records()
    of_key = json.dumps(["of", partial.loop, 0, index], separators=(",", ":"))
    assert records[of_key] == aggregate.features_json()
    assert key not in records  # the old record stays until the counts change
    counts_only = aggregate.counts_json()  # what replaces it then
    for stored in (
        [(key, counts_only), (of_key, records[of_key])],
        [(of_key, records[of_key]), (key, counts_only)],
    ):
        again = LoopView.from_records(CoreConfig(), stored)
        assert again.loops[partial.loop].open[(0, index)].to_json() == aggregate.to_json()


# -- the watermark of topics read at different speeds (PartitionCore.hold) -------------------

MINUTE = 60_000


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(START.timestamp() + seconds, UTC)


def tight() -> CoreConfig:
    """A minute of lateness (the SLA, and so the state's horizon, as by default)."""
    return CoreConfig(allowed_lateness_ms=MINUTE)


def test_an_event_stamped_too_far_ahead_of_its_message_is_refused_before_any_change() -> None:
    """One event with a clock a day ahead would carry the watermark a day ahead: every event
    after it would be too late. Against its message's own time it is refused instead."""
    day = 86_400

    def event(n: int, seconds: int) -> dict[str, Any]:
        return {"event_id": f"i{n}", "case_id": f"c{n}", "loop": "refunds", "ts": at(seconds)}

    sent = to_ms(at(0))  # every message published at the start
    followed = PartitionCore(tight())  # replay: no message times, nothing to check against
    assert followed.process("inputs", "c1", event(1, day)) == "ok"
    assert followed.process("inputs", "c2", event(2, 10)) == "too_late"
    guarded = PartitionCore(tight())  # an hour allowed by default
    with pytest.raises(CodecError) as refused:
        guarded.process("inputs", "c1", event(1, day), sent_ms=sent)
    assert (refused.value.reason, refused.value.field) == ("future_ts", "ts")
    assert str(refused.value) == (
        "ts 2026-11-26T09:00:00Z is 86,400 s ahead of its message's time "
        "2026-11-25T09:00:00Z; at most 3,600 s is allowed (LOOPLINE_MAX_AHEAD_SECONDS)"
    )
    assert (guarded.watermark_ms, guarded.cases, guarded.buckets) == (0, {}, {})
    assert guarded.process("inputs", "c2", event(2, 10), sent_ms=sent) == "ok"
    assert guarded.process("inputs", "c3", event(3, 3600), sent_ms=sent) == "ok"  # the bound
    with pytest.raises(CodecError):
        guarded.process("inputs", "c4", event(4, 3601), sent_ms=sent)
    assert guarded.process("inputs", "c5", event(5, 3601), sent_ms=-1) == "ok"  # no time: -1


def test_a_held_watermark_waits_for_the_slowest_topic_still_to_be_read() -> None:
    core = PartitionCore(tight())
    resolution = {"event_id": "r1", "case_id": "c1", "loop": "refunds", "ts": at(600)}
    resolution |= {"resolver": "SYSTEM", "outcome": "RESOLVED"}
    core.hold(frozenset({"inputs", "resolutions"}))
    assert core.process("resolutions", "c1", resolution) == "ok"
    assert core.watermark_ms == 0  # inputs not seen yet: they may be older
    first_input = {"event_id": "i1", "case_id": "c1", "loop": "refunds", "ts": at(300)}
    assert core.process("inputs", "c1", first_input) == "ok"  # 5 minutes behind: not late
    assert core.watermark_ms == to_ms(at(300))  # the slower topic's newest event
    core.hold(frozenset())  # nothing left to read: the newest event of all
    assert core.watermark_ms == to_ms(at(600))
    assert core.marks == {"inputs": to_ms(at(300)), "resolutions": to_ms(at(600))}
    late = {"event_id": "i2", "case_id": "c2", "loop": "refunds", "ts": at(500)}
    assert core.process("inputs", "c2", late) == "too_late"  # 100 s behind, lateness 60 s
    core.hold(frozenset({"inputs"}))
    assert core.watermark_ms == to_ms(at(600))  # a hold never moves it back
    restored = PartitionCore.from_records(tight(), 0, core.changed_records())
    assert (restored.watermark_ms, restored.marks) == (core.watermark_ms, core.marks)


TOPICS = ("inputs", "resolutions", "eval-results")


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("hold"), st.frozensets(st.sampled_from(TOPICS))),
            st.tuples(st.sampled_from(TOPICS[:2]), st.integers(0, 900)),
        ),
        max_size=40,
    )
)
def test_the_watermark_is_the_highest_held_value_so_far(steps: list[tuple[str, Any]]) -> None:
    """Whatever the order of holds and events: the watermark is the largest value the marks
    allowed at any point, each the newest event of all topics or, with topics still to be
    read, the least of their newest events (as the definition says, computed here in full)."""
    core = PartitionCore(tight())
    marks: dict[str, int] = {}
    behind: frozenset[str] = frozenset()
    expected = 0
    for n, (kind, arg) in enumerate(steps):
        if kind == "hold":
            core.hold(arg)
            behind = arg
        else:
            record = {"event_id": f"e{n}", "case_id": f"c{n}", "loop": "refunds", "ts": at(arg)}
            record |= {"resolver": "SYSTEM", "outcome": "RESOLVED"}
            if core.process(kind, f"c{n}", record) != "ok":
                assert to_ms(at(arg)) <= expected - MINUTE  # too late, and only then
                continue
            marks[kind] = max(marks.get(kind, 0), to_ms(at(arg)))
        newest = max(marks.values(), default=0)
        held = min([newest, *(marks.get(t, 0) for t in behind)]) if behind else newest
        expected = max(expected, held)
        assert core.watermark_ms == expected, n


def _snapshot(core: PartitionCore, view: LoopView) -> dict[str, Any]:
    for change in core.drain():
        view.apply(partial_from_json(loads(encode_change(change))))
    return view.snapshot(view.default_as_of())


def test_a_topic_read_ahead_makes_no_event_of_another_late() -> None:
    """Ten minutes of events with a minute of lateness, read as a worker reads a backlog whose
    resolutions and verdicts were fetched first: the same numbers as reading them in order."""
    generated = list(islice(TrafficGenerator(5, START, cases_per_second=2.0), 3000))
    assert generated[-1][1]["ts"] >= to_ms(at(600))
    ahead = [(t, r) for t, r in generated if t != "inputs"]
    behind = [(t, r) for t, r in generated if t == "inputs"]

    in_order = PartitionCore(tight())
    feed(in_order, generated)
    expected = _snapshot(in_order, LoopView(tight()))

    held = PartitionCore(tight())
    held.hold(frozenset({"inputs", "resolutions", "eval-results"}))
    statuses = [held.process(t, partition_key(t, r), r) for t, r in ahead]
    held.hold(frozenset({"inputs"}))
    statuses += [held.process(t, partition_key(t, r), r) for t, r in behind]
    held.hold(frozenset())
    assert statuses == ["ok"] * len(generated)
    assert _snapshot(held, LoopView(tight())) == expected

    unheld = PartitionCore(tight())  # the same order without a hold: most inputs too late
    feed(unheld, ahead + behind)
    assert _snapshot(unheld, LoopView(tight())) != expected


def test_resolutions_wait_for_their_input_until_their_case_is_past_the_lateness() -> None:
    def resolution(event_id: str, case_id: str, seconds: int) -> dict[str, Any]:
        return {"event_id": event_id, "case_id": case_id, "loop": "refunds", "ts": at(seconds)}

    def input_at(event_id: str, case_id: str, seconds: int) -> None:
        record = {"event_id": event_id, "case_id": case_id, "loop": "refunds", "ts": at(seconds)}
        assert core.process("inputs", case_id, record) == "ok"

    core = PartitionCore(tight())
    for event_id, case_id, seconds in [("r1", "c1", 100), ("r2", "c2", 100), ("r3", "c2", 150)]:
        record = resolution(event_id, case_id, seconds) | {"resolver": "HUMAN", "outcome": "X"}
        assert core.process("resolutions", case_id, record) == "ok"
    input_at("i9", "c9", 165)  # past the 160 s boundary: lateness now ends at 105 s
    assert core.cases["c1"].pending == ()  # last touched at 100 s: its input is too late now
    assert core.cases["c2"].pending == (to_ms(at(100)), to_ms(at(150)))  # touched at 150 s
    restored = PartitionCore.from_records(tight(), 0, core.changed_records())
    for state in (core, restored):
        state.process("inputs", "c8", resolution("i8", "c8", 212))  # lateness ends at 152 s
        assert state.cases["c2"].pending == ()


def event(core: PartitionCore, topic: str, case_id: str, seconds: int) -> None:
    """The input or resolution (by a person) of ``case_id`` at ``seconds``, counted."""
    record = {"event_id": f"{topic}-{case_id}", "case_id": case_id, "loop": "refunds"}
    record |= {"ts": at(seconds)}
    if topic == "resolutions":
        record |= {"resolver": "HUMAN", "outcome": "RESOLVED"}
    assert core.process(topic, case_id, record) == "ok"


def test_a_case_is_held_for_the_horizon_after_its_last_event_not_its_first() -> None:
    config = tight()
    horizon_s = config.case_horizon_ms // 1000
    core = PartitionCore(config)
    event(core, "inputs", "c1", 0)
    event(core, "resolutions", "c1", horizon_s // 2)
    event(core, "inputs", "c2", horizon_s + 30)  # the horizon passes c1's first event only
    assert "c1" in core.cases
    restored = PartitionCore.from_records(config, 0, core.changed_records())
    for state in (core, restored):
        event(state, "inputs", "c3", horizon_s // 2 + horizon_s + 30)  # and now its last
        assert "c1" not in state.cases and {"c2", "c3"} <= state.cases.keys()


# -- the cap on cases (CoreConfig.max_cases_per_partition) -----------------------------------


def test_the_cap_evicts_the_least_recently_touched_cases_and_restores_alike() -> None:
    evicted: list[str] = []
    core = PartitionCore(replace(tight(), max_cases_per_partition=2), on_evict=evicted.append)
    event(core, "inputs", "c1", 0)
    event(core, "inputs", "c2", 10)
    event(core, "resolutions", "c1", 20)  # c1 last touched at 20 s, c2 at 10 s
    event(core, "inputs", "c3", 30)  # a third case: c2 goes
    assert sorted(core.cases) == ["c1", "c3"]
    assert evicted == ["refunds"]
    records = core.changed_records()
    assert records["c/c2"] is None  # deleted from the changelog as an expired case is
    # c2's resolution still counts (coverage, cost), but finds no input to measure latency
    # against: it waits as a resolution without input, and c1 (touched at 20 s) goes for it.
    event(core, "resolutions", "c2", 40)
    assert sorted(core.cases) == ["c2", "c3"] and core.cases["c2"].pending == (to_ms(at(40)),)
    buckets = list(core.buckets.values())
    assert sum(sum(b.resolutions.values()) for b in buckets) == 2
    assert sum(b.latency.count for b in buckets) == 1  # c1's 20 s only
    # and c2 stays unresolved: only c1 settled its input's bucket
    assert sum(b.unresolved for b in buckets) == 3
    assert sum(sum(b.settled.values()) for b in buckets) == 1
    assert evicted == ["refunds", "refunds"]

    uncapped = PartitionCore(tight())
    for topic, case_id, seconds in [
        ("inputs", "c1", 0),
        ("inputs", "c2", 10),
        ("resolutions", "c1", 20),
        ("inputs", "c3", 30),
        ("resolutions", "c2", 40),
    ]:
        event(uncapped, topic, case_id, seconds)
    assert sorted(uncapped.cases) == ["c1", "c2", "c3"]
    assert sum(b.latency.count for b in uncapped.buckets.values()) == 2
    assert sum(sum(b.settled.values()) for b in uncapped.buckets.values()) == 2

    # A restored core evicts what the running one would: the least recently touched first.
    stored = {k: v for k, v in (records | core.changed_records()).items() if v is not None}
    restored = PartitionCore.from_records(core.config, 0, stored)  # as the table holds them
    assert sorted(restored.cases) == ["c2", "c3"]
    for state in (core, restored):
        event(state, "inputs", "c4", 50)  # c3 (30 s) goes, not c2 (40 s)
        assert sorted(state.cases) == ["c2", "c4"]


def _verdict(event_id: str, case_id: str, seconds: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "case_id": case_id,
        "loop": "refunds",
        "ts": at(seconds),
        "suite": "CURRENT",
        "evaluator": "judge",
        "passed": True,
    }


def _state(core: PartitionCore) -> bytes:
    cases = {k: msgspec.to_builtins(c) for k, c in core.cases.items()}
    return dumps([cases, [[list(k), a.to_json()] for k, a in core.buckets.items()]])


def test_one_case_id_on_everything_is_held_to_case_events_ids() -> None:
    """A producer that puts one case_id on every event: the case remembers CASE_EVENTS event
    ids; the next new one is refused before any change (a dead letter too_many_events), a
    duplicate still counts as one, and ids past the dedupe horizon (1 h) make room."""
    core = PartitionCore(CoreConfig())
    for n in range(CASE_EVENTS):  # one a second, from 0 s to 999 s
        assert core.process("eval-results", "hot", _verdict(f"e{n}", "hot", n)) == "ok"
    before = _state(core)
    with pytest.raises(CodecError) as refused:
        core.process("eval-results", "hot", _verdict("one-more", "hot", 1000))
    assert (refused.value.reason, refused.value.field) == ("too_many_events", "case_id")
    assert str(refused.value) == (
        "case_id 'hot' has 1,000 events within the dedupe horizon already; one holds at most "
        "1,000 (is case_id set per case?)"
    )
    assert _state(core) == before
    assert core.process("eval-results", "hot", _verdict("e5", "hot", 1000)) == "duplicate"

    # Another case's event at 4,100 s puts the horizon at 500 s: e0..e499 no longer dedupe,
    # so the case forgets them and takes the new one (and e0 again, counted as new).
    assert core.process("eval-results", "calm", _verdict("c1", "calm", 4100)) == "ok"
    assert core.process("eval-results", "hot", _verdict("one-more", "hot", 4100)) == "ok"
    assert sorted(core.cases["hot"].seen) == sorted(
        [f"e{n}" for n in range(500, 1000)] + ["one-more"]
    )
    assert core.process("eval-results", "hot", _verdict("e0", "hot", 4100)) == "ok"
    assert core.process("eval-results", "hot", _verdict("e600", "hot", 4100)) == "duplicate"

    # An eval case's results (no case_id) are held by the eval case alike, and named so.
    for n in range(CASE_EVENTS):
        record = _verdict(f"h{n}", "", 4100) | {"case_id": None, "eval_case_id": "ec-7"}
        assert core.process("eval-results", "ec-7", record) == "ok"
    with pytest.raises(CodecError) as refused:
        core.process("eval-results", "ec-7", record | {"event_id": "h-more"})
    assert refused.value.field == "eval_case_id"
    assert str(refused.value).startswith("eval_case_id 'ec-7' has 1,000 events"), refused.value


def test_a_case_keeps_an_evaluators_name_to_its_first_100_characters() -> None:
    core = PartitionCore(CoreConfig())
    record = _verdict("e1", "c1", 1) | {"evaluator": "j" * 100 + "udge", "passed": False}
    assert core.process("eval-results", "c1", record) == "ok"
    assert core.cases["c1"].verdicts == {"j" * 100: False}


def test_a_long_event_id_is_remembered_by_its_digest_and_still_dedupes() -> None:
    core = PartitionCore(CoreConfig())
    long_id = "x" * 5000
    assert core.process("eval-results", "c1", _verdict(long_id, "c1", 1)) == "ok"
    assert core.process("eval-results", "c1", _verdict(long_id, "c1", 2)) == "duplicate"
    assert core.process("eval-results", "c1", _verdict(long_id + "y", "c1", 3)) == "ok"
    expected = "#" + hashlib.blake2b(long_id.encode(), digest_size=16).hexdigest()
    assert expected in core.cases["c1"].seen and len(core.cases["c1"].seen) == 2
    assert all(len(i) == 33 for i in core.cases["c1"].seen)
    # The bucket counted two verdicts, not three.
    (bucket,) = core.buckets.values()
    assert bucket.verdicts == {("CURRENT", True): 2}
    # A case from state written before the digests holds the id itself: still a duplicate.
    core.cases["c1"].seen[long_id + "z"] = to_ms(at(3))
    assert core.process("eval-results", "c1", _verdict(long_id + "z", "c1", 4)) == "duplicate"
