"""The size caps of feature summaries: what a bucket's partial and checkpoint record can hold."""

from __future__ import annotations

import json
from collections import Counter
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import features, sketch
from pipeline.drift import Baseline
from pipeline.fastjson import dumps
from pipeline.features import (
    CATEGORY_BYTES,
    EMBEDDING_DIMS,
    FEATURES_BYTES,
    OTHER,
    FeatureStats,
    NumericSummary,
    category_bytes,
    feature_values,
)
from pipeline.sketch import SignedSketch


def _stats(records: list[dict[str, object]]) -> FeatureStats:
    stats = FeatureStats()
    for record in records:
        stats.add_record(record)
    return stats


def test_category_bytes_bound_the_counts_json_whatever_the_encoder() -> None:
    # ["ab","é\n"] as ASCII-only JSON: 2 + 4 + 1 + 10 ("\u00e9\n" quoted) = 17, plus 11 a value
    counts = Counter({"ab": 3, "é\n": 1234567890})
    assert category_bytes(counts) == 17 + 22
    assert len(dumps(counts)) <= category_bytes(counts)
    assert len(json.dumps(counts, separators=(",", ":"))) <= category_bytes(counts)
    assert category_bytes(Counter()) == 2


def test_a_categorical_feature_past_its_bytes_folds_like_past_its_values() -> None:
    # Each 5-character value weighs 7 (quoted) + 1 (comma) + 11 = 19; with 100 bytes allowed,
    # four values weigh 2 + 4 * 19 - 1 = 77 and five 96: the sixth makes 115 and folds them.
    records = [{"channel": f"ch-{n:02d}"} for n in range(6)]
    with mock.patch.object(features, "CATEGORY_BYTES", 100):
        five, six = _stats(records[:5]).normalize(), _stats(records).normalize()
        baseline = Baseline(feature_values(r) for r in records)
    assert five.categorical["channel"] == {f"ch-{n:02d}": 1 for n in range(5)}
    assert six.categorical["channel"] == {OTHER: 6} and "channel" in six.folded
    assert baseline.categorical["channel"] == {OTHER: 6}  # the eval set folds alike
    with mock.patch.object(features, "CATEGORY_BYTES", 100):
        six.add_record({"channel": "x"})  # folded for good, as past CATEGORY_VALUES
    assert six.categorical["channel"] == {OTHER: 7}


def test_a_map_past_its_weight_folds_into_one_feature() -> None:
    # attributes a and b: {"1","2"} each weigh 2 + 2 * (3 + 1 + 11) - 1 = 31, together 62;
    # with 70 allowed, c's one value (2 + 3 + 11 = 16) makes 78: the map folds.
    two = [{"attributes": {"a": "1", "b": "1"}}, {"attributes": {"a": "2", "b": "2"}}]
    with mock.patch.object(features, "MAP_BYTES", 70):
        kept = _stats(two).normalize()
        folded = _stats([*two, {"attributes": {"c": "1"}}]).normalize()
        baseline = Baseline(feature_values(r) for r in [*two, {"attributes": {"c": "1"}}])
    assert kept.categorical == {"attributes.a": {"1": 1, "2": 1}, "attributes.b": {"1": 1, "2": 1}}
    assert folded.categorical == {"attributes.other": {OTHER: 5}}
    assert baseline.categorical == {"attributes.other": {OTHER: 5}}
    # A folded attribute weighs CATEGORY_BYTES + 1, however few values it held.
    with mock.patch.object(features, "CATEGORY_VALUES", 1):
        one = _stats([{"attributes": {"id": v}} for v in "xy"]).normalize()
    assert "attributes.id" in one.folded and one.categorical["attributes.id"] == {OTHER: 2}
    with mock.patch.object(features, "MAP_BYTES", CATEGORY_BYTES):
        assert FeatureStats.from_json(one.to_json()).categorical == {"attributes.other": {OTHER: 2}}


def test_numbers_past_their_map_weight_fold_into_features_other() -> None:
    # Exact values weigh 36 each: x with 3 values and y with 2 weigh 180; with 150 allowed the
    # map folds and features.other holds all five values.
    records = [{"features": {"x": float(n)}} for n in range(3)]
    records += [{"features": {"y": 10.0}}, {"features": {"y": 11.0}}]
    with mock.patch.object(features, "MAP_BYTES", 150):
        stats = _stats(records).normalize()
        baseline = Baseline(feature_values(r) for r in records)
    assert list(stats.numeric) == ["features.other"]
    assert sorted(stats.numeric["features.other"].points()) == [
        (0.0, 1),
        (1.0, 1),
        (2.0, 1),
        (10.0, 1),
        (11.0, 1),
    ]
    assert baseline.numeric["features.other"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert "features.x" not in baseline.numeric


def test_a_sketch_keeps_its_largest_bins_and_every_count() -> None:
    values = [10.0**k for k in range(-6, 7)] + [-(10.0**k) for k in range(4)] + [0.0]
    whole = SignedSketch()
    for v in values:
        whole.add(v)
    with mock.patch.object(sketch, "SKETCH_BINS", 5):
        assert whole.collapse()
    positive = sorted({sketch._MAPPING.key(10.0**k) for k in range(-6, 7)})
    # the 5 largest keys stay; the 8 below them add to the smallest of those
    assert sorted(whole.positive) == positive[-5:]
    assert whole.positive[positive[-5]] == 1 + 8
    assert len(whole.negative) == 4 and whole.zero == 1  # 4 bins: under the cap
    assert sum(whole.positive.values()) + sum(whole.negative.values()) + whole.zero == len(values)


def test_embeddings_past_their_length_and_lengths_past_two_are_left_out() -> None:
    long = [1.0] * (EMBEDDING_DIMS + 1)
    assert feature_values({"embedding": long}).embedding is None
    assert _stats([{"embedding": long}]).embedding == {}
    stats = _stats([{"embedding": [1.0] * n} for n in (5, 2, 3, 2)]).normalize()
    assert sorted(stats.embedding) == [2, 3]
    assert stats.embedding[2][1] == 2
    baseline = Baseline(feature_values({"embedding": [1.0] * n}) for n in (5, 2, 3))
    assert sorted(baseline.embedding) == [2, 3]


_RECORDS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "channel": st.sampled_from(["web", "email", "chat", "phone-with-a-long-name"]),
            "attributes": st.dictionaries(
                st.sampled_from("abcd"), st.sampled_from(["x", "yy", "zzzz", "é\t"]), max_size=3
            ),
            "features": st.dictionaries(
                st.sampled_from("pq"),
                st.one_of(st.integers(-3, 3), st.sampled_from([1e-9, 1e-3, 1.0, 1e3, -1e6])),
                max_size=2,
            ),
            "embedding": st.lists(st.sampled_from([0.5, 1.0, -2.0]), min_size=1, max_size=4),
        },
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(records=_RECORDS, parts=st.integers(1, 4), seed=st.integers(0, 1000))
def test_the_size_caps_do_not_depend_on_how_inputs_were_split_and_merged(
    records: list[dict[str, object]], parts: int, seed: int
) -> None:
    """With small caps, the normalized one-pass summary equals the normalized merge of
    normalized parts (through JSON, in any order), as partitions, buckets and workers make it."""
    caps = {"CATEGORY_BYTES": 40, "MAP_BYTES": 90, "EXACT_VALUES": 3}
    with mock.patch.multiple(features, **caps), mock.patch.object(sketch, "SKETCH_BINS", 3):
        rng = np.random.default_rng(seed)
        owner = rng.integers(0, parts, len(records))
        pieces = [
            _stats([r for r, o in zip(records, owner, strict=True) if o == p]).to_json()
            for p in range(parts)
        ]
        merged = FeatureStats()
        for k in rng.permutation(parts):
            merged.merge(FeatureStats.from_json(pieces[k]))
        merged.normalize()
        whole = _stats(records).normalize()
        assert merged.categorical == whole.categorical
        assert merged.folded == whole.folded and merged.folded_maps == whole.folded_maps
        assert sorted(merged.numeric) == sorted(whole.numeric)
        for name, summary in whole.numeric.items():
            assert sorted(merged.numeric[name].points()) == sorted(summary.points())
        assert {n: c for n, (_, c) in merged.embedding.items()} == {
            n: c for n, (_, c) in whole.embedding.items()
        }


def _escaped(n: int, width: int = 100) -> str:
    """A distinct value of ``width`` characters that JSON writes at six bytes a character."""
    return f"{n:06d}" + "\x01" * (width - 6)


def _fill(counts: Counter[str], start: int, room: int) -> int:
    """Add escaped values to ``counts`` while its weight stays within ``room``; returns the
    next value's number."""
    while len(counts) < features.CATEGORY_VALUES:
        value = _escaped(start)
        counts[value] = 1_000_000_000
        if category_bytes(counts) > room:
            del counts[value]
            return start
        start += 1
    return start


def test_the_largest_summary_stays_within_features_bytes() -> None:
    """Every part just under its cap, with the longest keys and values JSON can be made to
    write: three categorical features at CATEGORY_BYTES; 100 attributes (keys of 100 escaped
    characters) and 100 numbers together just under MAP_BYTES each; tokens with SKETCH_BINS
    bins a sign; two embeddings of about EMBEDDING_DIMS."""
    stats = FeatureStats()
    n = 0
    for name in ("channel", "category", "language"):
        stats.categorical[name] = Counter()
        n = _fill(stats.categorical[name], n, CATEGORY_BYTES)
    keys = [_escaped(k) for k in range(features.KEYS_PER_MAP)]
    for key in keys:
        stats.categorical["attributes." + key] = Counter()
    weight = 0
    for key in keys:  # each attribute its share of the map's weight
        counts = stats.categorical["attributes." + key]
        n = _fill(counts, n, (features.MAP_BYTES - weight) // (len(keys) - keys.index(key)))
        weight += category_bytes(counts)
    stats.numeric["tokens"] = NumericSummary(
        sketch=SignedSketch(
            Counter({k: 1_000_000_000 for k in range(-35_000, -35_000 + sketch.SKETCH_BINS)}),
            Counter({k: 1_000_000_000 for k in range(-35_000, -35_000 + sketch.SKETCH_BINS)}),
            1_000_000_000,
        )
    )
    per_number = (features.MAP_BYTES // len(keys) - 16) // features.NUMBER_BYTES
    per_number = [per_number] * (len(keys) - 1)  # and the last one what room is left
    per_number.append((features.MAP_BYTES - 16 - sum(36 * v + 16 for v in per_number)) // 36)
    for k, key in enumerate(keys):
        values = [
            -1.2345678901234567e-300 * (1 + (k * 1000 + v) / 1e6) for v in range(per_number[k])
        ]
        stats.numeric["features." + key] = NumericSummary(Counter(dict.fromkeys(values, 10**9)))
    longest = -1.2345678901234567e-300
    stats.embedding = {d: ([longest] * d, 10**9) for d in (EMBEDDING_DIMS, EMBEDDING_DIMS - 1)}
    before = stats.to_json()
    assert not stats.folded and not stats.folded_maps  # just under every cap: nothing folded
    assert len(stats.numeric) == 101 and len(stats.categorical) == 103
    assert len(dumps(before)) <= FEATURES_BYTES, len(dumps(before))
    # A value more in each map folds it, and the summary is far smaller.
    stats.add_record({"attributes": {keys[0]: _escaped(n)}, "features": {keys[0]: 1.5}})
    after = dumps(stats.to_json())
    assert stats.folded_maps == {"attributes.", "features."}
    assert len(after) < len(dumps(before)) / 2


def test_map_keys_alike_in_their_first_100_characters_are_one_feature_on_both_sides() -> None:
    """Two keys of one record that agree in their first CATEGORY_CHARS count once, with the
    last value, for inputs (add_record) as for eval cases (feature_values)."""
    long = "k" * features.CATEGORY_CHARS
    record = {
        "attributes": {long + "1": "a", long + "2": "b"},
        "features": {long + "1": 1.0, long + "2": 2.0, long + "3": float("nan")},
    }
    stats = _stats([record])
    assert stats.categorical == {"attributes." + long: {"b": 1}}
    assert stats.numeric["features." + long].points() == [(2.0, 1)]
    values = feature_values(record)
    assert values.categorical == {"attributes." + long: "b"}
    assert values.numeric == {"features." + long: 2.0}
