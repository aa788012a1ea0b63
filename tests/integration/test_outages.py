"""Redis or the broker goes away mid-stream and comes back: the worker waits and loses nothing.

Redis runs with its append-only file, as in production. While it is down the
worker retries with back-off and stops consuming (the agent waits), /healthz
answers 503 naming Redis, `journey_dependency_up{service="redis"}` is 0, and
its memory stays flat although events keep arriving in Kafka. Once Redis is
back, the worker finishes the stream and ends with exactly the reference's
profiles, ClickHouse rows and metrics.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
import redis

from pipeline import engine
from pipeline.embedded import Service, create_topics, free_port, start_kafka, start_redis
from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.producer import produce_batches
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from pipeline.simulate import generate, key_of
from tests.integration.netcut import Forwarder
from tests.integration.workers import (
    WorkerProcess,
    assert_profiles,
    broker,
    health,
    marks_and_owed,
    total,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # One partition: the reference replays the stream in order (see test_crash_recovery).
    with broker(tmp_path_factory.mktemp("kafka"), partitions=1) as service:
        yield service


def produce(url: str, events: list[dict[str, Any]]) -> None:
    records = [(key_of(e).encode(), orjson.dumps(e)) for e in events]
    assert asyncio.run(produce_batches(url, EVENTS_TOPIC, records)) == len(records)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_redis_restart_mid_stream_loses_nothing(kafka: Service, tmp_path: Path) -> None:
    events = list(generate(random.Random(7), time.time() - 1800, 3.0, 1700.0))
    good = [
        d for d in (Validator().decode(orjson.dumps(e)) for e in events) if isinstance(d, Event)
    ]
    expected = engine.replay(good, default_journeys())
    accepted = len(good) - expected.duplicates
    half = len(events) // 2

    redis_dir = tmp_path / "redis"
    store = start_redis(data_dir=redis_dir, appendonly=True, log_dir=tmp_path)
    port = int(store.url.rsplit(":", 1)[1].split("/")[0])
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=store.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        web_port=free_port(),
        batch_size=100,
        batch_seconds=0.05,
        app_id="outages",
        retry_max_seconds=2.0,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    client = redis.Redis.from_url(store.url)
    try:
        wait_until(
            lambda: total(worker.metrics(), "journey_assigned_partitions") == 1,
            timeout=180,
            what="the worker to own the partition",
        )
        produce(kafka.url, events[:half])
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= half,
            timeout=120,
            what="the first half to be processed",
        )
        before = rss_mib(worker.process.pid)

        store.stop()  # SIGTERM: Redis writes its append-only file out and exits
        produce(kafka.url, events[half:])
        wait_until(
            lambda: health(settings.web_port)[0] == 503,
            timeout=60,
            what="/healthz to report the outage",
        )
        _, body = health(settings.web_port)
        assert body["status"] == "degraded" and "redis" in body["waiting_for"], body
        assert body["waiting_for"]["redis"]["error"]
        samples = worker.metrics()
        assert total(samples, "journey_dependency_up", service="redis") == 0
        assert total(samples, "journey_dependency_up", service="clickhouse") == 1
        during = [rss_mib(worker.process.pid)]
        for _ in range(10):
            time.sleep(1)
            during.append(rss_mib(worker.process.pid))
        assert worker.process.poll() is None
        # The agent waits instead of buffering the second half: memory stays flat.
        assert max(during) - before < 64, (before, during)

        store = start_redis(port, data_dir=redis_dir, appendonly=True, log_dir=tmp_path)
        client = redis.Redis.from_url(store.url)

        def caught_up() -> bool:
            marks, owed = marks_and_owed(client)
            return marks == accepted and owed == 0 and health(settings.web_port)[0] == 200

        wait_until(caught_up, timeout=180, what="the worker to finish after Redis returned")
        time.sleep(2.5)  # one gauge refresh
        samples = worker.metrics()
        assert total(samples, "journey_dependency_up", service="redis") == 1
        assert total(samples, "journey_events_total", outcome="accepted") == accepted
        assert total(samples, "journey_events_total", outcome="duplicate") == expected.duplicates
    finally:
        worker.stop()
        client.close()

    try:
        assert_profiles(client, expected)
    finally:
        client.close()
        store.stop()
    ch = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    try:
        assert ch.query("SELECT count() FROM journey.events FINAL").result_rows == [(accepted,)]
        transitions = ch.query("SELECT count() FROM journey.transitions FINAL").result_rows
        assert transitions == [(len(expected.outcome.transitions),)]
    finally:
        ch.close()


def test_broker_cut_off_mid_stream_loses_nothing(
    redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Every connection to the broker is cut for longer than the session timeout, then restored.

    The worker must survive it, rejoin its group and finish the stream exactly.
    """
    events = list(generate(random.Random(9), time.time() - 1800, 2.0, 1700.0))
    good = [
        d for d in (Validator().decode(orjson.dumps(e)) for e in events) if isinstance(d, Event)
    ]
    expected = engine.replay(good, default_journeys())
    accepted = len(good) - expected.duplicates
    half = len(events) // 2

    forwarder = Forwarder(free_port(), free_port())
    forwarder.restore()
    kafka = start_kafka(
        forwarder.target_port, log_dir=tmp_path, advertised_port=forwarder.listen_port
    )
    worker = None
    try:
        create_topics(kafka.url, {EVENTS_TOPIC: 1, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: 1})
        settings = Settings(
            kafka_url=kafka.url,
            redis_url=redis_service.url,
            clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
            web_port=free_port(),
            app_id="broker-cut",
            retry_max_seconds=2.0,
            session_timeout_seconds=10.0,
        )
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        wait_until(
            lambda: total(worker.metrics(), "journey_assigned_partitions") == 1,
            timeout=180,
            what="the worker to own the partition",
        )
        produce(kafka.url, events[:half])
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= half,
            timeout=120,
            what="the first half to be processed",
        )
        forwarder.cut()
        time.sleep(settings.session_timeout_seconds * 2.5)
        assert worker.process.poll() is None, worker.log_tail()
        forwarder.restore()
        produce(kafka.url, events[half:])

        def caught_up() -> bool:
            marks, owed = marks_and_owed(redis_client)
            return marks == accepted and owed == 0

        wait_until(caught_up, timeout=240, what="the worker to finish after the broker returned")
        time.sleep(2.5)
        samples = worker.metrics()
        assert total(samples, "journey_events_total", outcome="accepted") == accepted
        assert total(samples, "journey_events_total", outcome="duplicate") == expected.duplicates
        assert_profiles(redis_client, expected)
    finally:
        if worker is not None:
            worker.stop()
        kafka.stop()
        forwarder.close()
