"""Bucketed event time: aggregates per bucket, rolled up into coarser tiers as they age.

Bucket k of size s covers event times (k*s, (k+1)*s] in milliseconds, so "window W as of T" is
exactly the buckets inside (T - W, T] when T and W are multiples of s. Fine buckets (default
10 s) are kept for 2 h, then rolled up (exactly: aggregates merge) into 1 min buckets kept for
26 h, then into 5 min buckets kept for 15 days, so memory stays bounded while 5m/1h windows
are exact at 10 s and the 24h and 7d windows (and their week-over-week deltas) remain
available. A window takes every bucket, of any tier, that lies wholly inside it, so where the
old edge of a 24h or 7d window falls into a coarse tier that window starts up to one coarse
bucket (1 min or 5 min) later. The week-ago windows behind the week-over-week deltas end at
the first bucket boundary of the tier that holds that time at or after as_of - 7 d.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

from pipeline.aggregates import Aggregate

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WINDOWS = {"5m": 5 * MINUTE, "1h": HOUR, "24h": DAY, "7d": 7 * DAY}
WEEK = 7 * DAY


@dataclass(frozen=True)
class Tier:
    size_ms: int
    retention_ms: int


def default_tiers(bucket_ms: int) -> tuple[Tier, ...]:
    if MINUTE % bucket_ms:
        raise ValueError(f"bucket size {bucket_ms} ms must divide one minute")
    return (Tier(bucket_ms, 2 * HOUR), Tier(MINUTE, 26 * HOUR), Tier(5 * MINUTE, 15 * DAY))


def align_up(ts_ms: int, size_ms: int) -> int:
    return -(-ts_ms // size_ms) * size_ms


class BucketSeries:
    """One loop's aggregates over event time, in tiers of growing bucket size."""

    def __init__(self, tiers: tuple[Tier, ...]) -> None:
        for fine, coarse in pairwise(tiers):
            if coarse.size_ms % fine.size_ms:
                raise ValueError("each tier's bucket size must be a multiple of the previous")
        self.tiers = tiers
        self.buckets: list[dict[int, Aggregate]] = [{} for _ in tiers]
        # Tier i holds the buckets ending after floor[i]; older time lives in coarser tiers.
        self.floor: list[float] = [float("-inf")] * len(tiers)
        self.changed: set[tuple[int, int]] = set()  # (tier, bucket index) touched, for persistence

    def bucket(self, ts_ms: int) -> Aggregate | None:
        """The aggregate holding ts, created on demand; None when ts is past all retention."""
        for i, tier in enumerate(self.tiers):
            if ts_ms > self.floor[i]:
                buckets = self.buckets[i]
                key = (ts_ms - 1) // tier.size_ms
                found = buckets.get(key)
                if found is None:
                    found = buckets[key] = Aggregate()
                self.changed.add((i, key))
                return found
        return None

    def advance(self, watermark_ms: int) -> None:
        """Roll buckets older than their tier's retention into the next tier (or drop them)."""
        for i, tier in enumerate(self.tiers):
            nxt = self.tiers[i + 1] if i + 1 < len(self.tiers) else None
            grid = nxt.size_ms if nxt else tier.size_ms
            new_floor = (watermark_ms - tier.retention_ms) // grid * grid
            if new_floor <= self.floor[i]:
                continue
            self.floor[i] = new_floor
            buckets = self.buckets[i]
            for key in [k for k in buckets if (k + 1) * tier.size_ms <= new_floor]:
                aggregate = buckets.pop(key)
                self.changed.add((i, key))
                if nxt is not None:
                    coarse = ((key + 1) * tier.size_ms - 1) // nxt.size_ms
                    self.buckets[i + 1].setdefault(coarse, Aggregate()).merge(
                        aggregate, features=False
                    )
                    self.changed.add((i + 1, coarse))

    def align(self, ts_ms: int) -> int:
        """ts rounded up to the bucket grid of the tier that holds it."""
        for tier, floor in zip(self.tiers, self.floor, strict=True):
            if ts_ms > floor:
                return align_up(ts_ms, tier.size_ms)
        return align_up(ts_ms, self.tiers[-1].size_ms)

    def window(self, as_of_ms: int, length_ms: int) -> Aggregate:
        """Merge every bucket lying wholly inside (as_of - length, as_of], without input
        features (drift merges those from the fine buckets, pipeline.featurewindow)."""
        return Aggregate.merged(self._inside(as_of_ms - length_ms, as_of_ms), features=False)

    def _inside(self, start_ms: int, end_ms: int) -> Iterator[Aggregate]:
        for tier, buckets in zip(self.tiers, self.buckets, strict=True):
            first = align_up(start_ms, tier.size_ms) // tier.size_ms
            last = end_ms // tier.size_ms - 1
            if last - first + 1 > len(buckets):
                keys = (k for k in buckets if first <= k <= last)
            else:
                keys = (k for k in range(first, last + 1) if k in buckets)
            for key in keys:
                yield buckets[key]
