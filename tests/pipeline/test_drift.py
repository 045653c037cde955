"""Drift scores against scipy/numpy references computed here on the same data."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cosine, jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

from pipeline import features
from pipeline.drift import PSI_EPSILON, Baseline, DriftConfig, evaluate, feature_scores
from pipeline.features import (
    EXACT_VALUES,
    FeatureStats,
    FeatureValues,
    NumericSummary,
    feature_values,
)


def _psi_reference(window: np.ndarray, baseline: np.ndarray) -> float:
    w = np.clip(window, PSI_EPSILON, None)
    b = np.clip(baseline, PSI_EPSILON, None)
    return float(np.sum((w - b) * np.log(w / b)))


def _decile_props(values: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Bins (-inf, d1], (d1, d2], ..., (d9, inf) by counting explicitly, not with searchsorted.
    edges = sorted(set(np.quantile(baseline, np.linspace(0.1, 0.9, 9)).tolist()))

    def props(xs: np.ndarray) -> np.ndarray:
        counts = np.zeros(len(edges) + 1)
        for x in xs:
            counts[sum(1 for e in edges if x > e)] += 1
        return counts / len(xs)

    return props(values), props(baseline)


def _stats(records: list[dict[str, object]]) -> FeatureStats:
    stats = FeatureStats()
    for record in records:
        stats.add(feature_values(record))
    return stats


def _baseline(records: list[dict[str, object]]) -> Baseline:
    return Baseline(feature_values(r) for r in records)


def test_categorical_scores_match_scipy_and_the_psi_formula() -> None:
    rng = np.random.default_rng(1)
    cats = ["a", "b", "c", "d"]
    base = rng.choice(cats, size=400, p=[0.4, 0.3, 0.2, 0.1])
    now = rng.choice([*cats, "e"], size=300, p=[0.1, 0.2, 0.2, 0.2, 0.3])  # "e" is new
    scores = feature_scores(
        _stats([{"category": c} for c in now]), _baseline([{"category": c} for c in base]), 1
    )
    p = np.array([np.mean(now == c) for c in [*cats, "e"]])
    q = np.array([np.mean(base == c) for c in [*cats, "e"]])
    assert scores["category"]["js"] == pytest.approx(jensenshannon(p, q, base=2), abs=1e-6)
    assert scores["category"]["psi"] == pytest.approx(_psi_reference(p, q), abs=1e-6)
    assert set(scores["category"]) == {"js", "psi"}


def test_numeric_scores_exact_while_values_fit_the_exact_summary() -> None:
    rng = np.random.default_rng(2)
    base = np.round(rng.normal(50, 10, 300), 1)
    now = np.round(rng.normal(58, 12, 250), 1)
    stats = _stats([{"features": {"x": float(v)}} for v in now])
    assert stats.numeric["features.x"].is_exact
    scores = feature_scores(stats, _baseline([{"features": {"x": float(v)}} for v in base]), 1)
    got = scores["features.x"]
    assert got["wasserstein"] == pytest.approx(
        wasserstein_distance(now, base) / np.std(base), abs=1e-6
    )
    assert got["ks"] == pytest.approx(ks_2samp(now, base).statistic, abs=1e-6)
    assert got["psi"] == pytest.approx(_psi_reference(*_decile_props(now, base)), abs=1e-6)


def test_numeric_scores_within_the_sketch_bound_past_the_exact_summary() -> None:
    # 20,000 continuous values (> EXACT_VALUES distinct) are sketched: every value moves by at
    # most 1 %, so the normalised Wasserstein moves by at most 1 % of E|x| / std, KS and PSI by
    # at most the mass that lies within 1 % of a bin edge or baseline point (small here).
    rng = np.random.default_rng(3)
    base = rng.lognormal(4.0, 0.5, 1000)
    now = rng.lognormal(4.3, 0.6, 20_000)
    stats = _stats([{"tokens": float(v)} for v in now])
    assert not stats.numeric["tokens"].is_exact and len(set(now)) > EXACT_VALUES
    got = feature_scores(stats, _baseline([{"tokens": float(v)} for v in base]), 1)["tokens"]
    bound = 0.01 * np.mean(np.abs(now)) / np.std(base)
    assert abs(got["wasserstein"] - wasserstein_distance(now, base) / np.std(base)) <= bound
    assert got["ks"] == pytest.approx(ks_2samp(now, base).statistic, abs=0.01)
    assert got["psi"] == pytest.approx(_psi_reference(*_decile_props(now, base)), rel=0.05)


def test_embedding_distance_is_one_minus_cosine_of_mean_unit_vectors() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, (200, 6)) + 1.0
    now = rng.normal(0, 1, (150, 6)) + np.array([1, 1, 1, -1, -1, 0.5])
    stats = _stats([{"embedding": v.tolist()} for v in now])
    scores = feature_scores(stats, _baseline([{"embedding": v.tolist()} for v in base]), 1)

    def mean_unit(vectors: np.ndarray) -> np.ndarray:
        return np.mean(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), axis=0)

    expected = cosine(mean_unit(now), mean_unit(base))
    assert scores["embedding"]["embedding"] == pytest.approx(expected, abs=1e-6)


def test_merged_partials_give_the_scores_of_one_pass() -> None:
    rng = np.random.default_rng(5)
    records = [
        {"channel": str(rng.choice(["chat", "web"])), "tokens": int(rng.integers(10, 900))}
        for _ in range(3000)
    ]
    whole = _stats(records)
    parts = [_stats(records[i::3]) for i in range(3)]
    merged = FeatureStats()
    for part in reversed(parts):
        merged.merge(FeatureStats.from_json(part.to_json()))
    baseline = _baseline(records[:500])
    assert feature_scores(merged, baseline, 1) == feature_scores(whole, baseline, 1)


def test_a_numeric_summary_survives_json_and_a_change_after_it_is_encoded() -> None:
    summary = NumericSummary()
    for value in (1.5, 2.0, 1.5):
        summary.add(value)
    assert summary.to_json() == {"x": [1.5, 2.0], "n": [2, 1]}
    summary.add(-3.0)  # the encoding is cached until the next change
    assert summary.to_json() == {"x": [1.5, 2.0, -3.0], "n": [2, 1, 1]}
    assert NumericSummary.from_json(summary.to_json()) == summary
    # Checkpoints written before the flat encoding hold (value, count) pairs.
    old = NumericSummary.from_json({"v": [[1.5, 2], [2.0, 1], [-3.0, 1]]})
    assert old == summary
    old.merge(summary)
    assert old.points() == [(1.5, 4), (2.0, 2), (-3.0, 2)]


def test_min_samples_and_drift_share_decide_detection() -> None:
    base = [{"channel": "chat", "language": "en", "tokens": t} for t in range(100, 300)]
    # channel and tokens drift, language does not: 2 of 3 features.
    now = [{"channel": "web", "language": "en", "tokens": t} for t in range(500, 700)]
    stats, baseline = _stats(now), _baseline(base)
    result = evaluate(stats, baseline, DriftConfig(min_samples=200, drift_share=0.5))
    assert result["detected"] is True
    assert {n: f["drifted"] for n, f in result["features"].items()} == {
        "channel": True,
        "language": False,
        "tokens": True,
    }
    strict = DriftConfig(min_samples=200, drift_share=0.7)
    assert evaluate(stats, baseline, strict)["detected"] is False
    # Below min_samples nothing is evaluated, so nothing drifts.
    assert evaluate(stats, baseline, DriftConfig(min_samples=201)) == {
        "detected": False,
        "features": {},
    }
    # A per-feature threshold above the channel's scores takes it out of the drifted share.
    lenient = DriftConfig(min_samples=1, feature_thresholds={"channel": {"js": 2.0, "psi": 99.0}})
    assert evaluate(stats, baseline, lenient)["features"]["channel"]["drifted"] is False


def test_feature_names_follow_the_design() -> None:
    values = feature_values(
        {
            "channel": "chat",
            "category": None,
            "language": "de",
            "attributes": {"tier": "pro"},
            "features": {"v": 1.5, "bad": float("nan")},
            "tokens": 12,
            "embedding": [3.0, 4.0],
        }
    )
    assert values == FeatureValues(
        {"channel": "chat", "language": "de", "attributes.tier": "pro"},
        {"tokens": 12.0, "features.v": 1.5},
        (0.6, 0.8),
    )


def test_a_categorical_feature_past_its_cap_folds_into_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(features, "CATEGORY_VALUES", 3)
    stats = _stats([{"attributes": {"id": v}} for v in ["a", "b", "a", "c"]])
    assert stats.categorical["attributes.id"] == {"a": 2, "b": 1, "c": 1}  # 3 values: kept
    stats.add(feature_values({"attributes": {"id": "d"}}))
    assert stats.categorical["attributes.id"] == {"other": 5}  # the 4th value folds them all
    stats.add(feature_values({"attributes": {"id": "a"}}))
    assert stats.categorical["attributes.id"] == {"other": 6}
    restored = FeatureStats.from_json(stats.to_json())
    restored.add(feature_values({"attributes": {"id": "e"}}))
    assert restored.categorical["attributes.id"] == {"other": 7}
    # The baseline folds the same way, so a folded feature is compared like with like.
    baseline = _baseline([{"attributes": {"id": v}} for v in "abcd"])
    assert baseline.categorical["attributes.id"] == {"other": 4}


def _one_pass_and_split(
    records: list[dict[str, object]], parts: int, seed: int
) -> tuple[FeatureStats, FeatureStats]:
    """The records' summary in one pass, and merged (through JSON, in a random order) from a
    random split into ``parts``, as partitions, buckets and workers would make it."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, parts, len(records))
    pieces = [
        _stats([r for r, o in zip(records, owner, strict=True) if o == p]) for p in range(parts)
    ]
    merged = FeatureStats()
    for k in rng.permutation(parts):
        merged.merge(FeatureStats.from_json(pieces[k].to_json()))
    return _stats(records), merged


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=30),
    parts=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_folding_does_not_depend_on_how_inputs_were_split_and_merged(
    values: list[str], parts: int, seed: int
) -> None:
    """Folded exactly when the union of the values passes the cap: partitions, buckets and
    workers merged in any order give the one-pass result, and the one-pass result is the
    count of each value, or everything under "other" when there are more than the cap."""
    cap, records = 4, [{"channel": v} for v in values]
    with mock.patch.object(features, "CATEGORY_VALUES", cap):
        whole, merged = _one_pass_and_split(records, parts, seed)
    counts = {v: values.count(v) for v in set(values)}
    expected = counts if len(counts) <= cap else {"other": len(values)}
    assert whole.categorical["channel"] == expected
    assert merged.categorical.get("channel", {}) == expected


def test_map_keys_past_their_cap_fold_into_one_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer sending a new attribute (or features) key per input cannot grow the state:
    past KEYS_PER_MAP keys, all of one map fold into attributes.other / features.other."""
    monkeypatch.setattr(features, "KEYS_PER_MAP", 2)
    records: list[dict[str, object]] = [
        {"channel": "web", "attributes": {"a": "1"}, "features": {"x": 1.0}},
        {"attributes": {"a": "2", "b": "1"}, "features": {"x": 2.0, "y": 5.0}},
    ]
    stats = _stats(records)
    assert stats.categorical == {
        "channel": {"web": 1},
        "attributes.a": {"1": 1, "2": 1},
        "attributes.b": {"1": 1},
    }  # 2 keys: kept apart
    stats.add(feature_values({"attributes": {"c": "9"}, "features": {"z": 7.0}}))
    assert stats.categorical == {"channel": {"web": 1}, "attributes.other": {"other": 4}}
    assert sorted(stats.numeric) == ["features.other"]
    assert sorted(stats.numeric["features.other"].points()) == [
        (1.0, 1),
        (2.0, 1),
        (5.0, 1),
        (7.0, 1),
    ]
    stats.add(feature_values({"attributes": {"a": "3"}}))  # known or new, a key counts there
    assert stats.categorical["attributes.other"] == {"other": 5}
    assert FeatureStats.from_json(stats.to_json()) == stats
    baseline = _baseline([{"attributes": {k: "v"}, "features": {k: 1.5}} for k in "abc"])
    assert baseline.categorical == {"attributes.other": {"other": 3}}
    assert list(baseline.numeric) == ["features.other"]
    assert baseline.numeric["features.other"].tolist() == [1.5, 1.5, 1.5]


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.lists(st.sampled_from("abcdef"), max_size=3), min_size=1, max_size=12),
    parts=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_key_folding_does_not_depend_on_how_inputs_were_split_and_merged(
    keys: list[list[str]], parts: int, seed: int
) -> None:
    cap = 3
    records = [
        {"attributes": {k: k.upper() for k in ks}, "features": {k: float(len(k)) for k in ks}}
        for ks in keys
    ]
    with mock.patch.object(features, "KEYS_PER_MAP", cap):
        whole, merged = _one_pass_and_split(records, parts, seed)
    distinct = {k for ks in keys for k in ks}
    pairs = sum(len(set(ks)) for ks in keys)
    if len(distinct) > cap:
        expected = {"attributes.other": {"other": pairs}} if pairs else {}
    else:
        expected = {f"attributes.{k}": {k.upper(): sum(k in ks for ks in keys)} for k in distinct}
    assert whole.categorical == expected
    assert merged.categorical == expected
    assert sorted(merged.numeric) == sorted(whole.numeric)
    for name, summary in whole.numeric.items():
        assert sorted(merged.numeric[name].points()) == sorted(summary.points())


_NUMBERS = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40)
)


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "channel": st.sampled_from(["web", "email", None]),
                "category": st.sampled_from(["billing", "refunds", None]),
                "language": st.sampled_from(["en", "de"]),
                "attributes": st.one_of(
                    st.none(), st.dictionaries(st.sampled_from("abcd"), st.sampled_from("xyz"))
                ),
                "tokens": st.one_of(st.none(), st.integers(0, 5000)),
                "features": st.one_of(st.none(), st.dictionaries(st.sampled_from("pqr"), _NUMBERS)),
                "embedding": st.one_of(
                    st.none(),
                    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
                    st.lists(st.floats(-10, 10), min_size=2, max_size=2),
                ),
            },
        ),
        max_size=20,
    ),
    caps=st.tuples(st.integers(1, 4), st.integers(1, 3)),
)
def test_adding_a_record_is_adding_its_feature_values(
    records: list[dict[str, object]], caps: tuple[int, int]
) -> None:
    """Stage 1's shortcut (add_record) gives the summary of add(feature_values(record)),
    folding included, with missing and non-finite values left out alike."""
    with (
        mock.patch.object(features, "CATEGORY_VALUES", caps[0]),
        mock.patch.object(features, "KEYS_PER_MAP", caps[1]),
    ):
        shortcut, reference = FeatureStats(), _stats(records)
        for record in records:
            shortcut.add_record(record)
    assert shortcut == reference
    assert shortcut.to_json() == reference.to_json()
