"""A batch's input features added from Arrow at once: exactly the summary that adding each
decoded record with FeatureStats.add_record gives, folds, float sums and fallbacks included."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.arrowcodec import ArrowDecoder
from pipeline.codec import Codec
from pipeline.core import CoreConfig
from pipeline.featurecolumns import FEATURE_ROW, InputColumns
from pipeline.features import CATEGORY_CHARS, KEYS_PER_MAP, OTHER, FeatureStats
from pipeline.partition import PartitionCore
from tests.sinks.factories import at, input_event

CODEC = Codec.load()
FULL = ArrowDecoder(CODEC)
LIGHT = ArrowDecoder(CODEC, light_inputs=True)


def _input(n: int, **fields: Any) -> dict[str, Any]:
    """An InputEvent with no features but ``fields``."""
    empty: dict[str, Any] = {
        **dict.fromkeys(("channel", "category", "language", "text", "embedding", "tokens")),
        "features": {},
        "attributes": {},
    }
    ts = fields.pop("ts", at(1, n))
    return input_event(f"e{n}", f"c{n}", ts, **{**empty, **fields})


def _decoded(records: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """The records through the codec: (full rows, light rows) as stage 1 decodes them."""
    values = [CODEC.encode("InputEvent", record) for record in records]
    full, light = FULL.rows("InputEvent", values), LIGHT.rows("InputEvent", values)
    assert all(FEATURE_ROW in row for row in light), "the batch went through Arrow"
    return full, light


def _both(records: list[dict[str, Any]], split: int = 0) -> tuple[FeatureStats, FeatureStats]:
    """The records' summary by add_record, and by columns (in two calls, at ``split``)."""
    full, light = _decoded(records)
    one_by_one = FeatureStats()
    for row in full:
        one_by_one.add_record(row)
    columns = light[0][FEATURE_ROW][0]
    at_once = FeatureStats()
    rows = [row[FEATURE_ROW][1] for row in light]
    for part in (rows[:split], rows[split:]):
        if part:
            columns.add_to(at_once, part)
    return one_by_one, at_once


def test_a_hand_checked_batch() -> None:
    records = [
        _input(1, channel="chat", tokens=10, features={"x": 1.5}, embedding=[3.0, 4.0]),
        _input(2, channel="chat", attributes={"tier": "gold"}, embedding=[0.0, 2.0]),
        _input(3, channel="email", tokens=10, features={"x": math.inf}, embedding=[0.0, 0.0]),
    ]
    one_by_one, at_once = _both(records)
    assert at_once.categorical == {
        "channel": {"chat": 2, "email": 1},
        "attributes.tier": {"gold": 1},
    }
    assert {name: s.points() for name, s in at_once.numeric.items()} == {
        "tokens": [(10.0, 2)],
        "features.x": [(1.5, 1)],  # inf is left out
    }
    # (3, 4) / 5 + (0, 2) / 2; the zero vector has no direction and is left out
    assert at_once.embedding == {2: ([0.6, 1.8], 2)}
    assert at_once == one_by_one


def test_summing_in_two_calls_rounds_as_one_input_at_a_time() -> None:
    # Sums whose rounding depends on the order of additions: pairwise or blocked sums differ.
    records = [_input(n, embedding=[1.0 + n / 7, 1e-3 * n, 3.0]) for n in range(40)]
    for split in (0, 1, 17, 39):
        one_by_one, at_once = _both(records, split)
        assert at_once.embedding == one_by_one.embedding


def test_folds_past_the_caps_as_one_input_at_a_time() -> None:
    records = [
        _input(n, attributes={f"k{n}": "v", "tier": str(n % 3)}, features={"f": float(n)})
        for n in range(KEYS_PER_MAP + 5)
    ]
    one_by_one, at_once = _both(records, split=60)
    assert at_once.categorical == {"attributes." + OTHER: {OTHER: 2 * len(records)}}
    assert at_once == one_by_one


def test_long_values_are_cut_and_long_keys_go_row_by_row() -> None:
    long = "é" * (CATEGORY_CHARS + 5)
    cut = "é" * CATEGORY_CHARS
    one_by_one, at_once = _both([_input(1, channel=long), _input(2, attributes={"a": long})])
    assert at_once.categorical == {"channel": {cut: 1}, "attributes.a": {cut: 1}}
    assert at_once == one_by_one
    # keys that agree in their first CATEGORY_CHARS are one feature, the row's last value kept
    keys = {long + "1": 1.0, long + "2": 2.0}
    one_by_one, at_once = _both([_input(1, features=keys), _input(2, features={"b": 3.0})])
    assert {name: s.points() for name, s in at_once.numeric.items()} == {
        "features." + cut: [(2.0, 1)],
        "features.b": [(3.0, 1)],
    }
    assert at_once == one_by_one


def test_a_key_twice_in_one_row_counts_once_with_its_last_value() -> None:
    # fastavro writes maps from dicts (no repeated key), but another writer can repeat one;
    # the codec then keeps the last value, and so must the columns.
    _, light = _decoded([_input(1), _input(2)])
    table = light[0][FEATURE_ROW][0].table
    attributes = pa.array(
        [[("tier", "gold"), ("tier", "silver")], [("tier", "gold")]],
        table.schema.field("attributes").type,
    )
    table = table.set_column(table.schema.get_field_index("attributes"), "attributes", attributes)
    stats = FeatureStats()
    InputColumns(table).add_to(stats, [0, 1])
    assert stats.categorical == {"attributes.tier": {"silver": 1, "gold": 1}}


@st.composite
def _records(draw: st.DrawFn) -> list[dict[str, Any]]:
    text = st.sampled_from(["a", "b", "é", "x" * (CATEGORY_CHARS + 1)])
    number = st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, 2.5, math.nan, math.inf]),
        st.floats(-1e6, 1e6),
    )
    vector = st.lists(st.floats(-10, 10, width=32), min_size=0, max_size=4)
    out = []
    for n in range(draw(st.integers(1, 30))):
        out.append(
            _input(
                n,
                channel=draw(st.none() | text),
                category=draw(st.none() | text),
                attributes=draw(st.dictionaries(st.sampled_from(["t", "r", "y" * 101]), text)),
                features=draw(st.dictionaries(st.sampled_from(["p", "q"]), number)),
                tokens=draw(st.none() | st.integers(0, 5)),
                embedding=draw(st.none() | vector),
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(records=_records(), data=st.data())
def test_any_batch_summarises_as_one_input_at_a_time(
    records: list[dict[str, Any]], data: Any
) -> None:
    split = data.draw(st.integers(0, len(records)))
    one_by_one, at_once = _both(records, split)
    assert at_once == one_by_one
    # as sent and checkpointed: the same values, in the same order within each feature (the
    # features themselves may come in another order, which nothing reads: drift sorts them)
    assert at_once.to_json() == one_by_one.to_json()


def test_the_core_adds_light_rows_before_a_bucket_closes() -> None:
    """A bucket closed mid-batch (the horizon passed) sends its final partial with the
    features of its inputs, whether they came as full rows or light ones."""
    config = CoreConfig()
    late = config.case_horizon_ms + 10 * config.bucket_ms
    records = [
        _input(1, channel="chat", embedding=[1.0, 0.0]),
        _input(2, channel="mail", embedding=[0.0, 1.0]),
        _input(3, channel="chat", ts=at(1, 3) + timedelta(milliseconds=late)),
    ]
    drained = []
    for rows in _decoded(records):
        core = PartitionCore(config)
        for row, record in zip(rows, records, strict=True):
            assert core.process("inputs", str(record["case_id"]), row) == "ok"
        partials = [change for change in core.drain() if hasattr(change, "buckets")]
        drained.append([partial.to_json() for partial in partials])
    full, light = drained
    first = full[0]["buckets"][0]
    assert first[2]["c"]["channel"] == {"chat": 1, "mail": 1}  # the closed bucket's
    assert light == full


def test_a_case_keeps_what_it_shows_of_a_large_input_from_a_light_row() -> None:
    """An input too large for its case to keep as it came is kept as the fields a candidate
    shows: from a light row, its whole record is read back from the columns."""
    records = [_input(1, text="t" * 5000, attributes={"tier": "gold"}, features={"x": 2.0})]
    values = [CODEC.encode("InputEvent", record) for record in records]
    kept = []
    for rows in _decoded(records):
        core = PartitionCore(CoreConfig())
        assert core.process("inputs", "c1", rows[0], values[0]) == "ok"
        kept.append(core.cases["c1"])
    full, light = kept
    assert full.inp_avro is None and full.inp is not None  # the large-input path
    assert '"attributes":{"tier":"gold"}' in full.inp
    assert light == full


def test_a_table_whose_features_cannot_be_read_is_decoded_one_by_one(monkeypatch: Any) -> None:
    """Reading the feature columns happens while the batch is decoded, where a failure still
    leaves the per-record codec (never at drain time, where it would stop the worker)."""
    records = [_input(1, channel="chat"), _input(2, tokens=3)]
    values = [CODEC.encode("InputEvent", record) for record in records]

    def broken(table: pa.Table) -> None:
        raise ValueError("unreadable")

    monkeypatch.setattr("pipeline.featurecolumns._Prepared", broken)
    rows = LIGHT.rows("InputEvent", values)
    assert [FEATURE_ROW in row for row in rows] == [False, False]
    assert rows == [CODEC.decode(value, expected="InputEvent").record for value in values]
