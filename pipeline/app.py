"""The Faust application: one factory, no module-level app, so nothing happens at import."""

from __future__ import annotations

from typing import Any

import faust

from pipeline.codec import Codec
from pipeline.metrics import CONTENT_TYPE_LATEST, PipelineMetrics
from pipeline.settings import Settings


def broker_urls(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap_servers.split(",") if host.strip()]


def create_app(settings: Settings, metrics: PipelineMetrics, codec: Codec) -> faust.App:
    """A Faust app with loopline's agents registered and /metrics served on its web port."""
    from agents import ingest  # agents import pipeline, so they are wired in here, not at import

    app = faust.App(
        settings.app_id,
        broker=broker_urls(settings.bootstrap_servers),
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
        autodiscover=False,
    )

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    ingest.register(app, settings, codec, metrics)
    return app
