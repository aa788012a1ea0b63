"""SIGKILL the worker at random moments, restart it, and end exactly where a clean run ends.

Small batches make each run many Redis commits, ClickHouse inserts and
offset commits long, so a kill lands between any two of them. After the last
restart finishes the topic, Redis holds exactly the reference's profiles and
ClickHouse exactly its events and transitions: replayed messages were
recognised as already applied, and batches cut off after their commit were
written out from the outbox.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import orjson
import pytest
import redis

from pipeline import engine
from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.settings import Settings
from pipeline.simulate import generate
from pipeline.stages import ENTRY_KINDS
from tests.integration.workers import (
    WorkerProcess,
    assert_profiles,
    broker,
    journey,
    marks_and_owed,
    total,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

KILLS = 4


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # One partition: the reference replays the file in order, and across partitions a
    # device's events and its owner's login have no order Kafka could keep.
    with broker(tmp_path_factory.mktemp("kafka"), partitions=1) as service:
        yield service


def test_sigkilled_worker_ends_with_the_state_and_rows_of_a_clean_run(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(11)
    start = time.time() - 1800
    lines = [orjson.dumps(e) for e in generate(random.Random(5), start, 4.0, 1700.0)]
    lines += [b"not json", b'{"event_id": 1}']
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good = [d for d in (Validator().decode(x) for x in lines) if isinstance(d, Event)]
    expected = engine.replay(good, default_journeys())
    accepted = len(good) - expected.duplicates
    assert accepted > 5000

    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        web_port=free_port(),
        batch_size=20,
        batch_seconds=0.05,
        app_id="crash-recovery",
        # A killed worker's partitions go to its successor after this long.
        session_timeout_seconds=10.0,
    )
    sent = journey(settings, "send", str(path))
    assert sent.returncode == 0, sent.stderr

    kills = 0
    for run in range(KILLS + 1):
        worker = WorkerProcess(settings, tmp_path / f"worker-{run}.log")
        wait_until(
            lambda w=worker: total(w.metrics(), "journey_assigned_partitions") == 1,  # type: ignore[misc]
            timeout=180,
            what="the worker to own the partitions",
        )
        if run < KILLS:
            # Somewhere in the middle of this run's share of the work.
            time.sleep(rng.uniform(0.5, 4.0))
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
            worker.stop()
            kills += 1
            continue
        try:
            # The last run: every event applied (Redis marks), every owed row out.
            def caught_up() -> bool:
                marks, owed = marks_and_owed(redis_client)
                return marks == accepted and owed == 0

            wait_until(caught_up, timeout=240, what="the last run to finish the topic")
            time.sleep(2.5)  # one gauge refresh: the metrics read the ledger in Redis
            samples = worker.metrics()
        finally:
            worker.stop()
    # The metrics of a run that never crashed: every message counted once across the kills.
    assert total(samples, "journey_events_total", outcome="accepted") == accepted
    assert total(samples, "journey_events_total", outcome="duplicate") == expected.duplicates
    assert total(samples, "journey_events_total", outcome="rejected") == 2
    by_kind = Counter(t.kind for t in expected.outcome.transitions)
    for kind, n in by_kind.items():
        assert total(samples, "journey_transitions_total", kind=kind) == n, kind
    entries = sum(1 for t in expected.outcome.transitions if t.kind in ENTRY_KINDS)
    assert total(samples, "journey_stage_entries_total") == entries
    assert kills == KILLS

    # Redis: exactly the reference's profiles and population.
    assert_profiles(redis_client, expected)
    counts: Counter[tuple[str, str]] = Counter()
    for key in redis_client.scan_iter("jt:stage_customers:*"):
        for field, value in redis_client.hgetall(key).items():
            journey_name, _, stage = field.decode().partition("\x1f")
            counts[(journey_name, stage)] += int(value)
    assert +counts == expected.stage_customers()

    # ClickHouse: exactly the reference's events and transitions.
    client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    try:
        events = client.query("SELECT count() FROM journey.events FINAL").result_rows
        assert events == [(accepted,)]
        rows = client.query(
            "SELECT kind, to_stage, count() FROM journey.transitions FINAL GROUP BY kind, to_stage"
        ).result_rows
        got = {(k, s): n for k, s, n in rows}
        want_rows = Counter((t.kind, t.to_stage or "") for t in expected.outcome.transitions)
        assert got == dict(want_rows)
        dead = client.query("SELECT count() FROM journey.rejected_events FINAL").result_rows
        assert dead == [(2,)]
    finally:
        client.close()
