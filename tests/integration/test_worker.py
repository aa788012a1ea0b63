"""The whole pipeline on real services: Tansu, redis-server, chDB, a `journey worker` process.

A known file of events goes in with `journey send`; the Redis state, the
ClickHouse rows, the dead-letter topic and the metrics must match exactly what
the pure engine says (``stages.replay``) and what the hand-written
expectations below say.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
import redis

from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.settings import REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from pipeline.stages import replay
from tests.integration.workers import WorkerProcess, broker, consume_all, journey, total, wait_until

pytestmark = pytest.mark.services

T0 = "2026-11-01T10:00:00+00:00"


def ev(
    event_id: str,
    customer: str,
    event_type: str,
    minute: int,
    channel: str = "web",
    **properties: Any,
) -> bytes:
    body: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": f"2026-11-01T10:{minute:02d}:00+00:00",
        "customer_id": customer,
        "channel": channel,
        "event_type": event_type,
        "schema_version": 1,
    }
    if properties:
        body["properties"] = properties
    return orjson.dumps(body)


def known_events() -> list[bytes]:
    lines = [
        # c1: the whole funnel, step by step, across channels
        ev("c1-1", "c1", "page_view", 0),
        ev("c1-2", "c1", "product_view", 1, "app"),
        ev("c1-3", "c1", "order_completed", 2, "app", order_value=59.9, currency="EUR"),
        ev("c1-4", "c1", "repeat_purchase", 3, "store"),
        ev("c1-5", "c1", "review_submitted", 4, "web", rating=5),
        # c2: walk-in purchase skips awareness and consideration
        ev("c2-1", "c2", "order_completed", 0, "store"),
        # c3: regression ignored; duplicate changes nothing
        ev("c3-1", "c3", "add_to_cart", 0),
        ev("c3-1", "c3", "add_to_cart", 0),
        ev("c3-2", "c3", "page_view", 1),
        # c6: an event id already used by c1 is a duplicate, whoever it names
        ev("c1-2", "c6", "page_view", 5),
        # c4: a low review does not reach advocacy; an unmapped type moves nobody
        ev("c4-1", "c4", "order_completed", 0, "app"),
        ev("c4-2", "c4", "review_submitted", 1, "app", rating=2),
        ev("c4-3", "c4", "email_open", 2, "email"),
        # c5: SQL-looking strings are inert data
        ev(
            "x'; DROP TABLE journey.events; --",
            "c5'; DROP TABLE t; --",
            "search",
            0,
            touchpoint_hint="' OR 1=1 --",
        ),
        # malformed input of every kind
        b"not json at all",
        b"[1, 2, 3]",
        b"123",
        orjson.dumps(
            {
                "event_id": "m1",
                "occurred_at": T0,
                "channel": "web",
                "event_type": "page_view",
                "schema_version": 1,
            }
        ),  # no customer
        orjson.dumps(
            {
                "event_id": "m2",
                "occurred_at": T0,
                "customer_id": "c9",
                "channel": "fax",
                "event_type": "page_view",
                "schema_version": 1,
            }
        ),
        orjson.dumps(
            {
                "event_id": "m3",
                "occurred_at": T0,
                "customer_id": "c9",
                "channel": "web",
                "event_type": "Page View",
                "schema_version": 1,
            }
        ),
        orjson.dumps(
            {
                "event_id": "m4",
                "occurred_at": "yesterday",
                "customer_id": "c9",
                "channel": "web",
                "event_type": "page_view",
                "schema_version": 1,
            }
        ),
        orjson.dumps(
            {
                "event_id": "m5",
                "occurred_at": T0,
                "customer_id": "c9",
                "channel": "web",
                "event_type": "page_view",
                "schema_version": 2,
            }
        ),
        b"\xff\xfe invalid utf-8",
    ]
    return lines


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A broker of this module's own: the topics start empty."""
    with broker(tmp_path_factory.mktemp("kafka"), partitions=2) as service:
        yield service


def test_known_events_end_to_end(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Every count matches: metrics, Redis state, ClickHouse rows, dead letters."""
    lines = known_events()
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    validator = Validator()
    now = time.time()
    decoded = [validator.decode(line, now=now) for line in lines]
    good = [d for d in decoded if isinstance(d, Event)]
    rejected = len(lines) - len(good)
    profiles, transitions, duplicates = replay(good, default_journeys())
    accepted = len(good) - duplicates
    assert (accepted, duplicates, rejected) == (12, 2, 9)

    port = free_port()
    chdb = tmp_path / "chdb"
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{chdb}",
        web_port=port,
        batch_seconds=0.1,
    )
    sent = journey(settings, "send", str(path))
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(lines)} of {len(lines)} lines" in sent.stderr

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= len(lines),
            timeout=180,
            what="the worker to process every line",
        )
        time.sleep(2.5)  # one gauge refresh period, and time for anything that would over-count
        samples = worker.metrics()

        assert total(samples, "journey_events_total", outcome="accepted") == accepted
        assert total(samples, "journey_events_total", outcome="duplicate") == duplicates
        assert total(samples, "journey_events_total", outcome="rejected") == rejected

        expected_now = Counter(
            (j, p.stage)
            for prof in profiles.values()
            for j, p in prof.positions.items()
            if p.stage is not None
        )
        # Hand-checked: c1 advocacy, c2 purchase, c3 consideration, c4 purchase, c5 consideration
        assert expected_now == Counter(
            {("retail", "advocacy"): 1, ("retail", "purchase"): 2, ("retail", "consideration"): 2}
        )
        for stage in ["awareness", "consideration", "purchase", "retention", "advocacy"]:
            assert total(
                samples, "journey_stage_customers", journey="retail", stage=stage
            ) == expected_now.get(("retail", stage), 0), stage
        entries = Counter((t.to_stage, t.channel) for t in transitions)
        for (stage, channel), n in entries.items():
            assert (
                total(
                    samples,
                    "journey_stage_entries_total",
                    journey="retail",
                    stage=stage or "",
                    channel=channel,
                )
                == n
            )
        assert total(samples, "journey_stage_entries_total") == len(transitions) == 9
        assert total(samples, "journey_stage_exits_total", outcome="advanced") == 4

        store_state = {c: redis_client.hget(f"jt:{{c:{c}}}:p", "d") for c in profiles}
        for customer, profile in profiles.items():
            assert store_state[customer] == profile.to_json(), customer

        dead = consume_all(kafka.url, REJECTED_TOPIC, rejected)
        assert len(dead) == rejected
        reasons = [orjson.loads(d)["reason"] for d in dead]
        assert all(reasons), reasons
        assert any("channel" in r for r in reasons)
        published = consume_all(kafka.url, TRANSITIONS_TOPIC, len(transitions))
        assert len(published) == len(transitions)

        # While the worker holds chDB, `journey report` asks it over the web port.
        report = journey(settings, "report", "--json")
        assert report.returncode == 0, report.stderr
        (funnel,) = orjson.loads(report.stdout)
        entered = {s["stage"]: s["entered"] for s in funnel["stages"]}
        expected_entered = Counter(t.to_stage for t in transitions)
        assert entered == {s: expected_entered.get(s, 0) for s in entered}
        # The scorecard comes from the worker too (`/report?scorecard=1`).
        cards = journey(settings, "report", "--scorecard", "--json")
        assert cards.returncode == 0, cards.stderr
        (card,) = orjson.loads(cards.stdout)
        assert card["scorecard"]["rank"] == 1
        awareness = next(s for s in card["scorecard"]["stages"] if s["stage"] == "awareness")
        assert awareness["kpis"][-1]["name"] == "new_customers"
        assert awareness["kpis"][-1]["value"] == entered["awareness"]
    finally:
        worker.stop()

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb}")
    try:
        assert client.query("SELECT count() FROM journey.events FINAL").result_rows == [(accepted,)]
        rows = client.query(
            "SELECT to_stage, kind, count() FROM journey.transitions FINAL "
            "GROUP BY to_stage, kind ORDER BY to_stage, kind"
        ).result_rows
        expected_rows = sorted(Counter((t.to_stage, t.kind) for t in transitions).items())
        assert [((s, k), n) for s, k, n in rows] == expected_rows
        assert client.query("SELECT count() FROM journey.rejected_events FINAL").result_rows == [
            (rejected,)
        ]
        sql_like = client.query(
            "SELECT customer FROM journey.events WHERE event_id = {id:String}",
            parameters={"id": "x'; DROP TABLE journey.events; --"},
        ).result_rows
        assert sql_like == [("c5'; DROP TABLE t; --",)]
    finally:
        client.close()
