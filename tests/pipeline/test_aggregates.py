"""The fold of input categories: bounded, and the same whatever the partitions and merges."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import aggregates
from pipeline.aggregates import FOLDED_CATEGORIES, INPUT_CATEGORIES, Aggregate
from pipeline.core import CoreConfig, to_ms
from pipeline.fastjson import dumps, loads
from pipeline.loopview import LoopView, partial_from_json
from pipeline.partials import EvalCaseChange, encode_change
from pipeline.partition import PartitionCore
from pipeline.processor import partition_key
from pipeline.topics import STATE_MESSAGE_BYTES

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _first(categories: set[str], keep: int) -> set[str]:
    """The reference: the ``keep`` categories first by BLAKE2b-64 of their UTF-8, then name."""

    def order(c: str) -> tuple[bytes, str]:
        return hashlib.blake2b(c.encode("utf-8", "surrogatepass"), digest_size=8).digest(), c

    return set(sorted(categories, key=order)[:keep])


def _reference(inputs: list[str], covered: set[str], keep: int) -> tuple[Counter[str], Any]:
    kept = _first({c for c in inputs if c}, keep)
    counts = Counter(c for c in inputs if not c or c in kept)
    folded = sum(1 for c in inputs if c and c not in kept)
    if folded:
        counts[FOLDED_CATEGORIES] = folded
    categorised = sum(1 for c in inputs if c)
    uncovered = sum(1 for c in inputs if c and (c not in covered or c not in kept))
    return counts, uncovered / categorised if categorised else None


def _through_json(aggregate: Aggregate) -> Aggregate:
    return Aggregate.from_json(loads(dumps(aggregate.counts_json())))


_NAMES = st.sampled_from(["", "a", "b", "c", "d", "e", "f", "g", "é", "\ud800", "x" * 100])


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.lists(_NAMES, max_size=60),
    covered=st.sets(_NAMES),
    parts=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_folded_categories_do_not_depend_on_how_inputs_were_split_and_merged(
    inputs: list[str], covered: set[str], parts: int, seed: int
) -> None:
    """With a cap of 3 (folding past 5), parts counted apart, sent as JSON and merged in any
    order (some in pairs first, as buckets roll up) hold the reference's counts, and their
    uncovered ratio is the reference's: a folded category's inputs count as uncovered."""
    with mock.patch.multiple(aggregates, INPUT_CATEGORIES=3, _SPARE_CATEGORIES=5):
        rng = np.random.default_rng(seed)
        owner = rng.integers(0, parts, len(inputs))
        pieces = []
        for p in range(parts):
            piece = Aggregate()
            for category, o in zip(inputs, owner, strict=True):
                if o == p:
                    piece.add_input(category)
            pieces.append(_through_json(piece))
        order = [int(k) for k in rng.permutation(parts)]
        if len(order) > 2:  # two of them merged first
            pair = Aggregate.merged([pieces[order[0]], pieces[order[1]]])
            order = order[2:]
            pieces.append(_through_json(pair))
            order.append(len(pieces) - 1)
        total = Aggregate.merged(pieces[k] for k in order)
        expected_counts, expected_ratio = _reference(inputs, covered, 3)
        assert total.numbers(0.0, frozenset(covered))["uncovered_ratio"] == expected_ratio
        assert Counter(total.counts_json()["inputs"]) == expected_counts


def test_a_hand_case_folds_the_categories_after_the_third_by_their_hash() -> None:
    """Five categories, a cap of 3: by BLAKE2b-64, 'e' (10d8...), 'c' (373f...) and 'a'
    (40f8...) come first; 'b' (8472...) and 'd' (b5a5...) fold, and their inputs count as
    uncovered, 'd''s too, though the eval set covers it."""
    with mock.patch.multiple(aggregates, INPUT_CATEGORIES=3, _SPARE_CATEGORIES=5):
        aggregate = Aggregate()
        for category in ["a", "a", "b", "c", "c", "c", "d", "e", "", ""]:
            aggregate.add_input(category)
        # 'a' and 'd' are covered; categorised 8; uncovered: c, c, c, e and the folded b, d.
        assert aggregate.numbers(0.0, frozenset({"a", "d"}))["uncovered_ratio"] == 6 / 8
        assert aggregate.inputs == Counter({"a": 2, "c": 3, "e": 1, "": 2, FOLDED_CATEGORIES: 2})


def test_merging_many_parts_holds_the_spare_at_most() -> None:
    """Windows merge hundreds of buckets: the merge folds as it goes, not only at the end."""
    with mock.patch.multiple(aggregates, INPUT_CATEGORIES=3, _SPARE_CATEGORIES=5):
        total = Aggregate()
        for part in range(20):
            total.merge(Aggregate(inputs=Counter({f"{part}-{k}": 1 for k in range(3)})))
            assert len(total.inputs) <= 5 + 1  # the spare and the folded key
        assert sum(total.inputs.values()) == 60
        assert len(total.counts_json()["inputs"]) == 3 + 1


def _input(n: int, category: str, seconds: int) -> dict[str, Any]:
    return {
        "event_id": f"i{n}",
        "case_id": f"case-{n}",
        "loop": "refunds",
        "ts": to_ms(START) + seconds * 1000,
        "source": "s",
        "category": category,
    }


def test_an_id_in_category_folds_in_every_bucket_partial_and_window_alike() -> None:
    """5,000 distinct categories in one bucket, over two partitions: what each partition keeps
    and sends is bounded, and stage 2's numbers equal one partition's and the reference's."""
    records = [_input(n, f"order-{n:05d}", 3 + n % 5) for n in range(5000)]
    covered = {f"order-{n:05d}" for n in range(0, 5000, 7)}
    config = CoreConfig()

    def run(partitions: int) -> tuple[dict[str, Any], list[int], list[bytes]]:
        cores = [PartitionCore(config, partition=p) for p in range(partitions)]
        view = LoopView(config)
        for n, category in enumerate(sorted(covered)):
            view.apply(EvalCaseChange("refunds", f"ec{n}", category))
        messages = []
        for n, record in enumerate(records):
            cores[n % partitions].process("inputs", partition_key("inputs", record), record)
        held = [len(bucket.inputs) for core in cores for bucket in core.buckets.values()]
        for core in cores:
            for change in core.drain():
                messages.append(encode_change(change))
                view.apply(partial_from_json(loads(messages[-1])))
        return view.snapshot(view.default_as_of()), held, messages

    one, _, _ = run(1)
    two, held, messages = run(2)
    assert two == one
    # Each partition's bucket held its spare at most, and the folded key, before it was sent.
    assert len(held) == 2 and max(held) <= 2 * INPUT_CATEGORIES + 1, held
    for message in messages:
        (entry,) = loads(message)["buckets"]
        assert len(entry[1]["inputs"]) == INPUT_CATEGORIES + 1
    _, ratio = _reference([r["category"] for r in records], covered, INPUT_CATEGORIES)
    assert ratio is not None and 0.8 < ratio < 1.0  # some covered ones are kept
    assert two["loops"]["refunds"]["windows"]["5m"]["uncovered_ratio"] == ratio


def test_the_largest_categories_stay_well_within_a_state_message() -> None:
    """INPUT_CATEGORIES categories of 100 characters that JSON writes at 12 bytes each (a lone
    surrogate sends the encoder to ASCII-only JSON): a bucket's counts take ~1.16 MB, and a
    checkpoint record, holding them twice next to no features, stays within the limit with
    room for the input features' own records (FEATURES_BYTES each, apart: "f/" records)."""
    aggregate = Aggregate()
    for n in range(INPUT_CATEGORIES + 500):
        aggregate.inputs[f"{n:05d}\ud800" + "\U0001f600" * 94] = 10**15
    encoded = dumps(aggregate.counts_json())
    assert len(aggregate.inputs) == INPUT_CATEGORIES + 1
    # Each kept one: 5 digits, 6 for the surrogate, 94 * 12, two quotes, a colon, 16 digits
    # and a comma: 1,159 bytes; then the folded key and the other fields.
    assert INPUT_CATEGORIES * 1159 < len(encoded) < INPUT_CATEGORIES * 1159 + 400, len(encoded)
    assert 2 * len(encoded) < STATE_MESSAGE_BYTES / 3
