"""One frozen, typed settings object, read from LOOPLINE_* environment variables at the edge."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core import CoreConfig


class SettingsError(ValueError):
    """An environment variable holds a value loopline cannot use."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be an integer, 0 or more")
    return value


def _finite(raw: str) -> float:
    """A number that is not nan or inf: either passes or fails later checks wrongly (a rate of
    nan makes every cost nan, an interval of inf never snapshots)."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _positive_float(raw: str) -> float:
    value = _finite(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = _finite(raw)
    if not value >= 0:
        raise ValueError("must be a number, 0 or more")
    return value


def _session_timeout(raw: str) -> float:
    value = float(raw)
    if not 6 <= value <= 1800:  # the broker's group.min/max.session.timeout.ms defaults
        raise ValueError("must be between 6 and 1800 seconds")
    return value


def _instance_id(raw: str) -> str | None:
    """Empty (as a template may leave it) means dynamic membership, as unset does."""
    return _prefix(raw.strip()) or None


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _prefix(raw: str) -> str:
    if raw and not all(c.isalnum() or c in "._-" for c in raw):
        raise ValueError("may hold only letters, digits, '.', '_' and '-'")
    return raw


def _names(raw: str) -> frozenset[str]:
    """``refunds,kyc-review`` -> frozenset({"refunds", "kyc-review"})."""
    return frozenset(filter(None, (part.strip() for part in raw.split(","))))


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _per_loop(raw: str) -> dict[str, float]:
    """``refunds=45,kyc-review=60`` -> {"refunds": 45.0, "kyc-review": 60.0}."""
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        loop, sep, number = item.partition("=")
        if not sep or not loop.strip():
            raise ValueError(f"expected loop=number pairs separated by commas, got {item!r}")
        value = _finite(number)
        if value < 0:
            raise ValueError(f"{loop.strip()}: must not be negative")
        values[loop.strip()] = value
    return values


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _log_level(raw: str) -> str:
    """One of the levels the worker (Faust), the review page (uvicorn) and the sink all know."""
    value = raw.strip().lower()
    if value not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("must be one of debug, info, warning, error, critical")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "log_level": _log_level,
    "partitions": _positive_int,
    "replication_factor": _positive_int,
    "web_port": _port,
    "topic_prefix": _prefix,
    "instance_id": _instance_id,
    "session_timeout_seconds": _session_timeout,
    "data_dir": _path,
    "kafka_home": _path,
    "bucket_seconds": _positive_int,
    "snapshot_interval_seconds": _positive_float,
    "dedupe_horizon_seconds": _positive_int,
    "allowed_lateness_seconds": _positive_int,
    "max_ahead_seconds": _positive_int,
    "max_cases_per_partition": _non_negative_int,
    "fault_stall_at_check": _non_negative_int,
    "fault_hang_at_check": _non_negative_int,
    "sla_seconds": _positive_int,
    "loop_sla_seconds": _per_loop,
    "hourly_rates": _per_loop,
    "loops": _names,
    "archive_path": _path,
    "archive_batch_rows": _positive_int,
    "archive_batch_seconds": _positive_float,
    "archive_hold_seconds": _non_negative_float,
    "archive_metrics_port": _port,
    "rules": _path,
    "review_port": _port,
    "review_claim_seconds": _positive_float,
    "security_protocol": _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": _choice("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
    "ssl_cafile": _path,
}


@dataclass(frozen=True)
class Settings:
    """Everything a loopline process needs to know; secrets never appear in ``repr``."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "loopline."
    partitions: int = 4
    replication_factor: int = 1
    app_id: str = "loopline"
    # How long the group waits for a worker that stopped heart-beating (killed, hung, lost)
    # before its partitions go to the others; a worker restarted takes that long to rejoin.
    session_timeout_seconds: float = 15.0
    # Static group membership: a worker restarted with the same id takes its partitions back
    # at once, without a rebalance. Unique per worker (a pod's name); None = dynamic.
    instance_id: str | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    data_dir: Path = Path(".loopline")
    kafka_home: Path = field(default_factory=lambda: Path.home() / ".cache/loopline/kafka")
    log_level: str = "info"
    bucket_seconds: int = 10
    snapshot_interval_seconds: float = 5.0
    dedupe_horizon_seconds: int = 3600
    allowed_lateness_seconds: int = 3600
    # How far an event's ts may be ahead of its Kafka message's time (dead letter future_ts).
    max_ahead_seconds: int = 3600
    # The most cases one source partition's state holds (least recently touched evicted
    # first, counted in loopline_evicted_cases_total); 0 = no cap.
    max_cases_per_partition: int = 0
    # Fault injection, for tests: stage 1 stops its own process (SIGSTOP) at its Nth check of
    # its membership, with a batch in hand and nothing of it written (agents.fence); 0 = never.
    fault_stall_at_check: int = 0
    # ... and waits for good there instead, the process alive (a stage stuck); 0 = never.
    fault_hang_at_check: int = 0
    sla_seconds: int = 3600
    loop_sla_seconds: Mapping[str, float] = field(default_factory=dict)
    hourly_rates: Mapping[str, float] = field(default_factory=dict)
    loops: frozenset[str] = frozenset()  # when set, any other loop is counted as "other"
    archive_path: Path | None = None  # the DuckDB archive; default <data_dir>/archive.duckdb
    archive_batch_rows: int = 50_000
    archive_batch_seconds: float = 5.0
    # While batches follow each other (a backlog), the sink keeps the archive open for up to
    # this long instead of closing it (and checkpointing) after every batch; 0 = close always
    archive_hold_seconds: float = 10.0
    archive_metrics_port: int = 6068  # the archive sink's /metrics (sinks.metrics)
    rules: Path | None = None  # alert rules and drift settings (TOML); None = the defaults
    review_port: int = 6070
    review_claim_seconds: float = 600.0
    review_token: str | None = field(default=None, repr=False)  # secret: the page's login
    review_secret: str | None = field(default=None, repr=False)  # secret: signs the sessions
    # Kafka connection security (pipeline.kafka_security), for every client alike.
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str = "SCRAM-SHA-512"  # or SCRAM-SHA-256, PLAIN
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)  # secret
    ssl_cafile: Path | None = None  # CA certificates (PEM) to verify the brokers; None = system

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read LOOPLINE_<FIELD> variables; a bad value raises SettingsError naming it."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f"LOOPLINE_{f.name.upper()}"
            if var not in source:
                continue
            parse = _PARSERS.get(f.name, str)
            try:
                values[f.name] = parse(source[var])
            except ValueError as exc:
                raise SettingsError(f"{var}={source[var]!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check_security()
        return settings

    @classmethod
    def unknown_variables(cls, env: Mapping[str, str] | None = None) -> list[str]:
        """A sentence for each LOOPLINE_* variable that names no setting, with the setting it
        is likely a typo of: ``from_env`` ignores such a variable, so without this a typo (say
        LOOPLINE_HOURLY_RATE) silently left the default in force (human time priced at 0)."""
        source = os.environ if env is None else env
        known = [f"LOOPLINE_{f.name.upper()}" for f in fields(cls)]
        found = []
        for var in sorted(v for v in source if v.startswith("LOOPLINE_") and v not in known):
            close = difflib.get_close_matches(var, known, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            found.append(f"{var} is not a loopline setting and is ignored{hint}")
        return found

    def check_security(self) -> None:
        """SASL needs a username and a password; a CA file must exist."""
        if self.security_protocol.startswith("SASL"):
            for name in ("sasl_username", "sasl_password"):
                if not getattr(self, name):
                    raise SettingsError(
                        f"LOOPLINE_SECURITY_PROTOCOL={self.security_protocol} needs "
                        f"LOOPLINE_{name.upper()}"
                    )
        if self.ssl_cafile is not None and not self.ssl_cafile.is_file():
            raise SettingsError(f"LOOPLINE_SSL_CAFILE={self.ssl_cafile}: no such file")

    @property
    def bootstrap_port(self) -> int:
        """The port of the first bootstrap server (the local broker's port), 9092 if none."""
        first = self.bootstrap_servers.split(",")[0]
        return int(first.rsplit(":", 1)[1]) if ":" in first else 9092

    def core_config(self) -> CoreConfig:
        """The pure core's configuration (pipeline.processor) from these settings; raises
        pipeline.rules.RulesError when the rules file cannot be used."""
        from pipeline.core import CoreConfig
        from pipeline.rules import AlertRules

        return CoreConfig(
            bucket_ms=self.bucket_seconds * 1000,
            dedupe_horizon_ms=self.dedupe_horizon_seconds * 1000,
            allowed_lateness_ms=self.allowed_lateness_seconds * 1000,
            max_ahead_ms=self.max_ahead_seconds * 1000,
            default_sla_ms=self.sla_seconds * 1000,
            sla_ms={loop: int(s * 1000) for loop, s in self.loop_sla_seconds.items()},
            hourly_rates=dict(self.hourly_rates),
            loops=self.loops,
            rules=AlertRules.load(self.rules),
            max_cases_per_partition=self.max_cases_per_partition,
        )

    @property
    def archive_file(self) -> Path:
        return self.archive_path or self.data_dir / "archive.duckdb"

    def topic(self, name: str) -> str:
        """The full Kafka topic name of a logical topic such as ``inputs``."""
        return f"{self.topic_prefix}{name}"
