"""An idle worker cut off from the broker says so on /healthz and comes back when it returns.

No event is sent: publishing never fails, so only the periodic probe
(pipeline/kafka_probe.py) can notice. Tansu advertises a forwarder's port, so
every client, the worker's and the probe's alike, goes through the forwarder,
and cutting it takes the broker away without losing Tansu's in-memory topics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.embedded import Service, create_topics, free_port, start_kafka
from pipeline.health import Health
from pipeline.kafka_probe import PROBE_INTERVAL_SECONDS, PROBE_TIMEOUT_SECONDS, KafkaProbe
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from tests.integration.netcut import Forwarder
from tests.integration.workers import WorkerProcess, health, total, wait_until

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

# What ops were promised: /healthz names Kafka within this long of losing it.
DETECTION_SECONDS = 15.0


@pytest.fixture
def cut_broker(tmp_path: Path) -> Iterator[tuple[Forwarder, Service]]:
    """Tansu behind a forwarder a test can cut; the service URL is the forwarder's."""
    forwarder = Forwarder(free_port(), free_port())
    forwarder.restore()
    try:
        kafka = start_kafka(
            forwarder.target_port, log_dir=tmp_path, advertised_port=forwarder.listen_port
        )
        with kafka:
            yield forwarder, kafka
    finally:
        forwarder.close()


async def test_the_probe_asks_the_broker_every_time(
    cut_broker: tuple[Forwarder, Service],
) -> None:
    """A probe after a cut fails although the client still holds the cluster's metadata."""
    forwarder, kafka = cut_broker
    health_ = Health()
    probe = KafkaProbe.for_settings(Settings(kafka_url=kafka.url), health_)
    try:
        assert await probe.check() is True
        forwarder.cut()
        started = time.monotonic()
        assert await probe.check() is False
        assert time.monotonic() - started <= PROBE_TIMEOUT_SECONDS + 1
        assert not health_.up("kafka")
        forwarder.restore()
        assert await probe.check() is True
        assert health_.up("kafka")
    finally:
        await probe.close()


async def test_a_reachable_bootstrap_address_is_not_enough(
    cut_broker: tuple[Forwarder, Service],
) -> None:
    """The probe talks to the broker where it is advertised, as the worker's clients do."""
    forwarder, _ = cut_broker
    direct = f"kafka://127.0.0.1:{forwarder.target_port}"  # bootstrap past the forwarder
    health_ = Health()
    probe = KafkaProbe.for_settings(Settings(kafka_url=direct), health_)
    try:
        assert await probe.check() is True
        forwarder.cut()  # the advertised listener is gone; the bootstrap address still answers
        assert await probe.check() is False
        assert await probe.check() is False
        assert not health_.up("kafka")
    finally:
        await probe.close()


def start_worker(
    kafka: Service, redis_service: Service, tmp_path: Path, app_id: str
) -> WorkerProcess:
    create_topics(kafka.url, {EVENTS_TOPIC: 1, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: 1})
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        web_port=free_port(),
        app_id=app_id,
        retry_max_seconds=2.0,
    )
    return WorkerProcess(settings, tmp_path / "worker.log")


def kafka_up(worker: WorkerProcess) -> float:
    return total(worker.metrics(), "journey_dependency_up", service="kafka")


def cut_and_restore(forwarder: Forwarder, worker: WorkerProcess) -> tuple[float, float]:
    """Cut the broker off, check the report holds, restore it; seconds to 503 and back to 200."""
    port = worker.settings.web_port
    assert health(port)[0] == 200 and kafka_up(worker) == 1

    def kafka_down() -> bool:
        status, body = health(port)
        return status == 503 and "kafka" in body.get("waiting_for", {})

    forwarder.cut()
    cut_at = time.monotonic()
    wait_until(kafka_down, timeout=DETECTION_SECONDS, what="/healthz to name kafka")
    detected = time.monotonic() - cut_at
    status, body = health(port)
    assert body["status"] == "degraded" and list(body["waiting_for"]) == ["kafka"], body
    since = body["waiting_for"]["kafka"]["since"]
    assert kafka_up(worker) == 0

    # While the broker stays away the report holds still: no flapping, `since` unmoved.
    hold_until = time.monotonic() + 2 * PROBE_INTERVAL_SECONDS
    while time.monotonic() < hold_until:
        status, body = health(port)
        assert status == 503 and body["waiting_for"]["kafka"]["since"] == since, body
        assert kafka_up(worker) == 0
        time.sleep(0.5)

    forwarder.restore()
    restored_at = time.monotonic()
    wait_until(
        lambda: health(port)[0] == 200 and kafka_up(worker) == 1,
        timeout=60,
        what="/healthz to be ok again after the broker returned",
    )
    recovered = time.monotonic() - restored_at
    assert health(port)[1]["waiting_for"] == {}
    assert worker.process.poll() is None, worker.log_tail()
    return detected, recovered


def test_an_idle_worker_reports_a_lost_broker_and_its_return(
    cut_broker: tuple[Forwarder, Service],
    redis_client: redis.Redis,
    redis_service: Service,
    tmp_path: Path,
) -> None:
    """A worker that owns its partition and receives nothing notices the cut within 15 s."""
    forwarder, kafka = cut_broker
    worker = start_worker(kafka, redis_service, tmp_path, "kafka-probe-idle")
    try:
        wait_until(
            lambda: (
                total(worker.metrics(), "journey_assigned_partitions") == 1
                and health(worker.settings.web_port)[0] == 200
            ),
            timeout=180,
            what="the worker to own the partition",
        )
        detected, recovered = cut_and_restore(forwarder, worker)
        print(f"\nidle worker: cut → 503 in {detected:.1f} s; restore → 200 in {recovered:.1f} s")
    finally:
        worker.stop()


def test_a_worker_cut_off_before_its_first_assignment_says_so(
    cut_broker: tuple[Forwarder, Service],
    redis_client: redis.Redis,
    redis_service: Service,
    tmp_path: Path,
) -> None:
    """The probe runs from start-up, not only once Faust's first group join is done."""
    forwarder, kafka = cut_broker
    worker = start_worker(kafka, redis_service, tmp_path, "kafka-probe-joining")
    try:
        wait_until(
            lambda: health(worker.settings.web_port)[0] == 200,
            timeout=120,
            what="/healthz to be ok",
        )
        assert total(worker.metrics(), "journey_assigned_partitions") == 0
        detected, recovered = cut_and_restore(forwarder, worker)
        print(
            f"\njoining worker: cut → 503 in {detected:.1f} s; restore → 200 in {recovered:.1f} s"
        )
    finally:
        worker.stop()
