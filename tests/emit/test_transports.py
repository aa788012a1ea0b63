"""The HTTP transport follows the collector's retry contract; the Kafka transport's error classes.

The HTTP tests run against a small aiohttp server on loopback that answers
with the contract's status codes (tests/emit/stub_collector.py).
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from pipeline.embedded import free_port
from pipeline.emit import AsyncEmitter, DeliveryError, HttpTransport, KafkaTransport, RetryPolicy
from pipeline.emit.transports import _retriable_kafka, _retry_after

from .stub_collector import KEY, stub_collector

FAST = RetryPolicy(max_attempts=4, deadline=10, initial_backoff=0.01, max_backoff=0.05)


def http(url: str, key: str = KEY, retry: RetryPolicy = FAST) -> HttpTransport:
    return HttpTransport(url, key, retry=retry, timeout=5)


async def send(transport: HttpTransport, n: int, **options: Any) -> AsyncEmitter:
    """Track ``n`` events and flush; return the emitter (closed) for its stats."""
    emitter = AsyncEmitter(transport, linger=60, **options)
    try:
        for i in range(n):
            await emitter.track("page_view", channel="web", customer_id=f"c{i}")
        await emitter.flush()
    finally:
        await emitter.close()
    return emitter


async def test_gzipped_batch_with_key_and_per_event_results() -> None:
    """Accepted events count as sent; the collector's rejections reach on_rejected."""
    seen: list[tuple[str, str, str]] = []

    def on_rejected(event: Mapping[str, Any], code: str, reason: str) -> None:
        seen.append((event["channel"], code, reason))

    async with stub_collector(channels=("web",)) as stub:
        emitter = AsyncEmitter(http(stub.url), linger=60, on_rejected=on_rejected)
        await emitter.track("page_view", channel="web", customer_id="c1")
        await emitter.track("page_view", channel="app", customer_id="c1")  # valid here, not there
        await emitter.track("order_completed", channel="web", customer_id="c1")
        await emitter.close()
    [request] = stub.requests
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert [e["channel"] for e in request.events] == ["web", "app", "web"]
    assert len(seen) == 1 and seen[0][:2] == ("app", "channel")
    assert "not a configured channel" in seen[0][2]
    stats = emitter.stats
    assert (stats.sent, stats.rejected, stats.failed, stats.retried) == (2, 1, 0, 0)


async def test_429_waits_for_retry_after() -> None:
    async with stub_collector() as stub:
        stub.script.append((429, {"Retry-After": "1"}))
        started = time.monotonic()
        emitter = await send(http(stub.url), 3)
        elapsed = time.monotonic() - started
    assert [r.status for r in stub.requests] == [429, 200]
    assert elapsed >= 0.95  # the hint, not the 10 ms back-off
    assert (emitter.stats.sent, emitter.stats.retried) == (3, 3)


@pytest.mark.parametrize("statuses", [[503, 503], [500, 502], [0], [0, 504]])
async def test_5xx_and_dropped_connections_are_retried(statuses: list[int]) -> None:
    """A 503 may have written part of the batch: the whole batch is resent (event ids dedupe)."""
    async with stub_collector() as stub:
        stub.script.extend((s, {}) for s in statuses)
        emitter = await send(http(stub.url), 4)
    assert stub.requests[-1].status == 200
    assert len(stub.requests) == len(statuses) + 1
    ids = [e["event_id"] for e in stub.requests[0].events]
    assert all([e["event_id"] for e in r.events] == ids for r in stub.requests)
    assert (emitter.stats.sent, emitter.stats.retried) == (4, 4 * len(statuses))


@pytest.mark.parametrize("status", [400, 401, 415, 404])
async def test_client_errors_are_never_retried(status: int) -> None:
    async with stub_collector() as stub:
        stub.script.append((status, {}))
        with pytest.raises(DeliveryError, match=f"collector answered {status}") as info:
            await send(http(stub.url), 2)
    assert len(stub.requests) == 1
    assert len(info.value.events) == 2


async def test_wrong_key_fails_the_batch_with_401() -> None:
    async with stub_collector() as stub:
        with pytest.raises(DeliveryError, match="401 unauthorized: unknown key"):
            await send(http(stub.url, key="wrong"), 1)
    assert len(stub.requests) == 1


async def test_retry_budget_then_delivery_error() -> None:
    """A collector that stays down costs max_attempts requests, then the events come back."""
    async with stub_collector() as stub:
        stub.script.extend((503, {}) for _ in range(10))
        with pytest.raises(DeliveryError, match="503 unavailable") as info:
            await send(http(stub.url), 2)
    assert len(stub.requests) == FAST.max_attempts
    assert len(info.value.events) == 2


async def test_unreachable_collector_is_retried_then_reported() -> None:
    emitter = AsyncEmitter(http(f"http://127.0.0.1:{free_port()}"), linger=60)
    await emitter.track("page_view", channel="web", customer_id="c1")
    with pytest.raises(DeliveryError, match="collector unreachable"):
        await emitter.close()
    assert emitter.stats.retried == FAST.max_attempts - 1
    assert emitter.stats.failed == 1


async def test_413_with_an_event_limit_splits_and_remembers() -> None:
    async with stub_collector(max_events=4) as stub:
        transport = http(stub.url)
        emitter = AsyncEmitter(transport, linger=60)
        for i in range(10):
            await emitter.track("page_view", channel="web", customer_id=f"c{i}")
        await emitter.flush()
        assert [(r.status, len(r.events)) for r in stub.requests] == [
            (413, 10),
            (200, 4),
            (200, 4),
            (200, 2),
        ]
        first = [e["customer_id"] for e in stub.accepted]
        stub.requests.clear()
        for i in range(5):
            await emitter.track("page_view", channel="web", customer_id=f"d{i}")
        await emitter.close()
    assert [(r.status, len(r.events)) for r in stub.requests] == [(200, 4), (200, 1)]
    assert emitter.stats.sent == 15
    assert first == [f"c{i}" for i in range(10)]
    assert [e["customer_id"] for e in stub.accepted] == [f"d{i}" for i in range(5)]


async def test_413_on_bytes_halves_until_it_fits() -> None:
    async with stub_collector() as stub:
        stub.max_bytes = 700  # about three events
        emitter = await send(http(stub.url), 8)
    assert stub.requests[0].status == 413
    ok = [r for r in stub.requests if r.status == 200]
    assert sum(len(r.events) for r in ok) == 8
    assert all(r.size <= 700 for r in ok)
    assert len(stub.accepted) == 8
    assert emitter.stats.sent == 8


async def test_413_on_a_single_event_fails_it() -> None:
    async with stub_collector() as stub:
        stub.max_bytes = 10
        with pytest.raises(DeliveryError, match="single event is too large") as info:
            await send(http(stub.url), 2)
    assert len(info.value.events) == 2
    assert not stub.accepted


def test_retry_after_forms() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    hint = _retry_after(later, None)
    assert hint is not None and 27 < hint <= 30
    assert _retry_after("2", None) == 2.0
    assert _retry_after(None, {"retry_after": 3}) == 3.0
    assert _retry_after("soon", {}) is None
    assert _retry_after("-5", None) == 0.0


def test_endpoint_accepts_base_or_full_url() -> None:
    assert HttpTransport("http://h:6067", "k").endpoint == "http://h:6067/v1/events"
    assert HttpTransport("http://h:6067/v1/events/", "k").endpoint == "http://h:6067/v1/events"


def test_uncompressed_option() -> None:
    transport = HttpTransport("http://h", "k", compress=False)
    assert "Content-Encoding" not in transport._headers
    assert gzip.decompress(gzip.compress(b"x")) == b"x"


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (KafkaConnectionError(), True),
        (KafkaTimeoutError(), True),
        (NotLeaderForPartitionError(), True),
        (MessageSizeTooLargeError(), False),
        (TopicAuthorizationFailedError(), False),
        (ValueError(), False),
    ],
)
def test_kafka_errors_worth_retrying(error: BaseException, retriable: bool) -> None:
    assert _retriable_kafka(error) is retriable


async def test_unreachable_broker_surfaces_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """No broker: the start-up budget runs out and the events come back in DeliveryError."""
    monkeypatch.setattr("pipeline.producer.START_TIMEOUT_S", 1.0)
    emitter = AsyncEmitter(KafkaTransport(f"kafka://127.0.0.1:{free_port()}"), linger=60)
    event_id = await emitter.track("page_view", channel="web", customer_id="c1")
    with pytest.raises(DeliveryError) as info:
        await emitter.close()
    assert [e["event_id"] for e in info.value.events] == [event_id]
