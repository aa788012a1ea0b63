"""Workers join and leave one consumer group mid-stream; state, deadlines and rows stay exact.

Three workers share four partitions: the first starts alone, two more join
while events are still arriving, then the first leaves (SIGTERM). Each
partition's profiles, deadlines and clock live in Redis, so whoever owns it
next carries on where the last owner stopped, including drop-offs (the
rehearsal journey's dwell times are seconds). At the end Redis holds exactly
the reference's profiles and population, and ClickHouse exactly its events
and transitions.

chDB allows one process per data directory, so each worker writes its own;
the union of the three, with duplicates collapsed on the table's key, stands
for one ClickHouse server (where ReplacingMergeTree collapses them itself).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from pipeline import engine, rehearsal
from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import load_journeys
from pipeline.producer import produce_batches
from pipeline.settings import EVENTS_TOPIC, Settings
from pipeline.simulate import generate, key_of
from tests.integration.workers import (
    WorkerProcess,
    assert_profiles,
    broker,
    marks_and_owed,
    total,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

PARTITIONS = 4
CHUNKS = 24
CHUNK_SECONDS = 2.5


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=PARTITIONS) as service:
        yield service


def traffic() -> list[dict[str, Any]]:
    """Simulated customers, each on one partition: device ids are dropped where a customer id is.

    Kafka orders a partition, not the topic; a device and its owner's login on
    two partitions have no order a reference could follow (crash test's note).
    """
    events = []
    for event in generate(
        random.Random(21), time.time() - 1800, 4.0, 1500.0, time_scale=rehearsal.TIME_SCALE
    ):
        if "customer_id" in event:
            event.pop("anonymous_id", None)
        events.append(event)
    return events


def send_paced(url: str, events: list[dict[str, Any]], done: threading.Event) -> None:
    """Produce the events in CHUNKS, one every CHUNK_SECONDS, so workers join mid-stream."""
    size = -(-len(events) // CHUNKS)

    async def run() -> None:
        for i in range(CHUNKS):
            chunk = events[i * size : (i + 1) * size]
            await produce_batches(
                url, EVENTS_TOPIC, [(key_of(e).encode(), orjson.dumps(e)) for e in chunk]
            )
            await asyncio.sleep(CHUNK_SECONDS)

    try:
        asyncio.run(run())
    finally:
        done.set()


def clickhouse_rows(dsn: str) -> dict[str, list[list[Any]]]:
    """A worker's chDB rows, read in a child process (chDB holds one directory per process)."""
    code = f"""
import json, clickhouse_connect
c = clickhouse_connect.get_client(dsn={dsn!r})
out = {{
    "events": c.query("SELECT event_id FROM journey.events").result_rows,
    "transitions": c.query(
        "SELECT journey, customer, to_stage, kind, toUnixTimestamp64Milli(occurred_at), event_id "
        "FROM journey.transitions"
    ).result_rows,
}}
print(json.dumps(out, default=list))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    rows: dict[str, list[list[Any]]] = json.loads(result.stdout)
    return rows


def test_join_and_leave_mid_stream_ends_exact(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    journeys = load_journeys(rehearsal.REHEARSAL_JOURNEY)
    events = traffic()
    good = [
        d for d in (Validator().decode(orjson.dumps(e)) for e in events) if isinstance(d, Event)
    ]
    assert len(good) == len(events) > 3000

    def settings(i: int) -> Settings:
        return Settings(
            kafka_url=kafka.url,
            redis_url=redis_service.url,
            clickhouse_dsn=f"chdb://{tmp_path / f'chdb{i}'}",
            journeys_path=rehearsal.REHEARSAL_JOURNEY,
            web_port=free_port(),
            batch_size=50,
            batch_seconds=0.05,
            app_id="rebalance",
            allowed_lateness_seconds=rehearsal.ALLOWED_LATENESS_SECONDS,
            sweep_seconds=rehearsal.SWEEP_SECONDS,
            session_timeout_seconds=10.0,
        )

    workers = [WorkerProcess(settings(0), tmp_path / "worker0.log")]
    sender: threading.Thread | None = None
    try:
        wait_until(
            lambda: total(workers[0].metrics(), "journey_assigned_partitions") == PARTITIONS,
            timeout=180,
            what="the first worker to own every partition",
        )
        sent = threading.Event()
        sender = threading.Thread(target=send_paced, args=(kafka.url, events, sent), daemon=True)
        sender.start()
        for i in (1, 2):
            time.sleep(CHUNK_SECONDS * 2)
            workers.append(WorkerProcess(settings(i), tmp_path / f"worker{i}.log"))

        def owned() -> list[float]:
            return [total(w.metrics(), "journey_assigned_partitions") for w in workers]

        wait_until(
            lambda: sum(owned()) == PARTITIONS and sum(n > 0 for n in owned()) >= 2,
            timeout=240,
            what="the joining workers to take partitions over",
        )
        assert not sent.is_set(), "the stream ended before the group rebalanced: slow it down"
        leaving = workers[0]
        leaving.process.send_signal(signal.SIGTERM)  # leaves the group mid-stream
        leaving.stop()
        workers = workers[1:]
        wait_until(
            lambda: sum(owned()) == PARTITIONS and all(n > 0 for n in owned()),
            timeout=240,
            what="the remaining workers to share every partition",
        )
        sender.join(timeout=300)
        assert sent.is_set()

        until = time.time()
        expected = engine.replay(good, journeys, until=until)
        population = expected.stage_customers()
        accepted = len(good) - expected.duplicates  # the simulator repeats some events

        progress: dict[str, Any] = {}

        def caught_up() -> bool:
            marks, owed = marks_and_owed(redis_client)
            gauges = Counter[tuple[str, str]]()
            for w in workers:
                for (name, labels), value in w.metrics().items():
                    if name == "journey_stage_customers" and value:
                        lab = dict(labels)
                        gauges[(lab["journey"], lab["stage"])] += int(value)
            progress.update(marks=marks, owed=owed, gauges=dict(gauges))
            return marks == accepted and owed == 0 and gauges == population

        # Every event applied, every owed row out, and every deadline swept by whoever owns it.
        try:
            wait_until(caught_up, 240, "the group to finish the stream and its drop-offs")
        except TimeoutError as exc:
            want = {"marks": accepted, "owed": 0, "gauges": dict(population)}
            raise AssertionError(f"{exc}: now {progress}, want {want}") from None
    finally:
        for w in workers:
            w.stop()
        if sender is not None:
            sender.join(timeout=60)

    assert_profiles(redis_client, expected)

    rows = [clickhouse_rows(f"chdb://{tmp_path / f'chdb{i}'}") for i in range(3)]
    stored_events = [r[0] for worker in rows for r in worker["events"]]
    assert set(stored_events) == {e.event_id for e in good}
    assert len(set(stored_events)) == accepted
    transitions = {tuple(r) for worker in rows for r in worker["transitions"]}
    want_transitions = {
        (t.journey, t.customer, t.to_stage or "", t.kind, round(t.occurred_at * 1000), t.event_id)
        for t in expected.outcome.transitions
    }
    assert len(want_transitions) == len(expected.outcome.transitions)
    assert transitions == want_transitions
    assert sum(1 for w in rows if w["events"]) >= 2  # the work really was shared
