"""All configuration, read from the environment in one place.

Nothing else in the package reads ``os.environ``; pass a :class:`Settings`
around instead, so tests and ``journey up`` can build one explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.events import DEFAULT_CHANNELS, MAX_ENVELOPE_EVENTS

EVENTS_TOPIC = "journey.events"
REJECTED_TOPIC = "journey.events.rejected"
TRANSITIONS_TOPIC = "journey.transitions"


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _list(raw: str | None) -> tuple[str, ...]:
    """A comma-separated setting; blanks around items and empty items are ignored."""
    return tuple(item.strip() for item in (raw or "").split(",") if item.strip())


class Secret(str):
    """A string that never shows itself in a repr, a log line or a traceback's locals."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaAuth:
    """How every Kafka client of the project authenticates (worker, producers, collector).

    ``protocol`` is Kafka's security.protocol. TLS uses the system's CA bundle
    unless ``ca_file`` names one; SASL needs ``username`` and ``password``.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                f"JOURNEY_KAFKA_SECURITY_PROTOCOL={self.protocol!r}: use one of "
                + ", ".join(SECURITY_PROTOCOLS)
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise SettingsError(
                f"JOURNEY_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: use one of "
                + ", ".join(SASL_MECHANISMS)
            )
        if self.sasl and not (self.username and self.password):
            raise SettingsError(
                f"JOURNEY_KAFKA_SECURITY_PROTOCOL={self.protocol} needs "
                "JOURNEY_KAFKA_USERNAME and JOURNEY_KAFKA_PASSWORD"
            )

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaAuth:
        ca_file = env.get("JOURNEY_KAFKA_CA_FILE")
        return cls(
            protocol=env.get("JOURNEY_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=env.get("JOURNEY_KAFKA_SASL_MECHANISM", "PLAIN").upper(),
            username=env.get("JOURNEY_KAFKA_USERNAME", ""),
            password=Secret(env.get("JOURNEY_KAFKA_PASSWORD", "")),
            ca_file=Path(ca_file) if ca_file else None,
        )

    def to_env(self) -> dict[str, str]:
        env = {
            "JOURNEY_KAFKA_SECURITY_PROTOCOL": self.protocol,
            "JOURNEY_KAFKA_SASL_MECHANISM": self.sasl_mechanism,
            "JOURNEY_KAFKA_USERNAME": self.username,
            "JOURNEY_KAFKA_PASSWORD": str(self.password),
        }
        if self.ca_file is not None:
            env["JOURNEY_KAFKA_CA_FILE"] = str(self.ca_file)
        return env


@dataclass(frozen=True)
class Settings:
    kafka_url: str = "kafka://127.0.0.1:9092"
    kafka_auth: KafkaAuth = KafkaAuth()
    redis_url: str = "redis://127.0.0.1:6379/0"
    clickhouse_dsn: str = "chdb:///var/lib/journey/chdb"
    journeys_path: Path | None = None
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    # Faust consumer group; all workers of one deployment share it.
    app_id: str = "journey-tracker"
    # One take() batch: up to this many events, or whatever arrived within batch_seconds.
    # Under a backlog batches fill at once whatever the time; at a steady rate an event
    # waits for the batch being processed and then for this: 0.25 s made p99 event →
    # Redis 0.8 s at half the worker's maximum rate, 0.1 s made it 0.5 s.
    batch_size: int = 1000
    batch_seconds: float = 0.1
    # Committed chunks' rows go to ClickHouse (and their transitions to Kafka) together:
    # once this long has passed since the oldest waiting chunk, or once this many rows
    # wait. An insert costs ~15 ms whatever its size, and ClickHouse wants few large ones.
    flush_seconds: float = 1.0
    flush_rows: int = 50_000
    # How long an event id is remembered for duplicate detection (7 days: longer
    # than any producer retry or replay window we expect).
    dedupe_ttl_seconds: int = 7 * 24 * 3600
    # Retry back-off cap for a service that is down; the agent blocks meanwhile
    # (back-pressure), it never drops the batch.
    retry_max_seconds: float = 30.0
    # Drop-off follows event time. A partition's watermark is its newest event
    # time minus this; customers whose deadline is behind the watermark are
    # swept (dropped). Events later than this still apply, counted as late.
    allowed_lateness_seconds: float = 60.0
    # How often the sweep looks for customers past their deadline.
    sweep_seconds: float = 1.0
    # The live consistency gauge: sliding event-time window and the minimum
    # exits a channel needs in it to count (DESIGN: cross-channel consistency).
    consistency_window_seconds: float = 3600.0
    consistency_min_exits: int = 20
    consistency_refresh_seconds: float = 10.0
    # How long the broker waits for a silent worker before giving its partitions
    # to the others: the gap in processing after a worker dies.
    session_timeout_seconds: float = 60.0
    # The HTTP collector (`journey collector`). API keys come as
    # "source:sha256hex,..." and/or a YAML file (see pipeline/collector/keys.py);
    # only hashes are configured, never the keys themselves.
    collector_host: str = "127.0.0.1"
    collector_port: int = 6067
    collector_keys: str = ""
    collector_keys_file: Path | None = None
    # Browser origins allowed to post (comma-separated, or "*"); empty: no CORS.
    collector_cors_origins: tuple[str, ...] = ()
    # One request carries at most this many bytes of JSON, compressed or not
    # (the decompressed limit is what stops a gzip bomb).
    collector_max_body_bytes: int = 1024 * 1024
    collector_max_events: int = 500
    # Accepted events of one request are packed up to this many per Kafka message
    # (an envelope, pipeline/envelope.py); 1 sends one event per message.
    collector_envelope: int = 100
    # Per source system: events per second, and the burst a bucket holds.
    collector_rate: float = 1000.0
    collector_burst: int = 5000
    # How long a request waits for Kafka to acknowledge before answering 503.
    collector_ack_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.flush_seconds > 0 or self.flush_rows < 1:
            raise SettingsError(
                f"JOURNEY_FLUSH_SECONDS={self.flush_seconds}, JOURNEY_FLUSH_ROWS={self.flush_rows}:"
                " both must be above 0 (how long, and how many rows, a write to ClickHouse waits)"
            )
        if not 1 <= self.collector_envelope <= MAX_ENVELOPE_EVENTS:
            raise SettingsError(
                f"JOURNEY_COLLECTOR_ENVELOPE={self.collector_envelope}: use 1 to "
                f"{MAX_ENVELOPE_EVENTS} (events per Kafka message)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        journeys = env.get("JOURNEY_JOURNEYS")
        channels = env.get("JOURNEY_CHANNELS")
        keys_file = env.get("JOURNEY_COLLECTOR_KEYS_FILE")
        return cls(
            kafka_url=env.get("JOURNEY_KAFKA_URL", cls.kafka_url),
            kafka_auth=KafkaAuth.from_env(env),
            redis_url=env.get("JOURNEY_REDIS_URL", cls.redis_url),
            clickhouse_dsn=env.get("JOURNEY_CLICKHOUSE_DSN", cls.clickhouse_dsn),
            journeys_path=Path(journeys) if journeys else None,
            web_port=_int(env, "JOURNEY_WEB_PORT", cls.web_port),
            web_host=env.get("JOURNEY_WEB_HOST", cls.web_host),
            channels=_list(channels) or DEFAULT_CHANNELS,
            app_id=env.get("JOURNEY_APP_ID", cls.app_id),
            batch_size=_int(env, "JOURNEY_BATCH_SIZE", cls.batch_size),
            batch_seconds=_float(env, "JOURNEY_BATCH_SECONDS", cls.batch_seconds),
            flush_seconds=_float(env, "JOURNEY_FLUSH_SECONDS", cls.flush_seconds),
            flush_rows=_int(env, "JOURNEY_FLUSH_ROWS", cls.flush_rows),
            dedupe_ttl_seconds=_int(env, "JOURNEY_DEDUPE_TTL_SECONDS", cls.dedupe_ttl_seconds),
            retry_max_seconds=_float(env, "JOURNEY_RETRY_MAX_SECONDS", cls.retry_max_seconds),
            allowed_lateness_seconds=_float(
                env, "JOURNEY_ALLOWED_LATENESS_SECONDS", cls.allowed_lateness_seconds
            ),
            sweep_seconds=_float(env, "JOURNEY_SWEEP_SECONDS", cls.sweep_seconds),
            consistency_window_seconds=_float(
                env, "JOURNEY_CONSISTENCY_WINDOW_SECONDS", cls.consistency_window_seconds
            ),
            consistency_min_exits=_int(
                env, "JOURNEY_CONSISTENCY_MIN_EXITS", cls.consistency_min_exits
            ),
            consistency_refresh_seconds=_float(
                env, "JOURNEY_CONSISTENCY_REFRESH_SECONDS", cls.consistency_refresh_seconds
            ),
            session_timeout_seconds=_float(
                env, "JOURNEY_SESSION_TIMEOUT_SECONDS", cls.session_timeout_seconds
            ),
            collector_host=env.get("JOURNEY_COLLECTOR_HOST", cls.collector_host),
            collector_port=_int(env, "JOURNEY_COLLECTOR_PORT", cls.collector_port),
            collector_keys=env.get("JOURNEY_COLLECTOR_KEYS", cls.collector_keys),
            collector_keys_file=Path(keys_file) if keys_file else None,
            collector_cors_origins=_list(env.get("JOURNEY_COLLECTOR_CORS_ORIGINS")),
            collector_max_body_bytes=_int(
                env, "JOURNEY_COLLECTOR_MAX_BODY_BYTES", cls.collector_max_body_bytes
            ),
            collector_max_events=_int(
                env, "JOURNEY_COLLECTOR_MAX_EVENTS", cls.collector_max_events
            ),
            collector_envelope=_int(env, "JOURNEY_COLLECTOR_ENVELOPE", cls.collector_envelope),
            collector_rate=_float(env, "JOURNEY_COLLECTOR_RATE", cls.collector_rate),
            collector_burst=_int(env, "JOURNEY_COLLECTOR_BURST", cls.collector_burst),
            collector_ack_timeout_seconds=_float(
                env, "JOURNEY_COLLECTOR_ACK_TIMEOUT_SECONDS", cls.collector_ack_timeout_seconds
            ),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child worker see these same settings."""
        env = {
            "JOURNEY_KAFKA_URL": self.kafka_url,
            "JOURNEY_REDIS_URL": self.redis_url,
            "JOURNEY_CLICKHOUSE_DSN": self.clickhouse_dsn,
            "JOURNEY_WEB_PORT": str(self.web_port),
            "JOURNEY_WEB_HOST": self.web_host,
            "JOURNEY_CHANNELS": ",".join(self.channels),
            "JOURNEY_APP_ID": self.app_id,
            "JOURNEY_BATCH_SIZE": str(self.batch_size),
            "JOURNEY_BATCH_SECONDS": str(self.batch_seconds),
            "JOURNEY_FLUSH_SECONDS": str(self.flush_seconds),
            "JOURNEY_FLUSH_ROWS": str(self.flush_rows),
            "JOURNEY_DEDUPE_TTL_SECONDS": str(self.dedupe_ttl_seconds),
            "JOURNEY_RETRY_MAX_SECONDS": str(self.retry_max_seconds),
            "JOURNEY_ALLOWED_LATENESS_SECONDS": str(self.allowed_lateness_seconds),
            "JOURNEY_SWEEP_SECONDS": str(self.sweep_seconds),
            "JOURNEY_CONSISTENCY_WINDOW_SECONDS": str(self.consistency_window_seconds),
            "JOURNEY_CONSISTENCY_MIN_EXITS": str(self.consistency_min_exits),
            "JOURNEY_CONSISTENCY_REFRESH_SECONDS": str(self.consistency_refresh_seconds),
            "JOURNEY_SESSION_TIMEOUT_SECONDS": str(self.session_timeout_seconds),
            "JOURNEY_COLLECTOR_HOST": self.collector_host,
            "JOURNEY_COLLECTOR_PORT": str(self.collector_port),
            "JOURNEY_COLLECTOR_KEYS": self.collector_keys,
            "JOURNEY_COLLECTOR_CORS_ORIGINS": ",".join(self.collector_cors_origins),
            "JOURNEY_COLLECTOR_MAX_BODY_BYTES": str(self.collector_max_body_bytes),
            "JOURNEY_COLLECTOR_MAX_EVENTS": str(self.collector_max_events),
            "JOURNEY_COLLECTOR_ENVELOPE": str(self.collector_envelope),
            "JOURNEY_COLLECTOR_RATE": str(self.collector_rate),
            "JOURNEY_COLLECTOR_BURST": str(self.collector_burst),
            "JOURNEY_COLLECTOR_ACK_TIMEOUT_SECONDS": str(self.collector_ack_timeout_seconds),
        }
        env.update(self.kafka_auth.to_env())
        if self.journeys_path is not None:
            env["JOURNEY_JOURNEYS"] = str(self.journeys_path)
        if self.collector_keys_file is not None:
            env["JOURNEY_COLLECTOR_KEYS_FILE"] = str(self.collector_keys_file)
        return env

    @property
    def kafka_bootstrap(self) -> str:
        """aiokafka wants ``host:port[,host:port]`` without Faust's scheme."""
        return ",".join(part.split("://", 1)[-1] for part in self.kafka_url.split(","))
