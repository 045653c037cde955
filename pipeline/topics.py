"""loopline's topics (DESIGN.md), the record each carries, and creating them on the broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from pipeline.kafka_security import client_options
from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: max.message.bytes of the topics that carry a bucket's state: the partials topic and the state
#: tables' changelogs. A bucket's input features encode within pipeline.features.FEATURES_BYTES
#: (2 MiB), a changelog envelope holds a record twice (its value and the one before it), and
#: the counts come on top. Kafka's default (1 MB) refused the largest buckets: the worker's send
#: failed, and the worker stopped again after every restart.
STATE_MESSAGE_BYTES = 8 * 1024 * 1024
LIMIT = "max.message.bytes"
#: The worker's checkpointed tables (agents.state); Faust names their changelogs after them.
PARTITION_STATE, LOOP_STATE = "partition-state", "loop-state"  # stage 1's and stage 2's
STATE_TABLES = (PARTITION_STATE, LOOP_STATE)
_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs' config_source of a topic's own setting
KEPT_FOR_GOOD = "-1"  # retention.ms of a topic whose records retention never deletes


@dataclass(frozen=True)
class TopicSpec:
    name: str
    record: str
    compacted: bool = False
    internal: bool = False  # the engine's own (stage 1 -> stage 2), not part of the contract
    carries_state: bool = False  # messages up to STATE_MESSAGE_BYTES
    kept: bool = False  # records kept for good (retention.ms -1), not for the broker's default

    def configs(self) -> dict[str, str]:
        configs = {"cleanup.policy": "compact"} if self.compacted else {}
        if self.kept:
            configs["retention.ms"] = KEPT_FOR_GOOD
        if self.carries_state:
            configs[LIMIT] = str(STATE_MESSAGE_BYTES)
        return configs


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("inputs", "InputEvent"),
    TopicSpec("resolutions", "ResolutionEvent"),
    TopicSpec("eval-results", "EvalResult"),
    TopicSpec("eval-cases", "EvalCase", compacted=True),
    TopicSpec("dlq", "DeadLetter"),
    TopicSpec("metrics", "MetricSnapshot"),
    TopicSpec("alerts", "Alert"),
    TopicSpec("eval-candidates", "EvalCandidate"),
    # Decisions are kept for good (the reviewers' record): one deleted by retention while its
    # candidate was still on eval-candidates (segments of the two topics roll apart) brought
    # the candidate back to the queue at the review page's next start, to be decided again.
    TopicSpec("reviews", "ReviewDecision", kept=True),
    TopicSpec("partials", "", internal=True, carries_state=True),
)

#: Topics that services publish to and the worker consumes, by logical name.
SOURCE_TOPICS = ("inputs", "resolutions", "eval-results", "eval-cases")
#: The source topics whose events carry event time (eval cases are reference data).
EVENT_TOPICS = ("inputs", "resolutions", "eval-results")

RECORD_OF: Mapping[str, str] = {t.name: t.record for t in TOPICS if not t.internal}

#: Every contract topic, by logical name: what the archive stores.
CONTRACT_TOPICS = tuple(RECORD_OF)

#: Contract topics where a keyed message with no value (a tombstone) deletes that key's record.
COMPACTED_TOPICS = frozenset(t.name for t in TOPICS if t.compacted and not t.internal)


def key_of(topic: str, record: Mapping[str, Any]) -> bytes | None:
    """The partitioning key DESIGN.md gives each topic (case_id keeps a case co-partitioned)."""
    if topic == "eval-results":
        return str(record.get("case_id") or record["eval_case_id"]).encode()
    if topic == "eval-cases":
        return str(record["eval_case_id"]).encode()
    if topic in ("inputs", "resolutions"):
        return str(record["case_id"]).encode()
    if topic == "metrics":
        return str(record["loop"]).encode()
    if topic == "alerts":
        return str(record["fingerprint"]).encode()
    if topic == "eval-candidates":
        return str(record["case_id"]).encode()
    if topic == "reviews":
        return str(record["candidate_id"]).encode()
    return None


class TopicLayoutError(RuntimeError):
    """The source topics exist with different partition counts (not co-partitioned)."""


class Ensured(NamedTuple):
    """What ``ensure_topics`` did: the topics it created, those whose limit it raised, the
    other settings it gave existing topics, and the state changelogs it gave more partitions;
    and the source topics' partition count."""

    created: list[str]
    raised: list[str]
    mended: dict[str, dict[str, str]]
    grown: list[str]
    partitions: int

    @property
    def changed(self) -> bool:
        return bool(self.created or self.raised or self.mended or self.grown)

    def describe(self) -> str:
        said = [f"created {', '.join(self.created)}" if self.created else "all exist"]
        if self.raised:
            said.append(
                f"max.message.bytes raised to {STATE_MESSAGE_BYTES} for {', '.join(self.raised)}"
            )
        for name, given in self.mended.items():
            said.append(f"{', '.join(f'{k}={v}' for k, v in given.items())} set on {name}")
        if self.grown:
            said.append(f"partitions added to {', '.join(self.grown)}")
        return "; ".join(said)


def changelog_topic(settings: Settings, table: str) -> str:
    """The changelog Faust gives the worker's table ``table`` (app id, table, "changelog")."""
    return f"{settings.app_id}-{table}-changelog"


async def ensure_topics(settings: Settings, names: tuple[str, ...] | None = None) -> Ensured:
    """Create the missing loopline topics (full names in ``created``). Topics
    that carry state and exist with a smaller message limit (made by an earlier version, or
    changelogs made by Faust) get STATE_MESSAGE_BYTES, and existing topics that go by the
    broker's default where loopline makes them otherwise (a reviews topic an earlier version
    made, an eval-cases topic made by hand) get loopline's setting (``_mend_settings``)."""
    wanted = [t for t in TOPICS if names is None or t.name in names]
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:  # closed also when it cannot start, or its connections are left open
        await admin.start()
        existing = set(await admin.list_topics())
        source_partitions = await _source_partitions(admin, settings, existing)
        new = [
            NewTopic(
                name=settings.topic(t.name),
                num_partitions=source_partitions
                if t.name in SOURCE_TOPICS
                else settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=t.configs(),
            )
            for t in wanted
            if settings.topic(t.name) not in existing
        ]
        if new:
            response = await admin.create_topics(new)
            for topic, code, *rest in response.topic_errors:
                # 36 = TOPIC_ALREADY_EXISTS: another process won the race, which is fine.
                if code not in (0, TopicAlreadyExistsError.errno):
                    detail = rest[0] if rest and rest[0] else f"error code {code}"
                    raise RuntimeError(f"cannot create topic {topic}: {detail}")
            await _wait_for_leaders(admin, [t.name for t in new])
        partitions, grown = await _align_partitions(
            admin, settings, existing | {t.name for t in new}
        )
        settings_of = {settings.topic(t.name): t.configs() for t in wanted}
        for table in STATE_TABLES:  # Faust makes them (compacted); loopline, their limit
            settings_of[changelog_topic(settings, table)] = {LIMIT: str(STATE_MESSAGE_BYTES)}
        raised, mended = await _mend_settings(
            admin, {n: c for n, c in settings_of.items() if c and n in existing}
        )
        return Ensured([t.name for t in new], raised, mended, grown, partitions)
    finally:
        await admin.close()


class Grown(NamedTuple):
    """What ``grow_source_topics`` did: the source topics it gave partitions (name -> their
    count before), and what ``ensure_topics`` did after."""

    before: dict[str, int]
    ensured: Ensured

    def describe(self) -> str:
        total = self.ensured.partitions
        if not self.before:
            return f"the source topics have {total} partitions; {self.ensured.describe()}"
        grown = ", ".join(f"{name} ({count} -> {total})" for name, count in self.before.items())
        return f"partitions added to {grown}; {self.ensured.describe()}"


async def grow_source_topics(settings: Settings, total: int) -> Grown:
    """Give every source topic ``total`` partitions (creating those missing), in one request,
    and the state changelog as many: how to scale out past the partition count, or mend source
    topics grown one by one by hand (which every worker refuses, TopicLayoutError). One request,
    so that a running worker's metadata refresh does not find the topics half grown. Kafka
    cannot take partitions away: fewer than a source topic has is refused before any change."""
    sources = [settings.topic(name) for name in SOURCE_TOPICS]
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        present = [name for name in sources if name in existing]
        counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(present)}
        if total < max(counts.values(), default=0):
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise TopicLayoutError(
                f"cannot give the source topics {total} partitions: they have more ({listed}), "
                "and Kafka cannot take partitions away"
            )
        before = {name: count for name, count in counts.items() if count < total}
        await _add_partitions(admin, dict.fromkeys(before, total), "")
    finally:
        await admin.close()
    ensured = await ensure_topics(replace(settings, partitions=total))
    return Grown(before, ensured)


async def _source_partitions(
    admin: AIOKafkaAdminClient, settings: Settings, existing: set[str]
) -> int:
    """The partition count a missing source topic is created with: the existing source
    topics' (refused, before anything is created, when they differ), else LOOPLINE_PARTITIONS.
    A source topic created with another count than the others would split cases."""
    present = [settings.topic(n) for n in SOURCE_TOPICS if settings.topic(n) in existing]
    if not present:
        return settings.partitions
    counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(present)}
    _require_co_partitioned({name: count for name, count in counts.items() if count})
    found = max(counts.values())
    if found and found != settings.partitions and len(present) < len(SOURCE_TOPICS):
        log.warning(
            "creating the missing source topics with %d partitions, as the existing ones have "
            "(LOOPLINE_PARTITIONS is %d)",
            found,
            settings.partitions,
        )
    return found or settings.partitions


def _require_co_partitioned(found: dict[str, int]) -> None:
    """Refuse source topics (name -> partition count) with different counts."""
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in found.items())
        raise TopicLayoutError(
            f"the source topics have different partition counts ({listed}): a case's events "
            "are joined within one partition, so each needs the same count. Give them all "
            f"{max(found.values())} (or more) with `loopline topics --partitions N`; cases open "
            "at that moment are split (README, Guarantees: partition counts)"
        )


async def _align_partitions(
    admin: AIOKafkaAdminClient, settings: Settings, made: set[str]
) -> tuple[int, list[str]]:
    """The source topics' partition count (LOOPLINE_PARTITIONS while none exists), once they
    are found co-partitioned, and the state changelogs given more partitions to match.

    A worker joins a case's events (keyed by case_id) within one partition number of every
    source topic: with one topic given more partitions, a case's input and resolution land in
    different partitions and are never joined, and the numbers go wrong without an error, so
    that is refused. Each stage writes its checkpoint to the changelog partition of the number
    it reads (stage 1: the source topics; stage 2: partials), so a changelog with fewer
    partitions failed every batch of the new ones; it gets partitions added (the records it
    holds stay where they are). Only topics in ``made`` are described: a metadata request for
    another would have a broker that auto-creates topics make it, with its default count."""
    sources = [settings.topic(name) for name in SOURCE_TOPICS]
    partials = settings.topic("partials")
    feeds = {
        changelog_topic(settings, PARTITION_STATE): sources,
        changelog_topic(settings, LOOP_STATE): [partials],
    }
    described = [n for n in [*sources, partials, *feeds] if n in made]
    counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(described)}
    found = {name: counts[name] for name in sources if counts.get(name)}
    # checked again after creating: another process may have made a source topic meanwhile
    _require_co_partitioned(found)
    wanted = {
        changelog: max((counts.get(feed, 0) for feed in fed), default=0)
        for changelog, fed in feeds.items()
    }
    grow = {
        changelog: count
        for changelog, count in wanted.items()
        if 0 < counts.get(changelog, 0) < count
    }
    await _add_partitions(admin, grow, ", as its stage reads")
    return next(iter(found.values()), settings.partitions), sorted(grow)


async def _add_partitions(admin: AIOKafkaAdminClient, totals: dict[str, int], why: str) -> None:
    """Give each topic of ``totals`` that many partitions, in one request, and wait for their
    leaders; a refusal is a TopicLayoutError naming the topic (``why``: after the count)."""
    if not totals:
        return
    response = await admin.create_partitions(
        {name: NewPartitions(total) for name, total in totals.items()}
    )
    for topic, code, message in response.topic_errors:
        if code:
            raise TopicLayoutError(
                f"cannot add partitions to {topic} (to {totals[topic]}{why}): "
                f"{message or f'error code {code}'}"
            )
    await _wait_for_leaders(admin, sorted(totals))


#: What a setting loopline gives a topic guards: said when the topic's own setting defeats it.
_GUARDS = {
    "cleanup.policy": "eval cases past its retention are deleted, and a worker whose state "
    "starts anew, `loopline evalset` and the review page no longer have them in the eval set",
    "retention.ms": "a review decision deleted while its candidate is still on the "
    "candidates topic makes that candidate open again at the review page's next start",
}


async def _mend_settings(
    admin: AIOKafkaAdminClient, wanted: Mapping[str, Mapping[str, str]]
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Give each existing topic the settings loopline makes it with (``wanted``, by topic):
    max.message.bytes where it has less; any other where it goes by the broker's default (a
    setting the topic was given is its operator's: warned about, kept). AlterConfigs replaces
    a topic's own settings as a whole, so the others are written back as they are. A broker
    that refuses is warned about, not fatal. Returns the topics whose limit it raised, and the
    other settings it gave, by topic."""
    raised: list[str] = []
    mended: dict[str, dict[str, str]] = {}
    if not wanted:
        return raised, mended
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted]
    )
    for response in described:
        for error, _, _, name, entries in response.resources:
            if error:
                log.warning("cannot read the settings of topic %s: error code %d", name, error)
                continue
            found = {e[0]: (e[1], e[3] == _DYNAMIC_TOPIC_CONFIG) for e in entries}
            changes = _changes(name, wanted[name], found)
            if not changes:
                continue
            own = {key: value for key, (value, is_own) in found.items() if is_own}
            altered = await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name, own | changes)]
            )
            for code, reason, *_ in (r for a in altered for r in a.resources):
                if not code:
                    if changes.pop(LIMIT, None) is not None:
                        raised.append(name)
                    if changes:
                        mended[name] = changes
                    continue
                for key, value in changes.items():
                    _warn_refused(name, key, found[key][0], value, reason or f"error code {code}")
    return raised, mended


def _changes(
    name: str, wanted: Mapping[str, str], found: Mapping[str, tuple[str, bool]]
) -> dict[str, str]:
    """The settings of ``wanted`` to give a topic whose settings are ``found`` (key -> value
    and whether it is the topic's own)."""
    changes: dict[str, str] = {}
    for key, value in wanted.items():
        if key not in found:
            continue  # a broker that does not say it
        current, own = found[key]
        if key == LIMIT:
            if int(current) < int(value):
                changes[key] = value
        elif current != value:
            if own:
                log.warning(
                    "topic %s has its own %s=%s where loopline makes it %s: %s. To mend: "
                    "kafka-configs.sh --alter --entity-type topics --entity-name %s "
                    "--add-config %s=%s",
                    name, key, _shown(key, current), value, _GUARDS.get(key, "see the README"),
                    name, key, value,
                )  # fmt: skip
            else:
                changes[key] = value
    return changes


def _warn_refused(name: str, key: str, current: str, value: str, why: str) -> None:
    if key == LIMIT:
        log.warning(
            "cannot raise max.message.bytes of topic %s from %s to %s (%s): set it "
            "with kafka-configs.sh --alter --entity-type topics --entity-name %s "
            "--add-config max.message.bytes=%s",
            name, current, value, why, name, value,
        )  # fmt: skip
    else:
        log.warning(
            "cannot set %s of topic %s to %s (%s): set it with kafka-configs.sh --alter "
            "--entity-type topics --entity-name %s --add-config %s=%s",
            key, name, value, why, name, key, value,
        )  # fmt: skip


def _shown(key: str, value: str) -> str:
    """A setting's value, a retention with its days or hours."""
    if key != "retention.ms" or int(value) < 0:
        return value
    hours = int(value) / 3_600_000
    return f"{value} ({hours / 24:g} days)" if hours >= 48 else f"{value} ({hours:g} h)"


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """Return once every partition of the new topics has a leader: a consumer that joins its
    group before that is assigned nothing and waits for the next metadata refresh (minutes)."""
    async with asyncio.timeout(60):
        while True:
            described = await admin.describe_topics(names)
            if all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            await asyncio.sleep(0.2)


async def read_to_end(settings: Settings, name: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every message (key, value) of a loopline topic, from its beginning to its end as of
    now; [] when the topic does not exist."""
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # so no reset to "latest" can race the seek below
        isolation_level="read_committed",  # as the workers read (pipeline.worker)
    )
    out: list[tuple[bytes | None, bytes | None]] = []
    try:  # stopped also when it cannot start, or its connections are left open
        await consumer.start()
        partitions = await _assigned(consumer, topic)
        if not partitions:
            return []
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        for tp in partitions:
            while await consumer.position(tp) < end[tp]:
                for messages in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    out.extend((m.key, m.value) for m in messages)
    finally:
        await consumer.stop()
    return out


async def _assigned(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions a group-less consumer subscribed to ``topic`` was given (all of them),
    or none when the topic does not exist."""
    if topic not in await consumer.topics():
        return []
    async with asyncio.timeout(30):
        while not consumer.assignment():  # noqa: ASYNC110 - aiokafka offers no event for it
            await asyncio.sleep(0.05)
    return sorted(consumer.assignment())
