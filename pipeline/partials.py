"""What stage 1 sends stage 2 on the partials topic: each loop's changed buckets
(``Partial``) and eval-case changes, encoded once for the message and for the checkpoint
(``EncodedBuckets``). Read back by pipeline.loopview.partial_from_json."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline.aggregates import Aggregate
from pipeline.candidates import CaseProposal
from pipeline.fastjson import dumps
from pipeline.features import FeatureValues, values_from_json, values_to_json
from pipeline.formats import FORMAT_VERSION


class EncodedBuckets:
    """Each changed bucket's JSON, encoded once for both its partial and its checkpoint
    records: its counts, and its input features apart (pipeline.aggregates.Aggregate).

    Stage 1 sends and checkpoints every bucket that changed in a batch, and a bucket's feature
    summaries take tens of microseconds to encode (up to ~50 us for the generator's 10 KB
    buckets): encoding them twice was a tenth of the worker's time."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], msgspec.Raw] = {}
        self._features: dict[tuple[str, int], msgspec.Raw] = {}

    def counts(self, loop: str, index: int, aggregate: Aggregate) -> msgspec.Raw:
        return _encoded(self._counts, (loop, index), aggregate.counts_json)

    def features(self, loop: str, index: int, aggregate: Aggregate) -> msgspec.Raw:
        return _encoded(self._features, (loop, index), aggregate.features_json)

    def changed(self, key: tuple[str, int]) -> None:
        """The bucket at ``key`` is about to change: its encodings are stale."""
        self._counts.pop(key, None)
        self._features.pop(key, None)

    def clear(self) -> None:
        self._counts.clear()
        self._features.clear()


def _encoded(
    cache: dict[tuple[str, int], msgspec.Raw], key: tuple[str, int], to_json: Callable[[], Any]
) -> msgspec.Raw:
    found = cache.get(key)
    if found is None:
        found = cache[key] = msgspec.Raw(dumps(to_json()))
    return found


@dataclass(frozen=True)
class Partial:
    """The latest cumulative aggregates of some buckets of one loop in one partition.

    Without ``with_features``, the buckets' input features did not change since the bucket's
    last partial and are left out of its message (stage 2 keeps the ones it has): most partials
    are an old bucket touched by a late resolution, whose counts are a few hundred bytes and
    whose feature summaries are up to tens of kilobytes."""

    partition: int
    loop: str
    watermark_ms: int
    buckets: Mapping[int, Aggregate]  # bucket index -> aggregate
    encoded: EncodedBuckets | None = field(default=None, compare=False, repr=False)
    with_features: bool = True

    def to_json(self) -> dict[str, Any]:
        if self.with_features:
            return self._json(
                [[k, a.counts_json(), a.features_json()] for k, a in self.buckets.items()]
            )
        return self._json([[k, a.counts_json()] for k, a in self.buckets.items()])

    def encode(self) -> bytes:
        """``to_json`` encoded, each bucket encoded once for its checkpoint records as well."""
        encoded = self.encoded
        if encoded is None:
            return dumps(self.to_json())
        loop = self.loop
        if self.with_features:
            buckets = [
                [k, encoded.counts(loop, k, a), encoded.features(loop, k, a)]
                for k, a in self.buckets.items()
            ]
        else:
            buckets = [[k, encoded.counts(loop, k, a)] for k, a in self.buckets.items()]
        return dumps(self._json(buckets))

    def _json(self, buckets: list[list[Any]]) -> dict[str, Any]:
        return {
            "kind": "partial",
            "v": FORMAT_VERSION,
            "p": self.partition,
            "loop": self.loop,
            "wm": self.watermark_ms,
            "buckets": buckets,
        }


@dataclass(frozen=True)
class EvalCaseChange:
    """An eval case as stage 2 needs it: its category (coverage) and features (baseline), or
    its deletion (a tombstone on the compacted eval-cases topic)."""

    loop: str
    eval_case_id: str
    category: str | None
    features: FeatureValues = field(default_factory=lambda: FeatureValues({}, {}, None))
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "eval_case",
            "loop": self.loop,
            "id": self.eval_case_id,
            "category": self.category,
            "f": values_to_json(self.features),
            "deleted": self.deleted,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalCaseChange:
        return cls(
            str(data["loop"]),
            str(data["id"]),
            data["category"],
            values_from_json(data.get("f")),
            bool(data.get("deleted", False)),
        )


def encode_change(change: Partial | EvalCaseChange | CaseProposal) -> bytes:
    """A drained change as the partials topic carries it to stage 2 (read back by
    pipeline.loopview.partial_from_json)."""
    if isinstance(change, Partial):
        return change.encode()
    return dumps({**change.to_json(), "v": FORMAT_VERSION})
