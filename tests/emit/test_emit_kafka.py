"""Kafka transport to a real broker (Tansu): every event arrives once, keyed as the worker keys."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.embedded import Service, create_topics
from pipeline.emit import AsyncEmitter, Emitter, KafkaTransport

from .records import assert_once_with_keys, read_all, valid_events

pytestmark = pytest.mark.services


def fresh_topic(service: Service, partitions: int = 3) -> str:
    topic = f"emit.{uuid.uuid4().hex[:8]}"
    create_topics(service.url, {topic: partitions})
    return topic


async def test_async_emitter_to_kafka(kafka_service: Service) -> None:
    topic = await asyncio.to_thread(fresh_topic, kafka_service)  # it runs its own loop
    expected: dict[str, bytes] = {}
    transport = KafkaTransport(kafka_service.url, topic=topic)
    async with AsyncEmitter(transport, max_batch_size=50, linger=0.05) as emitter:
        for i in range(200):
            if i % 3 == 0:
                event_id = await emitter.track("page_view", channel="web", anonymous_id=f"dev-{i}")
                expected[event_id] = f"dev-{i}".encode()
            elif i % 3 == 1:
                event_id = await emitter.identify(f"cust-{i}", f"dev-{i - 1}", channel="app")
                expected[event_id] = f"cust-{i}".encode()
            else:
                event_id = await emitter.track(
                    "order_completed",
                    channel="store",
                    customer_id=f"cust-{i - 1}",
                    anonymous_id="null",
                    properties={"order_value": 10.5 + i, "currency": "EUR"},
                )
                expected[event_id] = f"cust-{i - 1}".encode()
        await emitter.flush()
        assert emitter.stats.sent == 200
    stats = emitter.stats
    assert (stats.sent, stats.failed, stats.rejected, stats.pending) == (200, 0, 0, 0)
    records = await read_all(kafka_service.url, topic, 200)
    assert len(records) == 200
    assert_once_with_keys(valid_events(records), expected)


def test_sync_emitter_to_kafka_from_threads(kafka_service: Service) -> None:
    topic = fresh_topic(kafka_service)
    expected: dict[str, bytes] = {}
    with Emitter(KafkaTransport(kafka_service.url, topic=topic), linger=0.02) as emitter:
        emitter.start()

        def one(i: int) -> tuple[str, bytes]:
            customer = f"c{i % 17}"
            return emitter.track(
                "product_view", channel="app", customer_id=customer
            ), customer.encode()

        with ThreadPoolExecutor(4) as pool:
            expected.update(pool.map(one, range(300)))
    assert emitter.stats.sent == 300
    records = asyncio.run(read_all(kafka_service.url, topic, 300))
    assert len(records) == 300
    assert_once_with_keys(valid_events(records), expected)
