"""curl → `journey collector` → Kafka → `journey worker`: the answers match what is stored.

The known events of test_worker (good, duplicate, SQL-looking and malformed
lines) are posted as a source system would, with curl: gzip JSON Lines in one
request and a JSON array in another. The collector's per-event answers must
agree with the worker's counts, the dead letters and the ClickHouse rows.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
import redis

from pipeline.collector.keys import hash_key
from pipeline.embedded import Service, free_port
from pipeline.settings import Settings
from tests.integration.test_worker import known_events
from tests.integration.workers import WorkerProcess, broker, total, wait_until

pytestmark = pytest.mark.services

KEY = "jk_e2e-web-key"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=2) as service:
        yield service


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def curl(port: int, body_path: Path, *headers: str) -> tuple[int, dict[str, Any]]:
    args = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/v1/events"]
    for header in (f"Authorization: Bearer {KEY}", *headers):
        args += ["-H", header]
    out = subprocess.run(
        [*args, "--data-binary", f"@{body_path}"], capture_output=True, check=True, timeout=60
    ).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), json.loads(body)


def test_curl_through_collector_and_worker(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """redis_client empties the shared server: the metrics' ledger lives there."""
    lines = known_events()
    first, second = lines[:12], lines[12:]
    chdb = tmp_path / "chdb"
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{chdb}",
        web_port=free_port(),
        batch_seconds=0.1,
        collector_port=free_port(),
        collector_keys=f"web:{hash_key(KEY)}",
    )
    log = (tmp_path / "collector.log").open("wb")
    collector = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "collector"],
        env={**os.environ, **settings.to_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        wait_until(lambda: healthy(settings.collector_port), 60, "the collector to reach Kafka")

        gz = tmp_path / "first.jsonl.gz"
        gz.write_bytes(gzip.compress(b"\n".join(first)))
        status, answer1 = curl(
            settings.collector_port,
            gz,
            "Content-Type: application/x-ndjson",
            "Content-Encoding: gzip",
        )
        assert status == 200, answer1
        # The rest as one JSON array (non-JSON lines cannot be array elements: send them as lines).
        parsed, unparsable = [], []
        for line in second:
            try:
                parsed.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                unparsable.append(line)
        array = tmp_path / "second.json"
        array.write_bytes(orjson.dumps(parsed))
        status, answer2 = curl(settings.collector_port, array, "Content-Type: application/json")
        assert status == 200, answer2
        raw = tmp_path / "third.jsonl"
        raw.write_bytes(b"\n".join(unparsable))
        status, answer3 = curl(settings.collector_port, raw, "Content-Type: application/x-ndjson")
        assert status == 200, answer3

        answers = [r for a in (answer1, answer2, answer3) for r in a["results"]]
        assert len(answers) == len(lines)
        accepted = sum(r["status"] == "accepted" for r in answers)
        rejected = Counter(r["code"] for r in answers if r["status"] == "rejected")
        # Same expectations as test_worker: 14 valid events (2 of them duplicates), 9 rejected.
        assert (accepted, sum(rejected.values())) == (14, 9)

        worker = WorkerProcess(settings, tmp_path / "worker.log")
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= len(lines),
            timeout=180,
            what="the worker to process every posted event",
        )
        time.sleep(1)
        samples = worker.metrics()
        assert total(samples, "journey_events_total", outcome="accepted") == 12
        assert total(samples, "journey_events_total", outcome="duplicate") == 2
        assert total(samples, "journey_events_total", outcome="rejected") == 9
    finally:
        if worker is not None:
            worker.stop()
        collector.terminate()
        collector.wait(30)
        log.close()

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb}")
    try:
        sources = client.query("SELECT source, count() FROM journey.events FINAL GROUP BY source")
        assert sources.result_rows == [("web", 12)]
        stored = Counter(
            code
            for (code,) in client.query(
                "SELECT code FROM journey.rejected_events FINAL"
            ).result_rows
        )
        assert stored == rejected  # the worker dead-lettered what the collector said it would
    finally:
        client.close()
