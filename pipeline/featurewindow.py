"""The input features of a drift window, merged from per-minute groups that are cached.

A drift window (default 1 h) spans hundreds of 10 s buckets, and the alert rules evaluate it
every minute, so merging every bucket each time would redo almost all of the last merge. The
buckets are grouped by minute; a group's merge is cached until one of its buckets changes (a
newer partial arrives for it), so an evaluation merges about one new group plus the cached ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from pipeline.aggregates import Aggregate
from pipeline.features import FeatureStats
from pipeline.windows import MINUTE


class FeatureWindow:
    def __init__(self, bucket_ms: int) -> None:
        self.bucket_ms = bucket_ms
        self.per_group = max(MINUTE // bucket_ms, 1)
        self.versions: dict[int, int] = defaultdict(int)  # group -> changes seen
        self.cache: dict[int, tuple[int, FeatureStats]] = {}  # group -> (version, merged)

    def touch(self, index: int) -> None:
        """Bucket ``index`` changed: its group's cached merge is stale."""
        self.versions[index // self.per_group] += 1

    def merged(
        self, buckets: Iterable[tuple[int, Aggregate]], as_of_ms: int, length_ms: int
    ) -> FeatureStats:
        """The features of every (bucket index, aggregate) lying wholly inside the window."""
        size, per = self.bucket_ms, self.per_group
        start = as_of_ms - length_ms
        groups: dict[int, list[Aggregate]] = defaultdict(list)
        edges: list[Aggregate] = []
        for index, aggregate in buckets:
            if index * size < start or (index + 1) * size > as_of_ms:
                continue
            group = index // per
            if group * per * size >= start and (group + 1) * per * size <= as_of_ms:
                groups[group].append(aggregate)
            else:
                edges.append(aggregate)  # a group cut by the window's edge
        total = FeatureStats()
        for group, parts in groups.items():
            version = self.versions[group]
            cached = self.cache.get(group)
            if cached is None or cached[0] != version:
                stats = FeatureStats()
                for part in parts:
                    stats.merge(part.features)
                cached = self.cache[group] = (version, stats.normalize())
            total.merge(cached[1])
        for part in edges:
            total.merge(part.features)
        total.normalize()  # the size caps, once for the window (pipeline.features)
        oldest = start // (per * size) - 1
        for group in [g for g in self.cache if g < oldest]:
            del self.cache[group]
            self.versions.pop(group, None)
        return total
