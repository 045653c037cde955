"""Stage 1 of the five numbers: everything one source partition can compute on its own.

Inputs, resolutions and eval results are co-partitioned by case_id, so one partition sees every
event of its cases: it deduplicates event ids, joins inputs with resolutions (either order),
and adds each event to a per-(loop, bucket) partial Aggregate. Partials are cumulative: stage 2
(pipeline.loopview) keeps the latest partial of each (partition, loop, bucket) and merges them
across partitions, so replacing an old partial with a newer one is idempotent.

State is a handful of small records (cases, partial buckets, the watermark) with dirty tracking,
so the worker persists exactly what changed (pipeline.checkpoint). No Kafka here.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgspec

from pipeline.aggregates import Aggregate
from pipeline.candidates import (
    EXTRINSIC,
    TEXT_LIMIT,
    CaseProposal,
    considered,
    intrinsic_reasons,
    shown_input,
)
from pipeline.codec import CodecError
from pipeline.core import CoreConfig, check_not_ahead, resolution_amounts, to_ms, verdicts_of
from pipeline.fastjson import dumps, loads
from pipeline.featurecolumns import FEATURE_ROW, InputColumns
from pipeline.features import (
    FeatureStats,
    category_text,
    feature_values,
    finite,
    stable_digest,
)
from pipeline.partials import EncodedBuckets, EvalCaseChange, Partial
from pipeline.windows import align_up

WATERMARK_KEY = "w"
CASES = "c/"  # the key prefix of case records
#: The largest input message a case keeps as it came (``Case.inp_avro``); past it, the fields a
#: candidate shows (text cut to TEXT_LIMIT), so that no input can make a case large.
INPUT_AVRO_BYTES = 4096
#: Where dead letters whose loop cannot be read are counted.
UNKNOWN_LOOP = "unknown"
#: Event ids a case remembers for dedupe. A case is an input, its resolutions and verdicts: a
#: producer that puts one case_id on everything would otherwise grow one case (re-encoded at
#: each of its events, into one changelog record) without bound, past Kafka's message limit.
#: Past it, ids older than the dedupe horizon are forgotten, and if that is not enough, the
#: event is a dead letter ``too_many_events``.
CASE_EVENTS = 1000
#: An event id longer than this is remembered by a digest of it (``dedupe_digest``), so that
#: ids of any length keep a case's record small.
EVENT_ID_CHARS = 100


class Case(
    msgspec.Struct,
    rename={
        "loop": "l",
        "input_ms": "i",
        "pending": "q",
        "resolved": "r",
        "touched_ms": "t",
        "seen": "s",
        "inp": "in",
        "res": "re",
        "verdicts": "v",
        "inp_avro": "ia",
    },
    gc=False,
):
    """What one partition key (a case_id, or an eval case id for eval results) remembers.

    A msgspec Struct, so that its checkpoint record is encoded and decoded straight from and
    into it (no dict in between: a restore decodes hundreds of thousands of them); ``gc=False``
    because a case holds no reference cycles, so the collector need not track it.
    """

    loop: str
    input_ms: int | None = None
    # Resolution times awaiting the input: a tuple, so that the cases with none (nearly all)
    # share the empty one instead of holding an empty list each (56 bytes a case).
    pending: tuple[int, ...] = ()
    resolved: bool = False
    touched_ms: int = 0
    seen: dict[str, int] = msgspec.field(default_factory=dict)  # event id -> time, for dedupe
    # What an eval candidate shows of the case: its input, last resolution and verdicts.
    # The input side as compact JSON text: one string per case instead of a tree of dicts,
    # which costs several times the memory over the hours a case is held.
    inp: str | None = None
    res: str | None = None  # the last resolution, compact JSON likewise
    verdicts: dict[str, bool] = msgspec.field(default_factory=dict)
    # Or the input as its message came (Avro single-object bytes, a worker's): kept as it is,
    # smaller than the JSON, and read only if stage 2 may pick the case (CaseProposal).
    inp_avro: bytes | None = None

    @property
    def has_input(self) -> bool:
        return self.inp is not None or self.inp_avro is not None


_decode_case = msgspec.json.Decoder(Case).decode


def dedupe_digest(event_id: str) -> str:
    """How a case remembers an event id longer than EVENT_ID_CHARS: "#" and a BLAKE2b-128
    digest (an id written so would have to be found from the digest, which no one can)."""
    return "#" + stable_digest(event_id, 16).hex()


def case_from_record(value: bytes | msgspec.Raw | Mapping[str, Any]) -> Case:
    """A case from its checkpoint record: JSON (bytes as the checkpoint hands over held
    records, Raw as ``changed_records`` writes them), or the record decoded already (a
    checkpoint that holds its values)."""
    if isinstance(value, msgspec.Raw):
        value = bytes(value)
    if isinstance(value, bytes):
        try:
            return _decode_case(value)
        except msgspec.DecodeError:  # written with the standard library (pipeline.fastjson)
            value = loads(value)
    return msgspec.convert(value, Case)


class PartitionCore:
    """Feed records with ``process``; collect what stage 2 needs with ``drain``."""

    def __init__(
        self,
        config: CoreConfig,
        partition: int = 0,
        on_latency: Callable[[str, float], None] | None = None,
        keeps_previous: bool = False,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.partition = partition
        self.on_latency = on_latency  # e.g. a Prometheus histogram's observe, per loop
        self.on_evict = on_evict  # called with the loop of each case evicted for the cap
        self.watermark_ms = 0
        self.marks: dict[str, int] = {}  # source topic -> the event time of its newest event
        self.behind: frozenset[str] = frozenset()  # topics with events still to be read
        self.cases: dict[str, Case] = {}
        self.buckets: dict[tuple[str, int], Aggregate] = {}
        # (touched_ms, key): one entry per case, which may be older than the case's last touch
        self._expiry: list[tuple[int, str]] = []
        # (touched_ms, key) of the cases with resolutions waiting for their input, to find
        # those past the lateness without going through all of them; stale entries allowed
        self._pending_due: list[tuple[int, str]] = []
        self._next_sweep_ms = 0
        self._changed_cases: set[str] = set()
        self._changed_buckets: set[tuple[str, int]] = set()  # for persistence
        self._unsent: set[tuple[str, int]] = set()  # for stage 2
        # buckets whose input features changed: for persistence, and for stage 2
        self._changed_features: set[tuple[str, int]] = set()
        self._unsent_features: set[tuple[str, int]] = set()
        self._final: dict[tuple[str, int], Aggregate] = {}  # closed before being sent
        self._encoded = EncodedBuckets()
        self.known_loops: set[str] = set()  # every loop this partition has had buckets of
        self._eval_cases: list[EvalCaseChange] = []
        # eval case id -> loop, for the eval cases of this partition: a tombstone carries only
        # the id, and stage 2 needs the loop to drop the case from its baseline
        self.eval_case_loops: dict[str, str] = {}
        self._changed_eval_cases: set[str] = set()
        self._proposals: list[CaseProposal] = []
        # (bucket key, FEATURE_ROW handle) of the inputs of light rows whose features are yet
        # to be added: added a batch at once, before anything reads the buckets
        self._deferred_features: list[tuple[tuple[str, int], tuple[InputColumns, int]]] = []
        self._watermark_changed = False
        self.horizon_ms = config.case_horizon_ms
        # For a checkpoint that keeps no copy of the cases (pipeline.checkpoint, "held"): each
        # changed case's JSON as of the last checkpoint, encoded before its first change.
        self.keeps_previous = keeps_previous
        self._previous: dict[str, bytes | None] = {}

    # -- input ------------------------------------------------------------------------------

    def process(
        self,
        topic: str,
        key: str,
        record: Mapping[str, Any],
        message: bytes | None = None,
        sent_ms: int | None = None,
    ) -> str:
        """Apply one record of a source topic; returns ok, duplicate or too_late. A record
        that cannot be counted (a non-finite amount, or a ts too far ahead of ``sent_ms``, its
        message's own time: pipeline.core.check_not_ahead) raises CodecError before any change.
        ``message``: an input's message as it came, which its case may keep (``Case``)."""
        ts = to_ms(record["ts"])
        loop = self.config.loop_label(str(record["loop"]))
        if topic == "eval-cases":
            eval_case_id = str(record["eval_case_id"])
            self._eval_cases.append(
                EvalCaseChange(loop, eval_case_id, record.get("category"), feature_values(record))
            )
            if self.eval_case_loops.get(eval_case_id) != loop:
                self.eval_case_loops[eval_case_id] = loop
                self._changed_eval_cases.add(eval_case_id)
            return "ok"
        check_not_ahead(ts, sent_ms, self.config.max_ahead_ms)
        amounts = resolution_amounts(record) if topic == "resolutions" else (0, 0)
        if ts <= self.watermark_ms - self.config.allowed_lateness_ms:
            return "too_late"
        case = self.cases.get(key)
        event_id = str(record["event_id"])
        written = event_id  # as state written before 2026-11-28 (night) may hold a long one
        if len(event_id) > EVENT_ID_CHARS:
            event_id = dedupe_digest(event_id)
        forgotten: list[str] = []
        if case is not None:
            first = case.seen.get(event_id)
            if first is None and written is not event_id:
                first = case.seen.get(written)
            horizon = self.watermark_ms - self.config.dedupe_horizon_ms
            if first is not None and first >= horizon:
                return "duplicate"
            if first is None and len(case.seen) >= CASE_EVENTS:
                forgotten = [i for i, seen_ms in case.seen.items() if seen_ms < horizon]
                if len(case.seen) - len(forgotten) >= CASE_EVENTS:
                    # the key: a case_id, or an eval result's eval_case_id (it has no case_id)
                    name = "case_id" if record.get("case_id") is not None else "eval_case_id"
                    raise CodecError(
                        "too_many_events",
                        f"{name} {key!r} has {len(case.seen):,} events within the dedupe "
                        f"horizon already; one holds at most {CASE_EVENTS:,} (is {name} set per "
                        "case?)",
                        name,
                    )
        self._changing(key)
        if case is not None:
            for old_id in forgotten:  # past the horizon: they no longer make a duplicate
                del case.seen[old_id]
        if case is None:
            cap = self.config.max_cases_per_partition
            if cap and len(self.cases) >= cap:
                self._evict(len(self.cases) - cap + 1)
            case = self.cases[key] = Case(loop, touched_ms=ts)
            heapq.heappush(self._expiry, (ts, key))  # pushed back when due if touched since
        case.seen[event_id] = ts
        if ts > case.touched_ms:
            case.touched_ms = ts
        bucket = self._bucket(loop, ts)
        bucket.events += 1
        if topic == "inputs":
            category = record.get("category")
            bucket.add_input("" if category is None else category_text(category))
            changed = self._bucket_key(loop, ts)
            handle = record.get(FEATURE_ROW)
            if handle is None:
                bucket.features.add_record(record)
            else:  # a light row (pipeline.featurecolumns): added with its batch
                self._deferred_features.append((changed, handle))
            self._changed_features.add(changed)
            self._unsent_features.add(changed)
            self._input(loop, key, case, ts)
        elif topic == "resolutions":
            bucket.resolutions[(str(record["resolver"]), str(record["outcome"]))] += 1
            bucket.cost_nano_usd += amounts[0]
            bucket.human_micro_minutes += amounts[1]
            self._resolution(loop, key, case, ts, bucket)
        elif topic != "eval-results":
            raise ValueError(f"topic {topic!r} carries nothing the five numbers use")
        for verdict in verdicts_of(topic, record):  # Counter.update costs more per event
            bucket.verdicts[verdict] += 1
        self._remember(topic, key, case, record, ts, amounts[0], message)
        mark = self.marks.get(topic, 0)
        if ts > mark:
            self.marks[topic] = ts
            if not self.behind:
                self._raise_watermark(ts)
            elif mark <= self.watermark_ms:
                self._raise_watermark(self._held())
            # else this topic was past the watermark already, which is at least _held() once
            # held: another topic holds it back, and a newer mark of this one changes nothing
        return "ok"

    def hold(self, behind: frozenset[str]) -> None:
        """Say which source topics of the partition still have events to be read: the
        watermark waits for the slowest of them. Topics are consumed at different speeds (a
        fetch brings as many bytes of each, and inputs are larger than resolutions), so while
        a backlog is read, one topic can be hours of event time ahead of another; judged
        against that topic's newest event, the other's events would all be too late, and the
        cases they belong to expired. Replay reads one stream in order and never holds."""
        self.behind = behind
        self._raise_watermark(self._held())

    def _held(self) -> int:
        """The watermark the topics' newest events allow: the newest event of all, unless a
        topic still to be read has not got that far (a topic not seen yet holds it still)."""
        marks = self.marks
        held = max(marks.values(), default=0)
        for topic in self.behind:  # a loop, not min() over a generator: it runs per event
            mark = marks.get(topic, 0)
            if mark < held:
                held = mark
        return held

    def _raise_watermark(self, ts: int) -> None:
        if ts > self.watermark_ms:
            self.watermark_ms = ts
            self._watermark_changed = True
            if ts >= self._next_sweep_ms:  # expire state once per bucket of event time
                self.advance(ts)

    def delete_eval_case(self, eval_case_id: str) -> str:
        """Apply a tombstone of the eval-cases topic: stage 2 drops the case from its loop's
        baseline. A tombstone of a case this partition never saw changes nothing."""
        loop = self.eval_case_loops.pop(eval_case_id, None)
        if loop is not None:
            self._eval_cases.append(EvalCaseChange(loop, eval_case_id, None, deleted=True))
            self._changed_eval_cases.add(eval_case_id)
        return "ok"

    def add_deferred_features(self) -> None:
        """Add the features of the light rows processed since the last call to their buckets,
        each bucket's rows at once and in order (pipeline.featurecolumns). ``drain``,
        ``changed_records`` and ``advance`` call it first; whoever reads ``buckets`` after
        processing light rows must too."""
        deferred = self._deferred_features
        if not deferred:
            return
        self._deferred_features = []
        rows: dict[tuple[tuple[str, int], InputColumns], list[int]] = {}
        for bucket_key, (columns, row) in deferred:
            rows.setdefault((bucket_key, columns), []).append(row)
        for (bucket_key, columns), of_bucket in rows.items():
            columns.add_to(self.buckets[bucket_key].features, of_bucket)

    # -- eval candidates --------------------------------------------------------------------

    def _remember(
        self,
        topic: str,
        key: str,
        case: Case,
        record: Mapping[str, Any],
        ts: int,
        cost: int,
        message: bytes | None,
    ) -> None:
        """Keep what a candidate shows of the case, and propose the case to stage 2 when it
        is resolved, has its input, and may be a candidate (pipeline.candidates)."""
        resolution: dict[str, Any] | None = None  # the case's, when this record is it
        if topic == "inputs":
            if case.has_input:
                return
            if message is not None and len(message) <= INPUT_AVRO_BYTES:
                case.inp_avro = bytes(message)  # no copy of bytes; a view is copied
            else:
                handle = record.get(FEATURE_ROW)
                if handle is not None:  # a light row: the whole record
                    record = handle[0].record(handle[1])
                case.inp = dumps(shown_input(record)).decode()
        elif topic == "resolutions":
            output = record.get("output")
            confidence = record.get("confidence")
            resolution = {
                "resolver": str(record["resolver"]),
                "outcome": str(record["outcome"]),
                "release": record.get("release"),
                "confidence": confidence if finite(confidence) else None,
                "cost_usd": cost / 1e9,
                "output": None if output is None else str(output)[:TEXT_LIMIT],
                "ts": ts,
            }
            case.res = dumps(resolution).decode()
            if record.get("eval_passed") is not None:
                case.verdicts["online"] = bool(record["eval_passed"])
        elif record.get("case_id") is not None:  # an eval result of a production case
            # by its first CATEGORY_CHARS, as a case holds up to CASE_EVENTS of them
            evaluator = category_text(record.get("evaluator") or record["suite"])
            case.verdicts[evaluator] = bool(record["passed"])
            if record["passed"]:
                return  # a passed verdict is no new reason
        else:
            return
        if not case.has_input or case.res is None or case.input_ms is None:
            return
        # Only a case the coin may pick becomes a proposal (stage 2 adds the extrinsic
        # reasons, and draws the same coin): most cases stop here, before their input is read.
        candidates = self.config.rules.candidates
        if resolution is None:
            resolution = loads(case.res)
        reasons = intrinsic_reasons(case.verdicts, resolution, candidates.confidence_floor)
        if not considered(key, [*reasons, *EXTRINSIC], candidates):
            return
        resolved_ms = int(resolution.pop("ts"))
        self._proposals.append(
            CaseProposal(
                key,
                case.loop,
                resolved_ms,
                {} if case.inp is None else loads(case.inp),
                resolution,
                max(resolved_ms - case.input_ms, 0) / 1000.0,
                dict(case.verdicts),
                case.inp_avro,
            )
        )

    def _changing(self, key: str) -> None:
        """Mark a case as changed, before it changes: with ``keeps_previous``, its JSON as of
        the last checkpoint is kept at its first change in a batch (``previous_records``)."""
        if key in self._changed_cases:
            return
        self._changed_cases.add(key)
        if self.keeps_previous:
            case = self.cases.get(key)
            self._previous[CASES + key] = None if case is None else dumps(case)

    def dead_letter(self, loop: str | None, fallback_ms: int) -> None:
        """Count a record that went to the dead-letter topic, at the partition's event time
        (or at ``fallback_ms``, the message's own time, before any event), under its loop when
        it could be read and under UNKNOWN_LOOP when not, for the dead-letter rate."""
        ts = self.watermark_ms or fallback_ms
        label = UNKNOWN_LOOP if loop is None else self.config.loop_label(loop)
        self._bucket(label, max(ts, 1)).dead_letters += 1

    def _bucket_key(self, loop: str, ts_ms: int) -> tuple[str, int]:
        """The bucket an event time falls in: buckets end at their boundary, inclusive."""
        return (loop, (ts_ms - 1) // self.config.bucket_ms)

    def _bucket(self, loop: str, ts_ms: int) -> Aggregate:
        key = self._bucket_key(loop, ts_ms)
        found = self.buckets.get(key)
        if found is None:
            found = self.buckets[key] = Aggregate()
            self.known_loops.add(loop)
        self._changed_buckets.add(key)
        self._unsent.add(key)
        self._encoded.changed(key)
        return found

    def _existing_bucket(self, loop: str, ts_ms: int) -> Aggregate | None:
        key = self._bucket_key(loop, ts_ms)
        found = self.buckets.get(key)
        if found is not None:
            self._changed_buckets.add(key)
            self._unsent.add(key)
            self._encoded.changed(key)
        return found

    def _input(self, loop: str, key: str, case: Case, ts: int) -> None:
        if case.input_ms is not None:
            return  # latency is measured against the case's first input
        case.input_ms = ts
        if not case.resolved:
            self._bucket(loop, ts).unresolved += 1
        for resolved_ms in case.pending:
            self._latency(loop, resolved_ms, resolved_ms - ts)
        case.pending = ()

    def _resolution(self, loop: str, key: str, case: Case, ts: int, here: Aggregate) -> None:
        """``here`` is the resolution's own bucket (process has it already)."""
        if case.input_ms is not None and not case.resolved:
            arrived = self._bucket_key(loop, case.input_ms)
            if arrived in self.buckets:  # else past the horizon, no longer counted
                if self._bucket_key(loop, ts)[1] > arrived[1]:
                    # in the resolution's bucket (Aggregate.settled): the old one is unchanged
                    here.settled[arrived[1]] += 1
                else:  # the same bucket (or clock skew)
                    self._bucket(loop, case.input_ms).unresolved -= 1
        case.resolved = True
        if case.input_ms is None:
            if not case.pending:  # the first to wait: due from the case's last touch on
                heapq.heappush(self._pending_due, (case.touched_ms, key))
            case.pending = (*case.pending, ts)
        else:
            self._latency(loop, ts, ts - case.input_ms)

    def _latency(self, loop: str, resolved_ms: int, latency_ms: int) -> None:
        bucket = self._existing_bucket(loop, resolved_ms)
        if bucket is not None:
            # A resolution stamped before its input (clock skew) counts as zero latency.
            seconds = max(latency_ms, 0) / 1000.0
            bucket.latency.add(seconds)
            if self.on_latency is not None:
                self.on_latency(loop, seconds)

    # -- time -------------------------------------------------------------------------------

    def advance(self, watermark_ms: int) -> None:
        """Move event time forward: drop unjoined resolutions past the allowed lateness, and
        cases and buckets past the horizon (they can no longer change)."""
        if watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms
            self._watermark_changed = True
        bucket_ms = self.config.bucket_ms
        self._next_sweep_ms = align_up(self.watermark_ms + 1, bucket_ms)
        lateness = self.watermark_ms - self.config.allowed_lateness_ms
        due = self._pending_due
        while due and due[0][0] < lateness:
            _, key = heapq.heappop(due)
            case = self.cases.get(key)
            if case is None or not case.pending:
                continue  # joined or expired since
            if case.touched_ms >= lateness:  # touched since: due later
                heapq.heappush(due, (case.touched_ms, key))
                continue
            self._changing(key)
            case.pending = ()  # each at or before the case's last touch, so all too late
        horizon = self.watermark_ms - self.horizon_ms
        expiry = self._expiry
        while expiry and expiry[0][0] <= horizon:
            touched, key = heapq.heappop(expiry)
            case = self.cases.get(key)
            if case is None:
                continue
            if case.touched_ms > touched:  # touched since: due later
                heapq.heappush(expiry, (case.touched_ms, key))
                continue
            self._changing(key)
            del self.cases[key]
        last_closed = horizon // bucket_ms  # buckets ending at or before the horizon
        if any(key[1] < last_closed for key, _ in self._deferred_features):
            self.add_deferred_features()  # before a bucket they belong to closes
        for bucket_key in [k for k in self.buckets if k[1] < last_closed]:
            aggregate = self.buckets.pop(bucket_key)
            self._changed_buckets.add(bucket_key)
            self._changed_features.add(bucket_key)
            if bucket_key in self._unsent:
                self._final[bucket_key] = aggregate

    def _evict(self, count: int) -> None:
        """Drop the ``count`` least recently touched cases (by event time, then key) before
        the horizon would: the cap on the state (config.max_cases_per_partition) under more
        traffic than the memory was sized for. What they counted stays counted; what they
        would still have joined is lost (README, "Operations", Memory)."""
        expiry = self._expiry
        while count and expiry:
            touched, key = heapq.heappop(expiry)
            case = self.cases.get(key)
            if case is None:
                continue
            if case.touched_ms > touched:  # touched since: not the least recent yet
                heapq.heappush(expiry, (case.touched_ms, key))
                continue
            self._changing(key)
            del self.cases[key]
            count -= 1
            if self.on_evict is not None:
                self.on_evict(case.loop)

    # -- output -----------------------------------------------------------------------------

    def drain(self) -> Iterator[Partial | EvalCaseChange | CaseProposal]:
        """What changed since the last drain, for stage 2: the eval cases seen, one Partial
        per loop whose buckets (or whose partition's watermark) moved, the cases proposed as
        eval candidates."""
        self.add_deferred_features()
        yield from self._eval_cases
        self._eval_cases = []
        by_loop: dict[str, dict[int, Aggregate]] = {}
        for loop, index in self._unsent:
            aggregate = self.buckets.get((loop, index)) or self._final[(loop, index)]
            by_loop.setdefault(loop, {})[index] = aggregate
        if self._watermark_changed:
            for loop in self.known_loops:
                by_loop.setdefault(loop, {})
        # One message per bucket: a bucket's summaries encode within FEATURES_BYTES
        # (pipeline.features), and the partials topic takes STATE_MESSAGE_BYTES
        # (pipeline.topics); stage 2 keeps the latest of each bucket, so splitting changes
        # nothing but the size.
        for loop in sorted(by_loop):
            buckets = by_loop[loop]
            if not buckets:  # only the watermark moved
                yield Partial(self.partition, loop, self.watermark_ms, {})
            for index in sorted(buckets):
                bucket = {index: buckets[index]}
                features = (loop, index) in self._unsent_features
                yield Partial(
                    self.partition, loop, self.watermark_ms, bucket, self._encoded, features
                )
        self._unsent, self._final, self._unsent_features = set(), {}, set()
        self._watermark_changed = False
        yield from self._proposals
        self._proposals = []

    # -- persistence ------------------------------------------------------------------------

    def changed_records(self) -> dict[str, Any]:
        """Record key -> JSON value (None = deleted) of everything changed since the last call;
        a bucket's counts ("b/") and its input features ("f/", written only when they changed)
        come already encoded (msgspec.Raw), as their partials sent them, and so do the cases
        ("c/"), encoded here so that a later change to a case cannot reach this batch's record."""
        self.add_deferred_features()
        records: dict[str, Any] = {}
        encoded = self._encoded
        for loop, index in self._changed_buckets:
            aggregate = self.buckets.get((loop, index))
            records[f"b/{loop}/{index}"] = (
                None if aggregate is None else encoded.counts(loop, index, aggregate)
            )
        for loop, index in self._changed_features:
            aggregate = self.buckets.get((loop, index))
            records[f"f/{loop}/{index}"] = (
                None if aggregate is None else encoded.features(loop, index, aggregate)
            )
        for key in self._changed_cases:
            case = self.cases.get(key)
            records[CASES + key] = None if case is None else msgspec.Raw(dumps(case))
        for key in self._changed_eval_cases:
            records[f"e/{key}"] = self.eval_case_loops.get(key)
        records[WATERMARK_KEY] = {
            "wm": self.watermark_ms,
            "loops": sorted(self.known_loops),
            "marks": dict(self.marks),
        }
        self.discard_changes()
        return records

    def previous_records(self) -> dict[str, bytes | None]:
        """The ``before`` of pipeline.checkpoint's commit for the cases of ``changed_records``:
        call it first (``changed_records`` starts the next batch)."""
        return self._previous

    def discard_changes(self) -> None:
        """Forget what changed, where nothing is persisted (replay)."""
        self._previous = {}
        self._changed_buckets = set()
        self._changed_features = set()
        self._changed_cases = set()
        self._changed_eval_cases = set()
        self._encoded.clear()

    @classmethod
    def from_records(
        cls,
        config: CoreConfig,
        partition: int,
        records: Mapping[str, Any],
        on_latency: Callable[[str, float], None] | None = None,
        keeps_previous: bool = False,
        on_evict: Callable[[str], None] | None = None,
    ) -> PartitionCore:
        """Rebuild the state that ``changed_records`` wrote (resume comes from the snapshot)."""
        core = cls(config, partition, on_latency, keeps_previous, on_evict)
        features: dict[tuple[str, int], FeatureStats] = {}
        for key, value in records.items():
            if key == WATERMARK_KEY:
                core.watermark_ms = int(value["wm"])
                core.marks.update(value.get("marks", {}))  # none before 2026-11-26
                core.known_loops.update(value["loops"])
            elif key.startswith(("b/", "f/")) and value is not None:
                loop, _, index = key[2:].rpartition("/")
                if isinstance(value, msgspec.Raw):  # straight from changed_records
                    value = loads(bytes(value))
                if key[0] == "f":
                    features[(loop, int(index))] = FeatureStats.from_json(value)
                    continue
                core.buckets[(loop, int(index))] = Aggregate.from_json(value)
                core.known_loops.add(loop)
                if value.get("f"):  # written before 2026-11-26, features inside: move them out
                    core._changed_features.add((loop, int(index)))
            elif key.startswith(CASES):
                case = core.cases[key[2:]] = case_from_record(value)
                core._expiry.append((case.touched_ms, key[2:]))
                if case.pending:
                    core._pending_due.append((case.touched_ms, key[2:]))
            elif key.startswith("e/") and value is not None:
                core.eval_case_loops[key[2:]] = str(value)
        for bucket_key, stats in features.items():
            if bucket_key in core.buckets:
                core.buckets[bucket_key].features = stats
        heapq.heapify(core._expiry)
        heapq.heapify(core._pending_due)
        core._next_sweep_ms = align_up(core.watermark_ms + 1, config.bucket_ms)
        return core
