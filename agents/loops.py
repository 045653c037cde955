"""Stage 2: merge the partials of every partition into each loop's global numbers, and publish
them (gauges on /metrics, MetricSnapshot records on loopline.metrics).

The repartition topic is keyed by loop, so each loop is merged by exactly one worker and every
number it exports is global: no two workers export the same loop, and Prometheus sees each
loop's gauges once. State is checkpointed like stage 1's (pipeline.checkpoint).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, cast

import faust

from agents.batches import BatchTopic, consume
from agents.fence import Fence
from agents.ingest import DeadLetters
from agents.raw import raw_topic
from agents.state import CheckpointedPartitions, aligned_topics, state_table
from pipeline.checkpoint import next_offsets
from pipeline.codec import Codec
from pipeline.core import iso
from pipeline.fastjson import loads
from pipeline.formats import NewerFormat
from pipeline.loopview import LoopView, partial_from_json
from pipeline.metrics import PipelineMetrics
from pipeline.settings import Settings
from pipeline.topics import LOOP_STATE

log = logging.getLogger(__name__)


def register(
    app: faust.App,
    settings: Settings,
    codec: Codec,
    metrics: PipelineMetrics,
    partials: BatchTopic,
    fence: Fence,
) -> Any:
    dead_letters = DeadLetters(app, settings, codec, metrics)
    snapshots = raw_topic(app, settings.topic("metrics"))
    alerts = raw_topic(app, settings.topic("alerts"))
    candidates = raw_topic(app, settings.topic("eval-candidates"))
    config = settings.core_config()
    producer_id = f"{settings.app_id}@{settings.web_host}:{settings.web_port}"

    def build(partition: int, records: Mapping[str, Any]) -> LoopView:
        return LoopView.from_records(config, records.items())

    table = state_table(app, LOOP_STATE, settings.partitions)
    views = CheckpointedPartitions(app, table, build, align_topics=aligned_topics(settings))

    async def merge(by_partition: dict[int, list[Any]]) -> None:
        for partition, messages in by_partition.items():
            view, checkpoint = views.get(partition)
            failures = []
            for message in checkpoint.unapplied(messages):
                try:
                    view.apply(partial_from_json(loads(message.value)))
                except NewerFormat:
                    raise  # the worker stops: its partitions go to a worker that reads it
                except Exception as exc:  # never stop merging over one bad partial
                    log.exception("bad partial")
                    error = f"{type(exc).__name__}: {exc}"
                    failures.append((message, "processing_error", error))
            await merges.ensure_member(by_partition)  # nothing written if it lost them
            for failure in failures:  # durable before the checkpoint: nothing lost
                await dead_letters.send(*failure)
            # Alerts are durable before the checkpoint that records their episode state;
            # after a crash in between, the same records (same event_id) are sent again.
            for alert in view.evaluate():
                log.info("alert %s %s: %s", alert["state"], alert["fingerprint"], alert["summary"])
                value = codec.encode("Alert", alert)
                delivery = await alerts.send(key=alert["fingerprint"].encode(), value=value)
                await delivery  # durable before the checkpoint that records the episode
            # Candidates likewise; the sampler's state (picked cases) is in the checkpoint.
            for candidate in view.candidates:
                value = codec.encode("EvalCandidate", candidate)
                delivery = await candidates.send(key=candidate["case_id"].encode(), value=value)
                await delivery
                for reason in candidate["reasons"]:
                    metrics.eval_candidates.labels(candidate["loop"], reason).inc()
            view.candidates = []
            await views.commit(partition, view.changed_records(), next_offsets(messages))

    merges = consume(app, partials, merge, "loopline.loops", fence)

    partials_topic = partials.get_topic_name()

    def load_assigned() -> None:
        """Load every owned partition's view once recovery is done, so a restarted worker
        exports its loops before any new partial arrives. Not during a rebalance: its
        recovery writes the changelogs' records into the store a view is loaded from (and
        Faust's ``completed`` stays set from the first recovery on)."""
        if app.rebalancing or not cast(Any, app.tables).recovery.completed.is_set():
            return
        for tp in app.consumer.assignment():
            if tp.topic == partials_topic:
                views.get(tp.partition)

    @app.timer(interval=settings.snapshot_interval_seconds)  # type: ignore[untyped-decorator]
    async def publish_numbers() -> None:
        # An exception escaping a Faust timer crashes the whole app: log it, try next time.
        try:
            await publish_snapshot()
        except Exception:
            log.exception("publishing the snapshot failed; trying again next interval")

    async def publish_snapshot() -> None:
        load_assigned()
        combined: dict[str, Any] = {}
        unresolved: dict[str, int] = {}
        firing: dict[tuple[str, str, str], int] = {}
        as_of = 0
        for view in views.cores():
            view_as_of = view.default_as_of()
            snapshot = view.snapshot(view_as_of)
            counts = view.unresolved(view_as_of)
            as_of = max(as_of, view_as_of)
            combined.update(snapshot["loops"])
            unresolved.update(counts)
            firing.update(view.firing())
            for loop, data in snapshot["loops"].items():
                record = {
                    "event_id": f"{producer_id}:{loop}:{view_as_of}",
                    "ts": view_as_of,
                    "loop": loop,
                    "producer": producer_id,
                    "unresolved_cases": counts.get(loop, 0),
                    "windows_json": json.dumps(data["windows"], separators=(",", ":")),
                    "drift_json": json.dumps(data["drift"], separators=(",", ":")),
                }
                value = codec.encode("MetricSnapshot", record)
                await snapshots.send(key=loop.encode(), value=value)
        metrics.numbers.update({"as_of": iso(as_of), "loops": combined}, unresolved, firing)

    return views
