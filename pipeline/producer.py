"""A thin aiokafka producer for `journey simulate` and `journey send`.

Both commands only need "get these (key, value) records onto a topic, safely
and with bounded memory", so this module owns the producer settings once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from pipeline.settings import KafkaAuth

log = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes]

DEFAULT_PORT = 9092
START_TIMEOUT_S = 60.0


def bootstrap_servers(kafka_url: str) -> str:
    """Turn `kafka://h1:9092,h2:9092` (or a bare `h1:9092,h2`) into aiokafka's `h1:9092,h2:9092`.

    Each comma-separated part may carry its own scheme; a missing port means 9092.
    """
    hosts: list[str] = []
    for part in kafka_url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "kafka://" + part
        split = urlsplit(part)
        host = split.hostname
        if not host:
            raise ValueError(f"no host in Kafka URL {kafka_url!r}")
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        hosts.append(f"{host}:{split.port or DEFAULT_PORT}")
    if not hosts:
        raise ValueError(f"no host in Kafka URL {kafka_url!r}")
    return ",".join(hosts)


async def _aiter(records: AsyncIterable[Record] | Iterable[Record]) -> AsyncIterator[Record]:
    """Accept sync and async sources alike, so callers need not wrap lists or generators."""
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for i, record in enumerate(records):
            yield record
            if i % 1000 == 999:
                await asyncio.sleep(0)  # a long sync source must not starve the sender task


def client_options(auth: KafkaAuth) -> dict[str, Any]:
    """aiokafka's keyword arguments for ``auth`` (security protocol, SASL, TLS context)."""
    options: dict[str, Any] = {"security_protocol": auth.protocol}
    if auth.tls:
        options["ssl_context"] = ssl_context(auth)
    if auth.sasl:
        options["sasl_mechanism"] = auth.sasl_mechanism
        options["sasl_plain_username"] = auth.username
        options["sasl_plain_password"] = str(auth.password)
    return options


def ssl_context(auth: KafkaAuth) -> ssl.SSLContext:
    """A verifying TLS context: the system's CA bundle, or ``auth.ca_file``."""
    return ssl.create_default_context(cafile=None if auth.ca_file is None else str(auth.ca_file))


async def start_producer(kafka_url: str, linger_ms: int, auth: KafkaAuth | None = None) -> Any:
    """Start a producer, retrying while the broker is not reachable yet (e.g. just launched)."""
    servers = bootstrap_servers(kafka_url)
    options = client_options(auth or KafkaAuth())
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(KafkaConnectionError),
        wait=wait_exponential(multiplier=0.5, max=5),
        stop=stop_after_delay(START_TIMEOUT_S),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    ):
        with attempt:
            # A fresh producer per attempt: a failed start() leaves a half-built client behind.
            producer = AIOKafkaProducer(
                bootstrap_servers=servers,
                acks="all",
                # Tansu rejects InitProducerId; duplicates from retries are absorbed downstream
                # (the worker deduplicates on event_id).
                enable_idempotence=False,
                compression_type=None,
                linger_ms=linger_ms,
                **options,
            )
            try:
                await producer.start()
            except KafkaConnectionError:
                log.warning("Kafka at %s is not reachable yet; retrying", servers)
                await producer.stop()
                raise
            return producer
    raise AssertionError("unreachable")  # pragma: no cover


async def produce_batches(
    kafka_url: str,
    topic: str,
    records: AsyncIterable[Record] | Iterable[Record],
    on_sent: Callable[[int], None] | None = None,
    linger_ms: int = 20,
    max_in_flight: int = 10000,
    auth: KafkaAuth | None = None,
) -> int:
    """Send every (key, value) record to `topic`; return how many the broker acknowledged.

    At most `max_in_flight` unacknowledged records are held, so a huge file or an
    endless simulation runs in constant memory. `on_sent(n)` is called with the
    number of records *newly* acknowledged (an increment, as for a progress bar).
    A delivery failure raises: losing input silently is worse than stopping.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    producer = await start_producer(kafka_url, linger_ms, auth)
    pending: deque[asyncio.Future[Any]] = deque()
    sent = 0

    def acked(n: int) -> None:
        nonlocal sent
        if n:
            sent += n
            if on_sent is not None:
                on_sent(n)

    def reap_done() -> int:
        """Pop already-acknowledged futures from the front, so progress is timely."""
        n = 0
        while pending and pending[0].done():
            pending.popleft().result()  # raises the delivery error, if any
            n += 1
        return n

    async def drain_to(limit: int) -> int:
        """Wait for the oldest records until at most `limit` remain unacknowledged."""
        n = 0
        while len(pending) > limit:
            await pending.popleft()
            n += 1
        return n

    try:
        async for key, value in _aiter(records):
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= max_in_flight:
                # Bounded memory: wait for the oldest half before taking more input.
                acked(await drain_to(max_in_flight // 2))
            acked(reap_done())
        await producer.flush()
        acked(await drain_to(0))
    finally:
        await producer.stop()
    return sent
