"""The collector against a real broker (Tansu): answers, limits, and what reaches Kafka."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer

from pipeline.collector.app import Collector
from pipeline.collector.keys import hash_key, load_keys
from pipeline.embedded import Service, create_topics, start_kafka
from pipeline.envelope import partition_for, unpack
from pipeline.events import Event, Validator
from pipeline.settings import EVENTS_TOPIC, Settings

pytestmark = pytest.mark.services

WEB_KEY = "jk_test-web-key"
POS_KEY = "jk_test-pos-key"


def event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat(),
        "customer_id": f"c-{uuid.uuid4().hex[:8]}",
        "channel": "web",
        "event_type": "page_view",
        "schema_version": 1,
    }
    body.update(overrides)
    return body


PARTITIONS = 3


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A broker of this module's own, so journey.events holds only what these tests sent."""
    with start_kafka(log_dir=tmp_path_factory.mktemp("collector-kafka")) as service:
        create_topics(service.url, {EVENTS_TOPIC: PARTITIONS})
        yield service


def settings_for(kafka_url: str, **overrides: Any) -> Settings:
    base = Settings(
        kafka_url=kafka_url,
        collector_keys=f"web:{hash_key(WEB_KEY)},pos-emea:{hash_key(POS_KEY)}",
        collector_cors_origins=("https://shop.example",),
        collector_max_body_bytes=256 * 1024,
        collector_max_events=100,
        collector_rate=1000,
        collector_burst=1000,
        collector_ack_timeout_seconds=3,
    )
    return replace(base, **overrides)


async def started(settings: Settings) -> TestClient[Any, Any]:
    keys = load_keys(settings.collector_keys, None)
    collector = Collector(settings, keys, Validator(settings.channels))
    client: TestClient[Any, Any] = TestClient(TestServer(collector.app()))
    await client.start_server()
    for _ in range(200):  # the producer connects in the background
        if collector.kafka_status == "ok":
            break
        await asyncio.sleep(0.1)
    assert collector.kafka_status == "ok"
    return client


@pytest.fixture
async def client(kafka: Service) -> AsyncIterator[TestClient[Any, Any]]:
    client = await started(settings_for(kafka.url))
    try:
        yield client
    finally:
        await client.close()


@dataclass(frozen=True)
class Record:
    """One event as it travelled: alone (its own key) or in an envelope (key None)."""

    value: bytes
    key: bytes | None
    partition: int
    packed: bool


def opened(value: bytes, key: bytes | None, partition: int) -> list[Record]:
    events = unpack(value)
    if events is None:
        return [Record(value, key, partition, False)]
    return [Record(e, None, partition, True) for e in events]


async def records(
    kafka_url: str, ids: set[Any], timeout: float = 30, by: str = "event_id"
) -> list[Record]:
    """Every event in journey.events whose ``by`` field (or raw text) is among ``ids``.

    Envelopes are opened: each of their events is a Record of its own.
    """
    import time

    consumer = AIOKafkaConsumer(
        EVENTS_TOPIC,
        bootstrap_servers=kafka_url.split("://", 1)[1],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    found: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            if not batches and found:
                break
            for batch in batches.values():
                for message in batch:
                    assert message.value is not None
                    for record in opened(message.value, message.key, message.partition):
                        try:
                            value = orjson.loads(record.value)
                        except orjson.JSONDecodeError:
                            value = record.value
                        tag = value.get(by) if isinstance(value, dict) else value
                        if tag in ids:
                            found.append(record)
    finally:
        await consumer.stop()
    return found


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_batch_is_answered_per_event_and_lands_once(
    client: TestClient[Any, Any], kafka: Service
) -> None:
    """Accepted events reach journey.events once each, keyed as the worker keys them."""
    good = [event() for _ in range(5)] + [event(anonymous_id="dev-1", customer_id="c-linked")]
    bad = [
        event(channel="fax"),
        event(occurred_at="1999-12-31T23:59:59Z"),
        event(event_type="Page View"),
    ]
    batch = [good[0], bad[0], *good[1:3], bad[1], *good[3:], bad[2]]
    response = await client.post("/v1/events", json=batch, headers=bearer(WEB_KEY))
    assert response.status == 200
    answer = await response.json()
    assert (answer["accepted"], answer["rejected"]) == (6, 3)
    by_id = {r["event_id"]: r for r in answer["results"]}
    assert [r["index"] for r in answer["results"]] == list(range(9))
    assert {by_id[e["event_id"]]["code"] for e in bad} == {"channel", "timestamp", "schema"}
    assert "fax" in by_id[bad[0]["event_id"]]["reason"]
    assert all(by_id[e["event_id"]]["status"] == "accepted" for e in good)

    found = await records(kafka.url, {e["event_id"] for e in batch})
    assert len(found) == len(batch)  # bad ones too: the worker dead-letters them
    validator = Validator()
    packed = 0
    for record in found:
        value = orjson.loads(record.value)
        assert value["source"] == "web"
        verdict = validator.decode(record.value)
        if isinstance(verdict, Event):
            # In the partition its key picks, as the worker expects: packed in an envelope,
            # or alone with its key when it was its partition's only event.
            assert record.key == (None if record.packed else verdict.key.encode())
            assert record.partition == partition_for(verdict.key.encode(), PARTITIONS)
            packed += record.packed
        else:
            assert not record.packed and record.key is None
    assert packed >= 2  # six accepted events over three partitions share messages
    partitions = {orjson.loads(r.value)["event_id"]: r.partition for r in found}
    # The customer's partition, not the device's.
    assert partitions[good[-1]["event_id"]] == partition_for(b"c-linked", PARTITIONS)


async def test_source_comes_from_the_key_not_the_body(
    client: TestClient[Any, Any], kafka: Service
) -> None:
    sent = event(source="web", channel="store")
    response = await client.post("/v1/events", json=sent, headers={"X-Journey-Key": POS_KEY})
    assert (await response.json())["accepted"] == 1
    [record] = await records(kafka.url, {sent["event_id"]})
    assert orjson.loads(record.value)["source"] == "pos-emea"


async def test_json_lines_gzip_and_query_key(client: TestClient[Any, Any], kafka: Service) -> None:
    """sendBeacon's shape: text/plain lines, key in the query; a bad line is only that event."""
    sent = [event(), event()]
    lines = b"\n".join([orjson.dumps(sent[0]), b"{oops", orjson.dumps(sent[1])])
    response = await client.post(
        f"/v1/events?key={WEB_KEY}",
        data=gzip.compress(lines),
        headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
    )
    assert response.status == 200
    answer = await response.json()
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected", "accepted"]
    assert answer["results"][1]["code"] == "not_json"
    assert answer["results"][1]["event_id"] is None
    assert len(await records(kafka.url, {e["event_id"] for e in sent} | {b"{oops"})) == 3


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        ({}, b"{}", 401, "unauthorized"),
        (bearer("jk_wrong"), b"{}", 401, "unauthorized"),
        (bearer(WEB_KEY), b"[{", 400, "bad_request"),
        (bearer(WEB_KEY), b"", 400, "bad_request"),
        (
            {**bearer(WEB_KEY), "Content-Type": "application/xml"},
            b"<a/>",
            415,
            "unsupported_media_type",
        ),
        ({**bearer(WEB_KEY), "Content-Encoding": "gzip"}, b"not gzip", 400, "bad_request"),
        (bearer(WEB_KEY), b"[" + b",".join([b"{}"] * 101) + b"]", 413, "too_large"),
        (bearer(WEB_KEY), b'{"p": "' + b"x" * 300_000 + b'"}', 413, "too_large"),
        (
            {**bearer(WEB_KEY), "Content-Encoding": "gzip"},
            gzip.compress(b'{"p": "' + b"x" * 300_000 + b'"}'),
            413,
            "too_large",
        ),
    ],
)
async def test_refused_requests_write_nothing(
    client: TestClient[Any, Any], headers: dict[str, str], body: bytes, status: int, error: str
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    response = await client.post("/v1/events", data=body, headers=headers)
    assert response.status == status
    answer = await response.json()
    assert answer["error"] == error and answer["detail"]
    metrics = await (await client.get("/metrics")).text()
    assert "journey_collector_events_total" not in metrics.replace(
        "# HELP journey_collector_events_total", ""
    ).replace("# TYPE journey_collector_events_total", "")


async def test_wrong_routes_and_methods_answer_json(client: TestClient[Any, Any]) -> None:
    missing = await client.post("/v2/events", json=event(), headers=bearer(WEB_KEY))
    assert missing.status == 404
    assert (await missing.json())["error"] == "not_found"
    wrong = await client.get("/v1/events", headers=bearer(WEB_KEY))
    assert wrong.status == 405
    assert "POST" in wrong.headers["Allow"]
    assert (await wrong.json())["error"] == "method_not_allowed"


async def test_rate_limit_answers_429_with_retry_after(kafka: Service) -> None:
    client = await started(settings_for(kafka.url, collector_rate=1, collector_burst=100))
    try:
        ok = await client.post("/v1/events", json=[event()] * 100, headers=bearer(WEB_KEY))
        assert ok.status == 200
        limited = await client.post("/v1/events", json=[event()] * 10, headers=bearer(WEB_KEY))
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 10
        assert (await limited.json())["retry_after"] >= 10
        other = await client.post("/v1/events", json=event(), headers=bearer(POS_KEY))
        assert other.status == 200  # one source flooding does not block another
    finally:
        await client.close()


async def test_cors_preflight_and_headers(client: TestClient[Any, Any]) -> None:
    origin = {"Origin": "https://shop.example"}
    preflight = await client.options(
        "/v1/events", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    posted = await client.post("/v1/events", json=event(), headers={**bearer(WEB_KEY), **origin})
    assert posted.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    stranger = await client.options("/v1/events", headers={"Origin": "https://evil.example"})
    assert stranger.status == 403
    assert "Access-Control-Allow-Origin" not in stranger.headers


async def test_metrics_count_by_source_and_outcome(client: TestClient[Any, Any]) -> None:
    await client.post("/v1/events", json=[event(), event(channel="fax")], headers=bearer(WEB_KEY))
    text = await (await client.get("/metrics")).text()
    assert 'journey_collector_events_total{outcome="accepted",source="web"} 1.0' in text
    assert 'journey_collector_events_total{outcome="rejected",source="web"} 1.0' in text
    assert 'journey_collector_rejections_total{code="channel",source="web"} 1.0' in text
    assert 'journey_collector_requests_total{status="200"} 1.0' in text
    assert "journey_collector_kafka_up 1.0" in text
    assert WEB_KEY not in text and hash_key(WEB_KEY) not in text
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["kafka"] == "ok"


async def test_broker_outage_answers_503_then_recovers(tmp_path: Path) -> None:
    """While the broker is gone nothing is answered as accepted; once it is back, posts land."""
    # start_kafka and create_topics run their own event loops: keep them off this one.
    service = await asyncio.to_thread(start_kafka, log_dir=tmp_path / "first")
    port = int(service.url.rsplit(":", 1)[1])
    await asyncio.to_thread(create_topics, service.url, {EVENTS_TOPIC: 1})
    client = await started(settings_for(service.url, collector_ack_timeout_seconds=2))
    try:
        assert (
            await client.post("/v1/events", json=event(), headers=bearer(WEB_KEY))
        ).status == 200
        service.stop()
        during = await client.post("/v1/events", json=event(), headers=bearer(WEB_KEY))
        assert during.status == 503
        assert during.headers["Retry-After"]
        assert "resend" in (await during.json())["detail"]
        health = await client.get("/healthz")
        assert health.status == 503

        service = await asyncio.to_thread(start_kafka, port, log_dir=tmp_path / "second")
        await asyncio.to_thread(create_topics, service.url, {EVENTS_TOPIC: 1})
        after = event()
        for _ in range(60):
            response = await client.post("/v1/events", json=after, headers=bearer(WEB_KEY))
            if response.status == 200:
                break
            assert response.status == 503
            await asyncio.sleep(1)
        assert response.status == 200
        assert len(await records(service.url, {after["event_id"]})) >= 1
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()
        service.stop()
