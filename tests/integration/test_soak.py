"""Soak: steady simulated traffic for a long time, the worker SIGKILLed on a schedule.

Not part of the default run (marker ``soak``). Run it as:

    JOURNEY_SOAK_SECONDS=3600 JOURNEY_SOAK_RATE=100 JOURNEY_SOAK_KILL_EVERY=300 \\
        .venv/bin/pytest -m soak -s tests/integration/test_soak.py

`journey simulate` sends live traffic for the whole period while the worker
is killed every KILL_EVERY seconds and restarted. Every 10 s the test samples
events processed and transitions counted (the ledger, through /metrics),
events stored (Redis marks) and the worker's memory. At the end the
reference is replayed from what the topic holds, and Redis, ClickHouse and
the metrics must match it exactly; the samples are printed as a table (and
written as JSON to JOURNEY_SOAK_REPORT if set).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import redis
from aiokafka import AIOKafkaConsumer

from pipeline import engine
from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.settings import EVENTS_TOPIC, Settings
from tests.integration.workers import (
    WorkerProcess,
    assert_profiles,
    broker,
    marks_and_owed,
    total,
    wait_until,
)

SECONDS = float(os.environ.get("JOURNEY_SOAK_SECONDS", "600"))
RATE = float(os.environ.get("JOURNEY_SOAK_RATE", "100"))
KILL_EVERY = float(os.environ.get("JOURNEY_SOAK_KILL_EVERY", "120"))

pytestmark = [pytest.mark.services, pytest.mark.soak, pytest.mark.timeout(SECONDS + 1200)]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # One partition: the reference replays the topic in order (see test_crash_recovery).
    with broker(tmp_path_factory.mktemp("kafka"), partitions=1) as service:
        yield service


def read_topic(url: str) -> list[bytes]:
    """Everything journey.events holds, read until it stops giving records.

    Tansu's reported end offset is unreliable when a produce batch holds several
    records (DESIGN.md), so the topic is read until it is quiet instead.
    """

    async def run() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            EVENTS_TOPIC,
            bootstrap_servers=url.split("://", 1)[1],
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        values: list[bytes] = []
        quiet = 0
        try:
            while quiet < 5:
                batches = await consumer.getmany(timeout_ms=1000)
                got = [r.value for rs in batches.values() for r in rs if r.value is not None]
                values.extend(got)
                quiet = 0 if got else quiet + 1
        finally:
            await consumer.stop()
        return values

    return asyncio.run(run())


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_soak_with_scheduled_kills_ends_exact(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        web_port=free_port(),
        app_id="soak",
        session_timeout_seconds=10.0,
    )
    simulator = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "simulate", "--rate", str(RATE),
         "--duration", str(SECONDS), "--seed", "17"],
        env={**os.environ, **settings.to_env()},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "simulate.log").open("wb"),
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    run = 0
    worker = WorkerProcess(settings, tmp_path / "worker-0.log")
    started = time.monotonic()
    next_kill = started + KILL_EVERY
    try:
        while simulator.poll() is None or time.monotonic() < started + SECONDS:
            time.sleep(10)
            now = time.monotonic()
            metrics = worker.metrics() if worker.process.poll() is None else {}
            samples.append(
                {
                    "t": round(now - started),
                    "processed": total(metrics, "journey_events_total"),
                    "events_stored": marks_and_owed(redis_client)[0],
                    "transitions": total(metrics, "journey_transitions_total"),
                    "worker_rss_mib": round(rss_mib(worker.process.pid), 1),
                    "run": run,
                }
            )
            if now >= next_kill and now < started + SECONDS:
                os.kill(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
                worker.stop()
                run += 1
                worker = WorkerProcess(settings, tmp_path / f"worker-{run}.log")
                next_kill = now + KILL_EVERY
            if simulator.poll() not in (None, 0):
                raise AssertionError(f"the simulator failed: {(tmp_path / 'simulate.log')}")
        lines = read_topic(kafka.url)
        good = [d for d in (Validator().decode(x) for x in lines) if isinstance(d, Event)]
        expected = engine.replay(good, default_journeys())
        accepted = len(good) - expected.duplicates

        def caught_up() -> bool:
            marks, owed = marks_and_owed(redis_client)
            return marks == accepted and owed == 0

        wait_until(caught_up, timeout=600, what="the last worker to finish the topic")
        time.sleep(2.5)
        final = worker.metrics()
    finally:
        worker.stop()
        simulator.terminate()
        simulator.wait(30)

    report = {
        "seconds": SECONDS,
        "rate": RATE,
        "kills": run,
        "events_in": len(lines),
        "accepted": accepted,
        "duplicates": expected.duplicates,
        "transitions": len(expected.outcome.transitions),
        "samples": samples,
    }
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "samples"}))
    print(f"{'t s':>6} {'processed':>10} {'stored':>8} {'transitions':>12} {'RSS MiB':>8} run")
    for s in samples:
        print(
            f"{s['t']:>6} {s['processed']:>10.0f} {s['events_stored']:>8} "
            f"{s['transitions']:>12.0f} {s['worker_rss_mib']:>8} {s['run']}"
        )
    if os.environ.get("JOURNEY_SOAK_REPORT"):
        Path(os.environ["JOURNEY_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))

    assert run >= 1
    assert total(final, "journey_events_total", outcome="accepted") == accepted
    assert total(final, "journey_events_total", outcome="duplicate") == expected.duplicates
    assert total(final, "journey_transitions_total") == len(expected.outcome.transitions)
    assert_profiles(redis_client, expected)
    client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    try:
        assert client.query("SELECT count() FROM journey.events FINAL").result_rows == [(accepted,)]
        rows = client.query("SELECT count() FROM journey.transitions FINAL").result_rows
        assert rows == [(len(expected.outcome.transitions),)]
    finally:
        client.close()
