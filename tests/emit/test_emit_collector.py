"""SDK → a real `journey collector` process → Kafka (Tansu): the whole HTTP path.

The collector runs with a small per-request event limit and a tight rate limit,
so the SDK's 413 split and 429 Retry-After paths run against the real thing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.collector.keys import hash_key
from pipeline.embedded import Service, free_port
from pipeline.emit import AsyncEmitter, DeliveryError, Emitter, HttpTransport
from pipeline.events import DEFAULT_CHANNELS
from pipeline.settings import EVENTS_TOPIC, Settings
from tests.integration.workers import broker

from .records import assert_once_with_keys, read_all, valid_events

pytestmark = pytest.mark.services

POS_KEY = "jk_emit-test-pos"
MAX_EVENTS = 20


@dataclass
class CollectorProcess:
    url: str
    kafka: Service

    def requests_by_status(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {
            s.labels["status"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "journey_collector_requests_total"
        }


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A broker of the module's own and `journey collector` in front of it."""
    log_dir = tmp_path_factory.mktemp("emit-collector")
    with broker(log_dir, partitions=3) as kafka:
        port = free_port()
        settings = Settings(
            kafka_url=kafka.url,
            collector_port=port,
            collector_keys=f"pos-emea:{hash_key(POS_KEY)}",
            collector_max_events=MAX_EVENTS,
            collector_rate=100,
            collector_burst=2 * MAX_EVENTS,
        )
        log_path: Path = log_dir / "collector.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "collector"],
                env={**os.environ, **settings.to_env()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 90
                while not healthy(url):
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "collector not healthy in 90 s"
                    time.sleep(0.3)
                yield CollectorProcess(url, kafka)
            finally:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def test_events_reach_kafka_once_through_the_collector(collector: CollectorProcess) -> None:
    """Split on 413, wait on 429, per-event rejections surfaced; valid events land once each."""
    rejected: list[tuple[str, str]] = []

    def on_rejected(event: Mapping[str, Any], code: str, reason: str) -> None:
        rejected.append((event["event_id"], code))

    expected: dict[str, bytes] = {}
    kiosk: set[str] = set()
    transport = HttpTransport(collector.url, POS_KEY)
    emitter = AsyncEmitter(
        transport,
        channels=(*DEFAULT_CHANNELS, "kiosk"),  # the collector does not know "kiosk"
        max_batch_size=50,
        linger=0.05,
        on_rejected=on_rejected,
    )
    async with emitter:
        for i in range(120):
            if i % 4 == 0:
                event_id = await emitter.identify(f"cust-{i}", f"dev-{i}", channel="web")
                expected[event_id] = f"cust-{i}".encode()
            else:
                event_id = await emitter.track(
                    "product_view", channel="store", anonymous_id=f"dev-{i}", touchpoint="shelf"
                )
                expected[event_id] = f"dev-{i}".encode()
            if i % 40 == 0:
                kiosk.add(await emitter.track("page_view", channel="kiosk", customer_id="k"))
        await emitter.flush()
    stats = emitter.stats
    assert (stats.sent, stats.rejected, stats.failed) == (120, 3, 0)
    assert sorted(rejected) == sorted((event_id, "channel") for event_id in kiosk)

    statuses = collector.requests_by_status()
    assert statuses.get("413", 0) >= 1  # batches of 50 over a limit of 20 were split
    assert statuses.get("429", 0) >= 1  # 123 events over a burst of 40 were paced
    assert stats.retried > 0

    records = await read_all(collector.kafka.url, EVENTS_TOPIC, 120)
    mine = [(key, e) for key, e in valid_events(records) if e.event_id in expected]
    assert_once_with_keys(mine, expected)
    assert {e.source for _, e in mine} == {"pos-emea"}  # stamped by the collector from the key


def test_wrong_key_is_a_delivery_error_and_writes_nothing(collector: CollectorProcess) -> None:
    before = collector.requests_by_status().get("401", 0)
    emitter = Emitter(HttpTransport(collector.url, "jk_not-a-key"), linger=0.01)
    emitter.track("page_view", channel="web", customer_id="intruder")
    with pytest.raises(DeliveryError, match="401") as info:
        emitter.close()
    assert len(info.value.events) == 1
    assert emitter.stats.failed == 1
    assert emitter.stats.retried == 0  # 401 is never retried
    assert collector.requests_by_status().get("401", 0) == before + 1
