"""How every loopline Kafka client connects: PLAINTEXT, or TLS and/or SASL (SCRAM, PLAIN).

One place turns the settings into aiokafka keyword arguments and Faust credentials, so the
workers, the SDK, the generator, the archive sink and the review page connect alike. The
password is only ever handed to the client library: never logged, never in ``repr``.
"""

from __future__ import annotations

from typing import Any

import faust
from aiokafka.helpers import create_ssl_context

from pipeline.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


def _ssl_context(settings: Settings) -> Any:
    if not settings.security_protocol.endswith("SSL"):
        return None
    cafile = None if settings.ssl_cafile is None else str(settings.ssl_cafile)
    return create_ssl_context(cafile=cafile)


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    context = _ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    return options


def faust_credentials(settings: Settings) -> Any:
    """The Faust app's ``broker_credentials`` (None for PLAINTEXT)."""
    context = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
