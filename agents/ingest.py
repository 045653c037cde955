"""Consume the source topics, decode every record, feed the five-numbers core, dead-letter
what fails, and publish the numbers (gauges on /metrics, snapshots on loopline.metrics)."""

from __future__ import annotations

import json
import logging
from typing import Any

import faust

from pipeline.codec import Codec, CodecError
from pipeline.deadletter import dead_letter
from pipeline.metrics import PipelineMetrics
from pipeline.processor import Processor, verdicts_of
from pipeline.settings import Settings
from pipeline.topics import RECORD_OF, SOURCE_TOPICS

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings, codec: Codec, metrics: PipelineMetrics) -> Any:
    source = app.topic(
        *(settings.topic(name) for name in SOURCE_TOPICS),
        key_serializer="raw",
        value_serializer="raw",
    )
    dlq = app.topic(settings.topic("dlq"), key_serializer="raw", value_serializer="raw")
    snapshots = app.topic(settings.topic("metrics"), key_serializer="raw", value_serializer="raw")
    logical = {settings.topic(name): name for name in SOURCE_TOPICS}
    processor = Processor(
        settings.core_config(),
        on_latency=lambda loop, seconds: metrics.latency.labels(loop).observe(seconds),
    )
    producer_id = f"{settings.app_id}@{settings.web_host}:{settings.web_port}"

    async def send_dead_letter(message: Any, reason: str, error: str) -> None:
        record = dead_letter(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            reason=reason,
            error=error,
        )
        delivery = await dlq.send(value=codec.encode("DeadLetter", record))
        await delivery  # durable before this offset can be committed: nothing lost
        metrics.dead_letters.labels(message.topic, reason).inc()
        metrics.events.labels(message.topic, "dead_letter").inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, error
        )

    def count_facts(topic: str, record: dict[str, Any]) -> None:
        loop = processor.loop_label(str(record["loop"]))
        if topic == "resolutions":
            metrics.resolutions.labels(loop, record["resolver"], record["outcome"]).inc()
        for suite, passed in verdicts_of(topic, record):
            metrics.eval_verdicts.labels(loop, suite.lower(), str(passed).lower()).inc()

    @app.agent(source, name="loopline.ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            topic = logical[message.topic]
            try:
                record = codec.decode(message.value, expected=RECORD_OF[topic]).record
                status = processor.process(topic, record)
                if status == "ok":
                    count_facts(topic, record)
            except CodecError as exc:
                await send_dead_letter(message, exc.reason, str(exc))
                continue
            except Exception as exc:  # a worker never dies on one message
                log.exception("processing failed")
                await send_dead_letter(message, "processing_error", f"{type(exc).__name__}: {exc}")
                continue
            metrics.events.labels(message.topic, status).inc()

    @app.timer(interval=settings.snapshot_interval_seconds)  # type: ignore[untyped-decorator]
    async def publish_numbers() -> None:
        if not processor.series:
            return
        as_of = processor.default_as_of()
        snapshot = processor.snapshot(as_of)
        unresolved = processor.unresolved()
        metrics.numbers.update(snapshot, unresolved)
        for loop, data in snapshot["loops"].items():
            record = {
                "event_id": f"{producer_id}:{loop}:{as_of}",
                "ts": as_of,
                "loop": loop,
                "producer": producer_id,
                "unresolved_cases": unresolved.get(loop, 0),
                "windows_json": json.dumps(data["windows"], separators=(",", ":")),
            }
            await snapshots.send(key=loop.encode(), value=codec.encode("MetricSnapshot", record))

    return ingest
