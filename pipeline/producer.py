"""A thin aiokafka producer for `journey simulate`, `journey send` and the worker.

The commands only need "get these (key, value) records onto a topic, safely
and with bounded memory", so this module owns the producer settings once. The
worker publishes transitions and dead letters many at a time: ``BatchPublisher``
hands them to the producer as one record batch per partition.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from pipeline.envelope import Outgoing, Packer
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


async def start_producer(
    kafka_url: str, linger_ms: int, auth: KafkaAuth | None = None, max_batch_size: int = 16384
) -> Any:
    """Start a producer, retrying while the broker is not reachable yet (e.g. just launched).

    ``max_batch_size`` (bytes) is aiokafka's: one record batch per partition and request.
    """
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
                max_batch_size=max_batch_size,
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


class BatchPublisher:
    """Publishes (topic, key, value) messages as record batches, and waits for the acks.

    ``producer.send`` costs tens of microseconds a message in Python (and Faust's
    ``topic.send`` more); appending to aiokafka's batch builder costs a few. Keyed
    messages go where the producer's default partitioner would put them (murmur2,
    as the Java client), so a customer's transitions stay on one partition, in
    order; unkeyed ones (dead letters) to any partition.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._partitioner = DefaultPartitioner()

    async def __call__(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
        partitions: dict[str, list[int]] = {}
        for topic, key, value in messages:
            known = partitions.get(topic)
            if known is None:
                known = partitions[topic] = sorted(await self.producer.partitions_for(topic))
            partition = self._partitioner(key, known, known)
            by_partition.setdefault((topic, partition), []).append((key, value))
        acks = []
        for (topic, partition), records in by_partition.items():
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(timestamp=None, key=key, value=value) is None:  # full
                    acks.append(await self.producer.send_batch(batch, topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(timestamp=None, key=key, value=value)  # a first always fits
            acks.append(await self.producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*acks)


async def _ticking(
    records: AsyncIterable[Record] | Iterable[Record], every: float
) -> AsyncIterator[Record | None]:
    """The records, with a None whenever ``every`` seconds pass without one.

    An async source (a rate-limited simulation) can go quiet while envelopes wait
    for more events; the ticks let the caller send them on time. The source runs
    in its own task behind a small queue, so a tick never cancels the source.
    """
    if not isinstance(records, AsyncIterable):
        async for record in _aiter(records):
            yield record
        return
    queue: asyncio.Queue[Record | Exception | None] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for record in records:
                await queue.put(record)
        except Exception as exc:  # handed to the reader, which raises it (not cancellation)
            await queue.put(exc)
            return
        await queue.put(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), every)
            except TimeoutError:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        task.cancel()


async def produce_batches(
    kafka_url: str,
    topic: str,
    records: AsyncIterable[Record] | Iterable[Record],
    on_sent: Callable[[int], None] | None = None,
    linger_ms: int = 20,
    max_in_flight: int = 10000,
    auth: KafkaAuth | None = None,
    envelope: int = 1,
) -> int:
    """Send every (key, value) record to `topic`; return how many the broker acknowledged.

    At most `max_in_flight` unacknowledged records are held, so a huge file or an
    endless simulation runs in constant memory. `on_sent(n)` is called with the
    number of records *newly* acknowledged (an increment, as for a progress bar).
    A delivery failure raises: losing input silently is worse than stopping.

    ``envelope`` > 1 packs up to that many records per message
    (:mod:`pipeline.envelope` says which and how); counts stay in records.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    producer = await start_producer(kafka_url, linger_ms, auth)
    pending: deque[tuple[asyncio.Future[Any], int]] = deque()
    in_flight = 0
    sent = 0
    linger = max(linger_ms, 1) / 1000

    def acked(n: int) -> None:
        nonlocal sent
        if n:
            sent += n
            if on_sent is not None:
                on_sent(n)

    def reap_done() -> int:
        """Pop already-acknowledged futures from the front, so progress is timely."""
        nonlocal in_flight
        n = 0
        while pending and pending[0][0].done():
            future, count = pending.popleft()
            future.result()  # raises the delivery error, if any
            n += count
        in_flight -= n
        return n

    async def drain_to(limit: int) -> int:
        """Wait for the oldest records until at most `limit` remain unacknowledged."""
        nonlocal in_flight
        n = 0
        while in_flight - n > limit:
            future, count = pending.popleft()
            await future
            n += count
        in_flight -= n
        return n

    async def send(out: Iterable[Outgoing]) -> None:
        nonlocal in_flight
        for o in out:
            future = await producer.send(topic, o.value, key=o.key, partition=o.partition)
            pending.append((future, o.events))
            in_flight += o.events
        if in_flight >= max_in_flight:
            # Bounded memory: wait for the oldest half before taking more input.
            acked(await drain_to(max_in_flight // 2))
        acked(reap_done())

    try:
        if envelope > 1:
            partitions = await producer.partitions_for(topic)
            packer = Packer(len(partitions), envelope)
            async for record in _ticking(records, linger):
                now = time.monotonic()
                if record is not None:
                    await send(packer.add(record[0], record[1], now))
                await send(packer.due(now, linger))
            await send(packer.flush())
        else:
            async for key, value in _aiter(records):
                await send([Outgoing(None, key, value, 1)])
        await producer.flush()
        acked(await drain_to(0))
    finally:
        await producer.stop()
    return sent
