"""bench/tansu_worker.py relies on aiokafka building its fetcher from ``_fetch_max_wait_ms``."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.embedded import Service, create_topics
from pipeline.producer import bootstrap_servers

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


def test_a_consumer_started_after_the_change_fetches_with_it(kafka_service: Service) -> None:
    create_topics(kafka_service.url, {"fetch-wait": 1})

    async def run() -> int:
        consumer = AIOKafkaConsumer(
            "fetch-wait",
            bootstrap_servers=bootstrap_servers(kafka_service.url),
            group_id=None,
            fetch_max_wait_ms=1500,
        )
        consumer._fetch_max_wait_ms = 100  # what the wrapper does before start()
        await consumer.start()
        try:
            return int(consumer._fetcher._fetch_max_wait_ms)
        finally:
            await consumer.stop()

    assert asyncio.run(run()) == 100
