"""What the ``loopline`` commands share: the settings, messages on stderr, errors as reasons."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import click
from aiokafka.errors import KafkaError

from pipeline.clitypes import OutputFile
from pipeline.core import CoreConfig
from pipeline.publisher import NotDelivered
from pipeline.rules import RulesError
from pipeline.settings import Settings
from pipeline.topics import TopicLayoutError


def settings_of(ctx: click.Context) -> Settings:
    """The settings ``main`` read from the LOOPLINE_* environment."""
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def err(message: str) -> None:
    """Progress and results for people, on stderr (stdout is for data)."""
    click.echo(message, err=True)


def kafka_failure(settings: Settings, exc: Exception) -> str:
    """Why Kafka refused, without the password."""
    who = f" as {settings.sasl_username}" if settings.sasl_username else ""
    name, text = type(exc).__name__, str(exc)
    return (
        f"cannot use Kafka at {settings.bootstrap_servers} ({settings.security_protocol}{who}): "
        + (text if text.startswith(name) else f"{name}: {text}")  # aiokafka's may name it
    )


T = TypeVar("T")


@contextlib.contextmanager
def kafka_refusals_as_reasons(settings: Settings) -> Iterator[None]:
    """Kafka's refusal (unreachable, wrong password, no permission, events not confirmed) or
    source topics that are not co-partitioned end the command with the reason, not a
    traceback."""
    try:
        yield
    except (KafkaError, NotDelivered) as exc:
        raise click.ClickException(kafka_failure(settings, exc)) from None
    except TopicLayoutError as exc:
        raise click.ClickException(str(exc)) from None


def on_kafka(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, with Kafka's refusals as the command's reason."""
    with kafka_refusals_as_reasons(settings):
        return asyncio.run(work)


def require_free_port(host: str, port: int, what: str, setting: str) -> None:
    """End the command with the reason when another process listens on the port it would
    serve on, before any work (the server's own failure comes later, inside a traceback).
    SO_REUSEADDR as asyncio's and uvicorn's servers bind: a closing connection is no owner."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve {what} on {host}:{port}: {exc.strerror} ({setting})"
            ) from None


def core_config(settings: Settings) -> CoreConfig:
    """The core configuration, or the rules file's error as the command's reason."""
    try:
        return settings.core_config()
    except RulesError as exc:
        raise click.ClickException(f"LOOPLINE_RULES: {exc}") from None


def output_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--output/-o FILE``: where a command writes (default: stdout)."""
    return click.option(
        "--output",
        "-o",
        type=OutputFile(),
        default=None,
        help=help_text,
    )
