"""Stage 2's open partial buckets, with the merge of each minute of them cached.

Every window a snapshot or an alert evaluation asks for merges the open partials inside it, and
until the case horizon has passed them that is every partition's buckets of the last hours
(with the defaults, 4 partitions x 720 buckets of 10 s per loop by the second hour). Most of
them no longer change: partials arrive for the newest buckets. So the buckets are grouped by
minute of event time, and a group's merge (counts only, as windows take them) is kept until one
of its buckets is replaced or closed: a 24h window merges ~120 cached groups plus the buckets of
the two groups its edges cut, however many partitions there are.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.aggregates import Aggregate
from pipeline.windows import MINUTE

Key = tuple[int, int]  # (partition, bucket index)


class OpenBuckets:
    def __init__(self, bucket_ms: int) -> None:
        self.bucket_ms = bucket_ms
        self.per_group = max(MINUTE // bucket_ms, 1)
        self._buckets: dict[Key, Aggregate] = {}
        self._groups: dict[int, set[Key]] = {}  # group -> the open keys in it
        self._merged: dict[int, Aggregate] = {}  # group -> merge of its buckets, while valid

    def __len__(self) -> int:
        return len(self._buckets)

    def __getitem__(self, key: Key) -> Aggregate:
        return self._buckets[key]

    def get(self, key: Key) -> Aggregate | None:
        return self._buckets.get(key)

    def items(self) -> Iterator[tuple[Key, Aggregate]]:
        return iter(self._buckets.items())

    def put(self, key: Key, aggregate: Aggregate) -> None:
        """Set (or replace) a bucket. Its counts must not be changed in place afterwards:
        the cached merge of its group would not see it."""
        group = key[1] // self.per_group
        self._buckets[key] = aggregate
        self._groups.setdefault(group, set()).add(key)
        self._merged.pop(group, None)

    def pop(self, key: Key) -> Aggregate:
        group = key[1] // self.per_group
        aggregate = self._buckets.pop(key)
        keys = self._groups[group]
        keys.discard(key)
        if not keys:
            del self._groups[group]
        self._merged.pop(group, None)
        return aggregate

    def below(self, partition: int, index: int) -> list[Key]:
        """The open keys of the partition with a bucket index below ``index``."""
        return [
            key
            for group, keys in self._groups.items()
            if group * self.per_group < index
            for key in keys
            if key[0] == partition and key[1] < index
        ]

    def overlapping(self, start_ms: int, end_ms: int) -> Iterator[tuple[int, Aggregate]]:
        """(bucket index, aggregate) of every open bucket in a group that overlaps
        (start, end]: a superset of those inside it, for callers that filter by bucket."""
        for _, keys in self._touching(start_ms, end_ms):
            for key in keys:
                yield key[1], self._buckets[key]

    def inside(self, start_ms: int, end_ms: int) -> Iterator[Aggregate]:
        """Aggregates whose merge (without input features) is that of every open bucket lying
        wholly inside (start, end]: a group's cached merge where the group is, the buckets
        themselves where an edge cuts it."""
        size = self.bucket_ms
        span = self.per_group * size
        for group, keys in self._touching(start_ms, end_ms):
            group_start = group * span
            if group_start >= start_ms and group_start + span <= end_ms:
                merged = self._merged.get(group)
                if merged is None:
                    merged = Aggregate.merged((self._buckets[k] for k in keys), features=False)
                    self._merged[group] = merged
                yield merged
                continue
            for key in keys:
                if key[1] * size >= start_ms and (key[1] + 1) * size <= end_ms:
                    yield self._buckets[key]

    def _touching(self, start_ms: int, end_ms: int) -> Iterator[tuple[int, set[Key]]]:
        """(group, its keys) of every group that overlaps (start, end]."""
        span = self.per_group * self.bucket_ms
        for group, keys in self._groups.items():
            if group * span < end_ms and (group + 1) * span > start_ms:
                yield group, keys
