"""Hostile input through a real worker: Tansu, redis-server, chDB and `journey worker`.

The catalogue of ``tests/test_hostile_input.py`` is mixed into simulated
traffic, with a flood of one customer, and sent with `journey send` as one
file. Every bad line must reach the dead-letter topic and table with the
validator's code and reason; the good traffic must leave exactly what the
pure reference (``engine.replay``) computes; crafted SQL and Redis strings
must come back verbatim; and neither /metrics nor /healthz may carry an id.

``journey.events`` has one partition here so that file order is processing
order, and the reference applies to the live run exactly (merges across
partitions can legitimately differ: see the README on allowed lateness).
"""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
import redis

from pipeline import engine
from pipeline.embedded import Service, free_port
from pipeline.events import DEFAULT_CHANNELS, REJECTION_CODES, Event, Rejection, Validator
from pipeline.identity import MERGE_RESULTS, is_placeholder
from pipeline.journeys import default_journeys
from pipeline.settings import REJECTED_TOPIC, Settings
from pipeline.simulate import generate
from pipeline.stages import ADVANCED, DROPPED, ENTERED, MERGED, REENGAGED, REGRESSED
from pipeline.state.redis_store import profile_key
from tests.integration.workers import (
    Samples,
    WorkerProcess,
    broker,
    consume_all,
    journey,
    total,
    wait_until,
)
from tests.test_hostile_input import catalogue, verdict

pytestmark = pytest.mark.services

FLOOD = 3000  # events of one customer, in one burst
#: Everything /healthz may show. A new field is documented in the README and added here.
HEALTHZ_FIELDS = frozenset({"status", "journeys", "last_batch_at", "waiting_for"})


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A broker of this module's own, one partition: processing order is file order."""
    with broker(tmp_path_factory.mktemp("kafka"), partitions=1) as service:
        yield service


def flood(start: float) -> list[bytes]:
    """Thousands of events of one customer in a burst: browsing, one purchase, channel hops."""
    types = ["page_view", "product_view", "search", "add_to_cart", "page_view"]
    out = []
    for i in range(FLOOD):
        event_type = "order_completed" if i == FLOOD // 2 else types[i % len(types)]
        out.append(
            orjson.dumps(
                {
                    "event_id": f"flood-{i}",
                    "occurred_at": datetime.fromtimestamp(start + i * 0.005, UTC).isoformat(),
                    "customer_id": "flood-customer",
                    "channel": DEFAULT_CHANNELS[(i // 7) % 3],
                    "event_type": event_type,
                    "schema_version": 1,
                    "properties": {"i": i},
                }
            )
        )
    return out


def traffic(now: float) -> list[bytes]:
    """Simulated traffic with the catalogue scattered through it and a flood in the middle."""
    rng = random.Random(7)
    simulated = [orjson.dumps(e) for e in generate(random.Random(11), now - 3600, 30.0, 30.0)]
    hostile = [case.raw for case in catalogue(now)]
    half = len(simulated) // 2
    lines = [*simulated[:half], *flood(now - 3590), *simulated[half:]]
    for raw in hostile:  # keep the flood in one piece; hostile lines land anywhere else
        at = rng.randrange(len(lines) + 1)
        while half < at < half + FLOOD:
            at = rng.randrange(len(lines) + 1)
        lines.insert(at, raw)
    lines.insert(rng.randrange(len(lines)), simulated[3])  # a duplicate of good traffic
    sql = next(c.raw for c in catalogue(now) if c.name == "SQL in every free-text field")
    lines.append(sql)  # and of a hostile but valid event
    return lines


def ids_in(lines: list[bytes]) -> set[str]:
    """Every usable id the input carried: none may become a metric label or a health field."""
    found: set[str] = set()
    for line in lines:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            for name in ("event_id", "customer_id", "anonymous_id"):
                value = doc.get(name)
                if isinstance(value, str) and not is_placeholder(value):
                    found.add(value)
    return found


def dead_letter(line: bytes, rejection: Rejection) -> tuple[str, str, str]:
    return line.decode("utf-8", "backslashreplace"), rejection.code, rejection.reason


def full_raw(record: dict[str, Any], dead: Counter[tuple[str, str, str]]) -> str:
    """A dead letter's payload; one near Kafka's size limit carries only its start."""
    if not record.get("raw_truncated"):
        return str(record["raw"])
    [line] = [
        line
        for line, _, _ in dead
        if line.startswith(record["raw"]) and len(line.encode()) == record["raw_bytes"]
    ]
    return line


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_labels(samples: Samples, ids: set[str]) -> None:
    """Bounded labels only: contract labels from their fixed sets, and never an input id."""
    stages = {s.name for j in default_journeys() for s in j.stages}
    allowed: dict[str, set[str]] = {
        "channel": {*DEFAULT_CHANNELS, "unknown"},
        "from_channel": set(DEFAULT_CHANNELS),
        "to_channel": set(DEFAULT_CHANNELS),
        "journey": {j.name for j in default_journeys()},
        "stage": stages | {""},
        "reason": set(REJECTION_CODES),
        "kind": {ENTERED, ADVANCED, REGRESSED, DROPPED, REENGAGED, MERGED},
        "result": set(MERGE_RESULTS),
    }
    long_ids = [i for i in ids if len(i) >= 6]
    for name, labels in samples:
        for label, value in labels:
            if label in allowed:
                assert value in allowed[label], (name, label, value)
            assert value not in ids, (name, label, value)
            assert not any(i in value for i in long_ids), (name, label, value)


def test_hostile_lines_land_where_they_belong_and_good_traffic_is_exact(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    now = time.time()
    lines = traffic(now)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    validator = Validator()
    # One verdict per line, as the worker judges it (journey send packs the compact ones
    # into envelopes; tests/test_envelope.py proves a packed event is judged as a lone one).
    decoded = [verdict(validator, line, now) for line in lines]
    good = [d for d in decoded if isinstance(d, Event)]
    dead = Counter(
        dead_letter(line, d)
        for line, d in zip(lines, decoded, strict=True)
        if isinstance(d, Rejection)
    )
    rejected = sum(dead.values())
    reference = engine.replay(good, default_journeys(), until=now)
    accepted = len(good) - reference.duplicates
    assert reference.duplicates >= 2  # ours; the simulator repeats some events too
    assert {code for _, code, _ in dead} == REJECTION_CODES
    assert reference.kinds()[DROPPED] >= 2  # the year-2000 and 2024 customers: swept at once

    chdb = tmp_path / "chdb"
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{chdb}",
        web_port=free_port(),
        batch_seconds=0.1,
        sweep_seconds=0.5,
        app_id="hostile-worker",
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: total(worker.metrics(), "journey_assigned_partitions") >= 1,
            timeout=120,
            what="the worker to own journey.events",
        )
        sent = journey(settings, "send", str(path))
        assert sent.returncode == 0, sent.stderr
        assert f"sent {len(lines)} of {len(lines)} lines" in sent.stderr
        started = time.monotonic()
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= len(lines),
            timeout=60,
            what="the worker to process every line",
        )
        elapsed = time.monotonic() - started
        wait_until(
            lambda: (
                total(worker.metrics(), "journey_transitions_total", kind=DROPPED)
                >= reference.kinds()[DROPPED]
            ),
            timeout=30,
            what="the sweep to drop the customers whose deadlines passed long ago",
        )
        time.sleep(2.5)  # a gauge refresh, and time for anything that would over-count
        samples = worker.metrics()

        # Counts: events by outcome, rejections by code, population, transitions by kind.
        assert total(samples, "journey_events_total", outcome="accepted") == accepted
        duplicates = total(samples, "journey_events_total", outcome="duplicate")
        assert duplicates == reference.duplicates
        assert total(samples, "journey_events_total", outcome="rejected") == rejected
        assert total(samples, "journey_events_total", channel="unknown") == rejected
        codes = Counter(code for (_, code, _), n in dead.items() for _ in range(n))
        for code in REJECTION_CODES:
            assert total(samples, "journey_rejected_events_total", reason=code) == codes[code]
        population = reference.stage_customers()
        for journey_ in default_journeys():
            for stage in journey_.stage_names:
                assert total(
                    samples, "journey_stage_customers", journey=journey_.name, stage=stage
                ) == population.get((journey_.name, stage), 0), stage
        for kind, n in reference.kinds().items():
            assert total(samples, "journey_transitions_total", kind=kind) == n, kind

        # No id in any label; /healthz shows its documented fields and nothing else.
        ids = ids_in(lines)
        assert len(ids) > FLOOD
        check_labels(samples, ids)
        status, body = http_get(settings.web_port, "/healthz")
        assert status == 200, body
        health = orjson.loads(body)
        assert set(health) <= HEALTHZ_FIELDS, health
        assert health["status"] == "ok"
        text = body.decode()
        assert not [i for i in ids if len(i) >= 6 and i in text]

        # Every bad line on the dead-letter topic, with the validator's code and reason.
        records = [orjson.loads(r) for r in consume_all(kafka.url, REJECTED_TOPIC, rejected)]
        assert Counter((full_raw(r, dead), r["code"], r["reason"]) for r in records) == dead
        assert sum(1 for r in records if r.get("raw_truncated")) == 1  # the 1 MB envelope
        assert worker.process.poll() is None  # nothing stopped it
    finally:
        worker.stop()
    print(f"{len(lines)} lines ({rejected} rejected) processed in {elapsed:.1f} s")

    # Redis: exactly the reference state, and nothing outside the project's prefix.
    keys = list(redis_client.scan_iter(count=1000))
    assert keys and all(k.startswith(b"jt:") for k in keys), [
        k for k in keys if not k.startswith(b"jt:")
    ]
    for ref, slot in reference.slots.items():
        stored = redis_client.hmget(profile_key(ref), ["d", "l"])
        expected = [
            None if slot.profile is None else slot.profile.to_json(),
            None if slot.linked_to is None else slot.linked_to.encode(),
        ]
        assert stored == expected, ref

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb}")
    try:
        assert client.query("SELECT count() FROM journey.events FINAL").result_rows == [(accepted,)]
        rows = client.query(
            "SELECT kind, count() FROM journey.transitions FINAL GROUP BY kind"
        ).result_rows
        assert {kind: n for kind, n in rows} == dict(reference.kinds())
        stored_dead = client.query(
            "SELECT raw, code, reason FROM journey.rejected_events FINAL"
        ).result_rows
        assert Counter(tuple(r) for r in stored_dead) == dead

        # Crafted strings come back verbatim, looked up by parameter, never by formatting.
        crafted = [verdict(validator, c.raw, now) for c in catalogue(now) if c.code is None]
        assert crafted
        for event in crafted:
            assert isinstance(event, Event)
            found = client.query(
                "SELECT customer_id, anonymous_id, touchpoint, source, properties "
                "FROM journey.events FINAL WHERE event_id = {id:String}",
                parameters={"id": event.event_id},
            ).result_rows
            assert len(found) == 1, event.event_id
            customer_id, anonymous_id, touchpoint, source, properties = found[0]
            assert (customer_id, anonymous_id, touchpoint, source) == (
                event.customer_id or "",
                event.anonymous_id or "",
                event.touchpoint or "",
                event.source or "",
            ), event.event_id
            assert orjson.loads(properties) == dict(event.properties), event.event_id
    finally:
        client.close()
