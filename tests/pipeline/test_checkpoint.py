"""A crash at any point of the changelog writes, then a restart, gives the uninterrupted state.

The worker writes each batch's records and then a checkpoint marker to a changelog partition;
a SIGKILL leaves some prefix of those writes durable. These tests cut the write log at every
position, restore from the prefix, process the events again from the start (as Kafka redelivers
everything after the committed offset, which is at most the marker), and compare with a run
that never crashed: stage 1's records, and stage 2's snapshot built from every message sent.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from pipeline.checkpoint import MARKER, Checkpoint, Write, encode_envelope, next_offsets
from pipeline.core import CoreConfig
from pipeline.formats import FORMAT_VERSION, NewerFormat
from pipeline.loopview import LoopView, partial_from_json
from pipeline.partials import encode_change
from pipeline.partition import CASES, PartitionCore
from pipeline.processor import partition_key

T0 = 1_795_000_000_000
CONFIG = CoreConfig(allowed_lateness_ms=60_000, default_sla_ms=60_000, dedupe_horizon_ms=60_000)


@dataclass(frozen=True)
class Event:
    topic: str
    offset: int
    record: dict[str, Any]


def make_events(seed: int, cases: int = 25) -> list[Event]:
    """Inputs, resolutions (some before their input), eval results, duplicates, late events and
    a jump in time past the horizon, so expiry and closing happen too."""
    rng = random.Random(seed)
    raw: list[tuple[str, dict[str, Any]]] = []
    for n in range(cases):
        at = T0 + n * 7_000 + (300_000 if n > cases - 4 else 0)
        loop = rng.choice(["a", "b"])
        common = {"case_id": f"c{n}", "loop": loop}
        if rng.random() < 0.85:
            cat = rng.choice([None, "x", "y"])
            raw.append(("inputs", {**common, "event_id": f"i{n}", "ts": at, "category": cat}))
        if rng.random() < 0.8:
            raw.append(
                (
                    "resolutions",
                    {
                        **common,
                        "event_id": f"r{n}",
                        "ts": at + rng.randint(-5_000, 90_000),
                        "resolver": rng.choice(["SYSTEM", "HUMAN", "HYBRID"]),
                        "outcome": "RESOLVED",
                        "model_cost_usd": rng.choice([0.01, 0.1, 0.333]),
                        "human_minutes": rng.choice([0.0, 1.5]),
                        "eval_passed": rng.choice([None, True, False]),
                    },
                )
            )
        if rng.random() < 0.4:
            raw.append(
                (
                    "eval-results",
                    {
                        **common,
                        "event_id": f"v{n}",
                        "eval_case_id": f"e{n}",
                        "ts": at + 1_000,
                        "suite": rng.choice(["CURRENT", "HISTORICAL"]),
                        "passed": rng.random() < 0.7,
                    },
                )
            )
    raw += [rng.choice(raw) for _ in range(6)]  # redelivered duplicates
    # Roughly in time order, with local disorder (either order within a case, late events).
    raw.sort(key=lambda item: item[1]["ts"] + rng.randint(0, 30_000))
    offsets: dict[str, int] = {}
    events = []
    for topic, record in raw:
        events.append(Event(topic, offsets.get(topic, 0), record))
        offsets[topic] = offsets.get(topic, 0) + 1
    return events


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def apply_writes(writes: Iterable[Write]) -> dict[bytes, Any]:
    """What a changelog partition holding these writes restores to (compaction included)."""
    store: dict[bytes, Any] = {}
    for key, value in writes:
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
    return store


@dataclass
class Run:
    writes: list[Write]
    sent: list[list[str]]  # stage-1 messages (JSON) per batch
    write_batch: list[int]  # the batch index of each write


def run_stage1(store: dict[bytes, Any], events: list[Event], size: int, held: bool = True) -> Run:
    """Stage 1 as the worker runs it: with ``held``, the store keeps no copy of the cases and
    the core hands their previous values to each commit."""
    checkpoint = Checkpoint(store, "0/", (CASES,) if held else ())
    core = PartitionCore.from_records(CONFIG, 0, checkpoint.values, keeps_previous=held)
    run = Run([], [], [])
    todo = checkpoint.unapplied(events)
    for number, chunk in enumerate(batches(todo, size)):
        offsets = {}
        for event in chunk:
            core.process(event.topic, partition_key(event.topic, event.record), event.record)
            offsets[event.topic] = event.offset + 1
        run.sent.append([json.dumps(m.to_json()) for m in core.drain()])
        previous = core.previous_records()
        writes = checkpoint.commit(core.changed_records(), offsets, previous)
        if held:  # the core holds the cases: the store keeps none of them, nor their keys
            assert core.cases and not any(k[:4] == b"0/c/" for k in store)
        run.writes += writes
        run.write_batch += [number] * len(writes)
    return run


def stage2_snapshot(messages: Iterable[str]) -> dict[str, Any]:
    view = LoopView(CONFIG)
    for message in messages:
        view.apply(partial_from_json(json.loads(message)))
    return {"snapshot": view.snapshot(T0 + 600_000), "unresolved": view.unresolved(T0 + 600_000)}


def restored_values(writes: Iterable[Write]) -> dict[str, Any]:
    return Checkpoint(apply_writes(writes), "0/").values


@pytest.mark.parametrize(("seed", "held"), [(1, True), (2, True), (3, False)])
def test_stage1_crash_at_every_write_recovers_the_uninterrupted_state(
    seed: int, held: bool
) -> None:
    events = make_events(seed)
    full = run_stage1({}, events, size=5, held=held)
    expected_state = restored_values(full.writes)
    expected_numbers = stage2_snapshot(m for batch in full.sent for m in batch)
    assert expected_numbers["snapshot"]["loops"], "the scenario must produce numbers"
    assert any(v is None for _, v in full.writes), "the scenario must expire something"
    for cut in range(len(full.writes) + 1):
        durable = full.writes[:cut]
        restart = run_stage1(apply_writes(durable), events, size=5, held=held)
        assert restored_values(durable + restart.writes) == expected_state, cut
        # Stage 1 sent the messages of every batch that had started writing before the kill.
        started = full.write_batch[cut - 1] + 1 if cut else 0
        crashed_messages = [m for batch in full.sent[:started] for m in batch]
        resent = [m for batch in restart.sent for m in batch]
        assert stage2_snapshot(crashed_messages + resent) == expected_numbers, cut


def test_a_batchs_partials_must_be_durable_before_its_checkpoint() -> None:
    """Why the worker awaits the partials' delivery before writing a batch's checkpoint: if
    the checkpoint landed and the partials did not, the restart skips the batch's events as
    applied and never sends those partials again, and stage 2's numbers stay wrong."""
    events = make_events(1)
    full = run_stage1({}, events, size=5)
    expected = stage2_snapshot(m for batch in full.sent for m in batch)
    lost = 2  # the kill: batch 2's checkpoint is durable, its partials are not
    cut = max(i for i, b in enumerate(full.write_batch) if b == lost) + 1
    restart = run_stage1(apply_writes(full.writes[:cut]), events, size=5)
    delivered = [m for n, batch in enumerate(full.sent[: lost + 1]) if n != lost for m in batch]
    resent = [m for batch in restart.sent for m in batch]
    assert stage2_snapshot(delivered + resent) != expected
    # With the order the worker keeps, the same kill loses nothing.
    assert stage2_snapshot(delivered + full.sent[lost] + resent) == expected


class Partial(NamedTuple):
    topic: str
    offset: int
    value: str


def run_stage2(store: dict[bytes, Any], messages: list[str], size: int) -> list[Write]:
    checkpoint = Checkpoint(store, "0/")
    view = LoopView.from_records(CONFIG, checkpoint.values.items())
    writes: list[Write] = []
    partials = [Partial("partials", n, m) for n, m in enumerate(messages)]
    for chunk in batches(checkpoint.unapplied(partials), size):
        for partial in chunk:
            view.apply(partial_from_json(json.loads(partial.value)))
        writes += checkpoint.commit(view.changed_records(), {"partials": chunk[-1].offset + 1})
    return writes


def view_of(writes: Iterable[Write]) -> dict[str, Any]:
    view = LoopView.from_records(CONFIG, restored_values(writes).items())
    return {"snapshot": view.snapshot(T0 + 600_000), "unresolved": view.unresolved(T0 + 600_000)}


@pytest.mark.parametrize("seed", [4, 5])
def test_stage2_crash_at_every_write_recovers_the_uninterrupted_view(seed: int) -> None:
    messages = [m for batch in run_stage1({}, make_events(seed), size=4).sent for m in batch]
    full = run_stage2({}, messages, size=3)
    expected = view_of(full)
    assert expected == stage2_snapshot(messages)
    for cut in range(len(full) + 1):
        durable = full[:cut]
        assert view_of(durable + run_stage2(apply_writes(durable), messages, size=3)) == expected


@pytest.mark.parametrize("held", [(), ("c/",)])
def test_a_deleted_record_ends_as_a_tombstone_held_or_not(held: tuple[str, ...]) -> None:
    """A record deleted is first an envelope with no value (it can still be rolled back), and
    a tombstone once its batch is checkpointed, so that compaction removes the key: whether the
    store keeps the record or its caller holds it, and across a restart in between."""
    store: dict[bytes, Any] = {}
    checkpoint = Checkpoint(store, "0/", held)
    before = {"c/a": None} if held else None
    checkpoint.commit({"c/a": {"n": 1}}, {"t": 1}, before)
    before = {"c/a": b'{"n":1}'} if held else None
    deleted = checkpoint.commit({"c/a": None}, {"t": 2}, before)
    assert deleted[0] == (b"0/c/a", b'{"g":2,"v":null,"p":{"n":1}}')
    assert checkpoint.commit({}, {"t": 3})[0] == (b"0/c/a", None)
    restarted = Checkpoint(apply_writes(deleted), "0/", held)  # the changelog after batch 2
    assert restarted.values == {}
    assert restarted.commit({}, {"t": 3})[0] == (b"0/c/a", None)


@pytest.mark.parametrize("held", [(), ("c/",)])
def test_a_record_new_in_an_unfinished_batch_is_rolled_back_to_a_tombstone(
    held: tuple[str, ...],
) -> None:
    """A record first written by a batch whose marker never landed did not exist at the last
    marker: restored, it is gone, and the next batch deletes it from the changelog too (a
    restart that does not write it again must not find it as of a later marker)."""
    store: dict[bytes, Any] = {}
    Checkpoint(store, "0/", held).commit({}, {"t": 1})  # marker 1
    store[b"0/c/new"] = encode_envelope(2, b'{"n":1}', None)  # batch 2 cut before its marker
    checkpoint = Checkpoint(store, "0/", held)
    assert checkpoint.values == {} and checkpoint.generation == 3
    writes = checkpoint.commit({}, {"t": 2}, {} if held else None)
    assert writes[0] == (b"0/c/new", None)
    assert b"0/c/new" not in store


def test_envelopes_written_with_nan_by_earlier_versions_still_restore() -> None:
    """Before pipeline.fastjson, envelopes were written with the standard library, which
    writes NaN; msgspec refuses it, so such an envelope is read the old way."""
    old = b'{"g":2,"v":{"x":NaN,"n":[1]},"p":null}'
    store: dict[bytes, Any] = {b"0/k": old, b"0/~checkpoint": b'{"g":2,"offsets":{"t":5}}'}
    checkpoint = Checkpoint(store, "0/")
    assert checkpoint.values["k"]["n"] == [1] and checkpoint.values["k"]["x"] != 0.0
    assert str(checkpoint.values["k"]["x"]) == "nan"
    assert checkpoint.offsets == {"t": 5} and checkpoint.generation == 3


def test_unapplied_takes_each_offset_once_from_the_checkpointed_offsets_on() -> None:
    store: dict[bytes, Any] = {}
    checkpoint = Checkpoint(store, "0/")
    checkpoint.commit({}, {"inputs": 10, "resolutions": 3})
    handed = [  # one partition's batch, as a fetch path that hands records over twice makes it
        *(Partial("inputs", n, "") for n in (8, 9, 10, 11, 12)),
        *(Partial("resolutions", n, "") for n in (3, 4)),
        *(Partial("inputs", n, "") for n in (12, 13)),  # 12 again: the last record read
        *(Partial("inputs", n, "") for n in (9, 10, 11, 14)),  # a range again, then more
        Partial("eval-results", 0, ""),  # a topic the checkpoint has no offset of yet
        Partial("inputs", 11, ""),  # and one more time, last
    ]
    fresh = [(p.topic, p.offset) for p in checkpoint.unapplied(handed)]
    assert fresh == [
        ("inputs", 10),
        ("inputs", 11),
        ("inputs", 12),
        ("resolutions", 3),
        ("resolutions", 4),
        ("inputs", 13),
        ("inputs", 14),
        ("eval-results", 0),
    ]
    # the batch's checkpoint goes on after the highest offset of each topic, not the last one
    assert next_offsets(handed) == {"inputs": 15, "resolutions": 5, "eval-results": 1}


def test_state_written_in_a_newer_format_is_refused_not_misread() -> None:
    """A marker says which format its state was written in; a worker that knows only older
    ones stops (pipeline.formats) rather than restoring what it would misread."""
    store: dict[bytes, Any] = {}
    checkpoint = Checkpoint(store, "0/")
    checkpoint.commit({"a": {"n": 1}}, {"source": 1})
    marker = json.loads(store[b"0/" + MARKER.encode()])
    assert marker["v"] == FORMAT_VERSION
    assert Checkpoint(store, "0/").values == {"a": {"n": 1}}
    store[b"0/" + MARKER.encode()] = json.dumps({**marker, "v": FORMAT_VERSION + 1}).encode()
    with pytest.raises(NewerFormat, match=r"format 2 by a newer loopline; this worker reads"):
        Checkpoint(store, "0/")
    del marker["v"]  # written before markers carried a version: format 1
    store[b"0/" + MARKER.encode()] = json.dumps(marker).encode()
    assert Checkpoint(store, "0/").values == {"a": {"n": 1}}


def test_a_stage_1_message_in_a_newer_format_is_refused_not_misread() -> None:
    core = PartitionCore(CoreConfig())
    record = {"event_id": "i1", "case_id": "c1", "loop": "refunds", "ts": 10_000}
    core.process("inputs", "c1", {**record, "source": "test"})
    core.process("eval-cases", "e1", {"eval_case_id": "e1", "loop": "refunds", "ts": 0})
    messages = [json.loads(encode_change(change)) for change in core.drain()]
    assert {m["kind"] for m in messages} == {"partial", "eval_case"}
    for message in messages:
        assert message["v"] == FORMAT_VERSION
        partial_from_json(message)  # read as it is
        del message["v"]
        partial_from_json(message)  # written before messages carried a version
        with pytest.raises(NewerFormat, match="a stage-1 message written in format 2"):
            partial_from_json({**message, "v": FORMAT_VERSION + 1})
