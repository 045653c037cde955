"""The Faust application: one factory, no module-level app, so nothing happens at import."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

from pipeline.codec import Codec
from pipeline.health import readiness
from pipeline.kafka_security import faust_credentials
from pipeline.metrics import CONTENT_TYPE_LATEST, PartitionState, PipelineMetrics
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS, STATE_MESSAGE_BYTES

log = logging.getLogger(__name__)


def broker_urls(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap_servers.split(",") if host.strip()]


def faust_app(settings: Settings) -> faust.App:
    """The Faust app as the worker configures it, with nothing registered yet (bench/faust_only.py
    measures it without the stages)."""
    return faust.App(
        settings.app_id,
        broker=broker_urls(settings.bootstrap_servers),
        broker_credentials=faust_credentials(settings),
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        datadir=str(settings.data_dir / settings.app_id),
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_host=settings.web_host,
        consumer_auto_offset_reset="earliest",
        # A worker killed holds its partitions until the session times out (Faust's default,
        # 60 s, was most of a restart's time in bench/recovery); heartbeats come from the
        # consumer's own thread, every third of it at most.
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_seconds / 3),
        broker_request_timeout=max(90.0, settings.session_timeout_seconds),
        consumer_group_instance_id=settings.instance_id,
        # Larger fetches and stream buffers: the agents take events in batches of thousands.
        broker_max_poll_records=5000,
        stream_buffer_maxsize=20000,
        consumer_max_fetch_size=4 << 20,
        # Partitions added to the topics are assigned after the consumer's next metadata
        # refresh: within half a minute, not Faust's 5 minutes of their events left unread.
        consumer_metadata_max_age_ms=30_000,
        # A batch's changelog records go out in few, large produce requests; a bucket's
        # partial and checkpoint records may be larger than Kafka's default message limit.
        producer_max_batch_size=512 << 10,
        producer_max_request_size=STATE_MESSAGE_BYTES,
        # No standby copies of the tables: with the memory store a standby's copy is never
        # used (a partition that moves to it is restored from its changelog's first record,
        # and Faust drops other partitions' keys when a recovery ends), and keeping it up to
        # date took every other worker's changelog records through Faust's per-message path
        # (with two workers, a sixth of a worker's time in bench/throughput).
        table_standby_replicas=0,
        autodiscover=False,
    )


def create_app(settings: Settings, metrics: PipelineMetrics, codec: Codec) -> faust.App:
    """A Faust app with loopline's agents registered and /metrics served on its web port."""
    # agents import pipeline, so they are wired in here, not at import
    from agents import ingest, lag, loops
    from agents.batches import batch_topic
    from agents.fence import Fence, StallWatch
    from agents.state import records_to_restore, worker_state

    app = faust_app(settings)
    sources = {settings.topic(name) for name in SOURCE_TOPICS}

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "alive"})  # the event loop answered (pipeline.health)

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready, body = readiness(worker_state(app, sources))
        return web.json(body, status=200 if ready else 503)

    partials = batch_topic(app, settings.topic("partials"))
    watch = StallWatch(settings.session_timeout_seconds / 3)

    @app.timer(interval=0.5)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        """The event loop's pulse: a gap in it is a stall of the whole process."""
        watch.tick()

    stage1_fence = Fence(app, watch, settings.fault_stall_at_check, settings.fault_hang_at_check)
    stage1 = ingest.register(app, settings, codec, metrics, partials, stage1_fence)
    stage2 = loops.register(app, settings, codec, metrics, partials, Fence(app, watch))
    metrics.restore_remaining.set_function(lambda: records_to_restore(app))
    metrics.partitions.watch(
        lambda: {
            p: PartitionState(len(core.cases), core.watermark_ms)
            for p, (core, _) in stage1.loaded.items()
        }
    )

    # The stages' topics: the tables' changelogs are assigned too, but only read to restore
    # (and for standbys), so their "lag" is the worker's own writes since, growing for good.
    consumed = sources | {partials.get_topic_name()}

    @app.timer(interval=settings.snapshot_interval_seconds)  # type: ignore[untyped-decorator]
    async def measure_lag() -> None:
        """loopline_consumer_lag_messages for every partition of the stages' topics this
        worker holds now (agents.lag: the end offsets asked of the broker)."""
        try:
            async with asyncio.timeout(settings.snapshot_interval_seconds):
                lags = await lag.measure(app.consumer, consumed)
        except TimeoutError:  # the broker away: said by everything else, so not every interval
            log.debug("the end offsets did not come in time; the consumer lag stands")
            return
        except Exception:  # a metric must never stop the worker (a timer's error crashes Faust)
            log.exception("measuring the consumer lag failed; trying again next interval")
            return
        metrics.consumer_lag.clear()  # partitions that moved away are not this worker's lag
        for (topic, partition), value in lags.items():
            metrics.consumer_lag.labels(topic, str(partition)).set(value)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def revoke_state(sender: Any, revoked: Any, **_: Any) -> None:
        # Kept until the assignment, which gives it back or not (agents.state.settle).
        stage2.revoke({tp.partition for tp in revoked if tp.topic == settings.topic("partials")})
        stage1.revoke({tp.partition for tp in revoked if tp.topic in sources})

    return app
