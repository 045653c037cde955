"""OpenBuckets: windows over the open partials, with per-minute merges cached, give exactly the
merge of the buckets inside the window however buckets were put, replaced and closed."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.aggregates import Aggregate
from pipeline.openbuckets import OpenBuckets

SIZE = 10_000  # 10 s buckets: six to a cached minute


def aggregate(resolved: int, cost: int, latency: float) -> Aggregate:
    made = Aggregate(cost_nano_usd=cost, inputs=Counter({"billing": resolved}))
    made.resolutions[("SYSTEM", "RESOLVED")] = resolved
    made.latency.add(latency, resolved)
    return made


def test_a_window_of_whole_minutes_and_cut_edges_by_hand() -> None:
    open_ = OpenBuckets(SIZE)
    # Minute 0 holds buckets 0-5, minute 1 buckets 6-11. Two partitions share bucket 3.
    open_.put((0, 3), aggregate(1, 10, 1.0))
    open_.put((1, 3), aggregate(2, 20, 1.0))
    open_.put((0, 5), aggregate(4, 40, 2.0))
    open_.put((1, 7), aggregate(8, 80, 3.0))
    open_.put((0, 11), aggregate(16, 160, 4.0))
    # (0, 120 s]: both minutes whole, every bucket: 1 + 2 + 4 + 8 + 16 = 31, cost 310.
    whole = Aggregate.merged(open_.inside(0, 120_000), features=False)
    assert (whole.resolved, whole.cost_nano_usd) == (31, 310)
    # (40 s, 110 s]: buckets 4..10 (bucket k covers (10k, 10k + 10] s): 5 and 7 only = 12.
    cut = Aggregate.merged(open_.inside(40_000, 110_000), features=False)
    assert (cut.resolved, cut.cost_nano_usd) == (12, 120)
    # Replacing bucket (0, 3) (a newer cumulative partial) changes the cached minute 0.
    assert Aggregate.merged(open_.inside(0, 60_000), features=False).resolved == 7
    open_.put((0, 3), aggregate(5, 50, 1.0))
    assert Aggregate.merged(open_.inside(0, 60_000), features=False).resolved == 11
    # Closing it takes it out of the cached minute too.
    open_.pop((0, 3))
    assert Aggregate.merged(open_.inside(0, 60_000), features=False).resolved == 6
    assert sorted(open_.below(0, 11)) == [(0, 5)]
    assert sorted(open_.below(1, 8)) == [(1, 3), (1, 7)]


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(0, 3),  # partition
            st.integers(0, 40),  # bucket index
            st.integers(0, 50),  # resolved
            st.floats(0.001, 100.0),  # latency seconds
        ),
        st.tuples(st.just("pop"), st.integers(0, 3), st.integers(0, 40)),
        st.tuples(st.just("window"), st.integers(-3, 42), st.integers(0, 45)),  # first, buckets
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_windows_equal_the_merge_of_the_buckets_inside(ops: list[tuple[object, ...]]) -> None:
    open_ = OpenBuckets(SIZE)
    plain: dict[tuple[int, int], Aggregate] = {}  # the reference: no groups, no cache
    for op in ops:
        if op[0] == "put":
            _, partition, index, resolved, latency = op
            assert isinstance(partition, int) and isinstance(index, int)
            assert isinstance(resolved, int) and isinstance(latency, float)
            made = aggregate(resolved, 7 * resolved, latency)
            open_.put((partition, index), made)
            plain[(partition, index)] = made
        elif op[0] == "pop":
            key = (op[1], op[2])
            assert isinstance(key[0], int) and isinstance(key[1], int)
            if key in plain:
                assert open_.pop(key) is plain.pop(key)
        else:
            first, count = op[1], op[2]
            assert isinstance(first, int) and isinstance(count, int)
            start, end = first * SIZE, (first + count) * SIZE
            expected = Aggregate.merged(
                (a for (_, i), a in plain.items() if start <= i * SIZE and (i + 1) * SIZE <= end),
                features=False,
            )
            got = Aggregate.merged(open_.inside(start, end), features=False)
            assert got.counts_json() == expected.counts_json()
            near = {i for i, _ in open_.overlapping(start, end)}
            assert {i for (_, i) in plain if start <= i * SIZE < end} <= near
            minute = 6 * SIZE  # and no more than the minutes the window touches
            assert near == {
                i for (_, i) in plain if i // 6 * minute < end and (i // 6 + 1) * minute > start
            }
        assert len(open_) == len(plain)
        for partition in range(4):
            assert sorted(open_.below(partition, 20)) == sorted(
                k for k in plain if k[0] == partition and k[1] < 20
            )
