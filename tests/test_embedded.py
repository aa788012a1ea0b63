"""The local services really start, serve and stop: Tansu, redis-server, Prometheus."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from pipeline.alerting import RuleWindows, dropoff_ratio, render_rules
from pipeline.embedded import (
    Service,
    create_topics,
    free_port,
    start_kafka,
    start_prometheus,
    start_redis,
    wait_for_port,
)
from pipeline.journeys import default_journeys

pytestmark = pytest.mark.services

JOIN_TIMEOUT = 90.0  # Tansu group joins take 15-35 s


def bootstrap(service: Service) -> str:
    return service.url.split("://", 1)[1]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


def test_kafka_url_and_log(kafka_service: Service) -> None:
    assert kafka_service.url.startswith("kafka://127.0.0.1:")
    assert kafka_service.process.poll() is None
    assert kafka_service.log_path.name == "tansu.log"
    assert kafka_service.log_path.exists()


def test_create_topics_is_idempotent(kafka_service: Service) -> None:
    topics = {"journey.events": 2, "journey.events.rejected": 1, "journey.transitions": 2}
    create_topics(kafka_service.url, topics)
    create_topics(kafka_service.url, topics)  # already there: no error

    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(kafka_service))
        await admin.start()
        try:
            described = await admin.describe_topics(list(topics))
        finally:
            await admin.close()
        return {t["topic"]: len(t["partitions"]) for t in described}

    assert asyncio.run(describe()) == topics


def test_produce_consume_roundtrip(kafka_service: Service) -> None:
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_service.url, {topic: 1})
    sent = [f"message-{i}".encode() for i in range(3)]

    async def run() -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap(kafka_service))
        await producer.start()
        try:
            for value in sent:
                await producer.send_and_wait(topic, value, key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap(kafka_service),
            group_id=f"g-{topic}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received: list[bytes] = []
        deadline = time.monotonic() + JOIN_TIMEOUT
        try:
            while len(received) < len(sent) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    received.extend(r.value for r in records if r.value is not None)
            await consumer.commit()
        finally:
            await consumer.stop()
        return received

    assert asyncio.run(run()) == sent


def test_redis_ping_set_get(redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True
    redis_client.set("greeting", "hello")
    assert redis_client.get("greeting") == b"hello"


def test_redis_client_starts_empty(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0


def test_chdb_path_is_fresh(chdb_path: Path) -> None:
    assert chdb_path.is_dir()
    assert not any(chdb_path.iterdir())


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    kafka = start_kafka(log_dir=tmp_path / "logs")
    redis_service = start_redis(data_dir=tmp_path / "redis", appendonly=False)
    assert (tmp_path / "redis" / "redis.log").exists()
    for service in (kafka, redis_service):
        pid = service.process.pid
        service.stop()
        service.stop()  # a second stop is harmless
        assert service.process.returncode is not None
        assert gone(pid), f"{service.name} (pid {pid}) still running"


def test_context_manager_stops(tmp_path: Path) -> None:
    with start_redis(data_dir=tmp_path, appendonly=True) as service:
        client = redis.Redis.from_url(service.url)
        client.set("k", "v")
        client.close()
        pid = service.process.pid
    assert gone(pid)
    assert any(p.name.startswith("appendonly") for p in tmp_path.iterdir())


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL the process that started the services: PR_SET_PDEATHSIG takes them down."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.embedded import start_kafka, start_redis\n"
        "d = Path(sys.argv[1])\n"
        "k = start_kafka(log_dir=d)\n"
        "r = start_redis(data_dir=d / 'redis')\n"
        "print(k.process.pid, r.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    for pid in pids:
        assert wait_gone(pid), f"orphan pid {pid} survived its parent"


def test_wait_for_port_names_the_service() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match="nothing-here"):
        wait_for_port("127.0.0.1", port, 0.3, service="nothing-here")


def test_dead_child_fails_fast(tmp_path: Path) -> None:
    """A child that exits is reported at once, with its log, not after the timeout."""
    log_path = tmp_path / "dead.log"
    log_path.write_text("bind: address already in use\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="address already in use"):
        wait_for_port(
            "127.0.0.1", free_port(), 30, service="dead", process=process, log_path=log_path
        )
    assert time.monotonic() - started < 5


def prometheus_api(service: Service, path: str, **params: str) -> Any:
    url = f"{service.url}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; rules need a few evaluations."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.25)


def test_prometheus_evaluates_the_generated_rules(tmp_path: Path) -> None:
    """Prometheus scrapes fake worker metrics, records drop-off ratios and fires alerts."""
    registry = CollectorRegistry()
    exits = Counter(
        "journey_stage_exits",
        "Exits from a stage",
        ["journey", "stage", "channel", "outcome"],
        registry=registry,
    )
    lag = Gauge("journey_consumer_lag_messages", "Unconsumed messages", registry=registry)
    last_batch = Gauge("journey_last_batch_timestamp_seconds", "Last batch", registry=registry)
    lag.set(42)  # waiting messages, and a batch timestamp that never moves: stalled
    last_batch.set(time.time())
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def traffic() -> None:
        # app loses 3 customers in 4 at purchase; web 1 in 5.
        while not stop.wait(0.1):
            exits.labels("retail", "purchase", "app", "advanced").inc(1)
            exits.labels("retail", "purchase", "app", "dropped").inc(3)
            exits.labels("retail", "purchase", "web", "advanced").inc(4)
            exits.labels("retail", "purchase", "web", "dropped").inc(1)

    feeder = threading.Thread(target=traffic, daemon=True)
    feeder.start()
    windows = RuleWindows(
        short="5s", long="10s", baseline="20s", customer_for="0s", pipeline_for="0s", min_exits=5
    )
    rules = tmp_path / "journey.rules.yml"
    rules.write_text(render_rules(default_journeys(), windows))
    started = time.monotonic()
    try:
        with start_prometheus(
            rule_files=[rules], scrape_targets=[f"127.0.0.1:{port}"], data_dir=tmp_path / "prom"
        ) as prometheus:

            def app_ratio() -> float | None:
                query = dropoff_ratio("5s") + '{journey="retail",stage="purchase",channel="app"}'
                result = prometheus_api(prometheus, "query", query=query)["result"]
                return float(result[0]["value"][1]) if result else None

            assert eventually(app_ratio, 20, "a drop-off ratio for app") == pytest.approx(
                0.75, abs=0.1
            )

            def firing() -> list[dict[str, str]]:
                alerts = prometheus_api(prometheus, "alerts")["alerts"]
                found = [a["labels"] for a in alerts if a["state"] == "firing"]
                names = {labels["alertname"] for labels in found}
                ok = {"JourneyStageDropoffHigh", "JourneyPipelineStalled"} <= names
                return found if ok else []

            found = eventually(firing, 20, "drop-off and stall alerts firing")
            dropoff = [a for a in found if a["alertname"] == "JourneyStageDropoffHigh"]
            assert [(a["stage"], a["channel"], a["category"]) for a in dropoff] == [
                ("purchase", "app", "customers")
            ]
            stalled = [a for a in found if a["alertname"] == "JourneyPipelineStalled"]
            assert [(a["job"], a["category"]) for a in stalled] == [("journey-worker", "pipeline")]
            assert not [a for a in found if a["alertname"] == "JourneyWorkerDown"]
    finally:
        stop.set()
        feeder.join()
        server.shutdown()
        server.server_close()
        thread.join()
    assert time.monotonic() - started < 30
