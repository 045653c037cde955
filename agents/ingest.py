"""Consume the source topics, decode every record, count it, dead-letter what fails."""

from __future__ import annotations

import logging
from typing import Any

import faust

from pipeline.codec import Codec, CodecError
from pipeline.deadletter import dead_letter
from pipeline.metrics import PipelineMetrics
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
    expected = {settings.topic(name): RECORD_OF[name] for name in SOURCE_TOPICS}

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

    @app.agent(source, name="loopline.ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            try:
                codec.decode(message.value, expected=expected[message.topic])
            except CodecError as exc:
                await send_dead_letter(message, exc.reason, str(exc))
                continue
            except Exception as exc:  # a worker never dies on one message
                log.exception("processing failed")
                await send_dead_letter(message, "processing_error", f"{type(exc).__name__}: {exc}")
                continue
            metrics.events.labels(message.topic, "ok").inc()

    return ingest
