"""Two workers in one consumer group: the population gauge adds up, never doubles."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.embedded import Service, free_port
from pipeline.engine import replay
from pipeline.events import Event, Validator
from pipeline.journeys import default_journeys
from pipeline.settings import Settings
from pipeline.simulate import generate
from tests.integration.workers import WorkerProcess, broker, journey, total, wait_until

pytestmark = pytest.mark.services

PARTITIONS = 4


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=PARTITIONS) as service:
        yield service


def test_stage_customers_summed_over_workers_counts_everyone_once(
    kafka: Service, redis_service: Service, redis_client: object, tmp_path: Path
) -> None:
    """Each worker exports only its partitions' customers; the sum is the whole population."""
    start = time.time() - 3600
    events = [orjson.dumps(e) for e in generate(random.Random(3), start, 100.0, 30.0)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(events) + b"\n")
    validator = Validator()
    good = [d for d in (validator.decode(e) for e in events) if isinstance(d, Event)]
    # The simulator's logins merge devices into customers: the reference stitches too.
    expected = Counter(
        {stage: n for (_, stage), n in replay(good, default_journeys()).stage_customers().items()}
    )
    assert sum(expected.values()) > 100

    workers = [
        WorkerProcess(
            Settings(
                kafka_url=kafka.url,
                redis_url=redis_service.url,
                clickhouse_dsn=f"chdb://{tmp_path / f'chdb{i}'}",  # chDB: one owner per dir
                web_port=free_port(),
                batch_seconds=0.1,
            ),
            tmp_path / f"worker{i}.log",
        )
        for i in range(2)
    ]
    try:

        def both_own_partitions() -> bool:
            owned = [total(w.metrics(), "journey_assigned_partitions") for w in workers]
            return all(n > 0 for n in owned) and sum(owned) == PARTITIONS

        wait_until(both_own_partitions, timeout=240, what="both workers to own partitions")
        sent = journey(workers[0].settings, "send", str(path))
        assert sent.returncode == 0, sent.stderr

        def all_processed() -> bool:
            return sum(total(w.metrics(), "journey_events_total") for w in workers) >= len(events)

        wait_until(all_processed, timeout=240, what="the workers to process every event")
        time.sleep(2.5)  # one gauge refresh period
        samples = [w.metrics() for w in workers]
        for stage in default_journeys()[0].stage_names:
            per_worker = [
                total(s, "journey_stage_customers", journey="retail", stage=stage) for s in samples
            ]
            assert sum(per_worker) == expected.get(stage, 0), (stage, per_worker)
        # Both did real work: neither exports the whole population alone.
        assert all(total(s, "journey_batch_size_count") > 0 for s in samples)
        # The business counters come from the ledger in Redis, exported by the owner of
        # partition 0 only: summed over workers, every event counts once.
        exporting = [total(s, "journey_events_total") > 0 for s in samples]
        assert sorted(exporting) == [False, True]
        assert sum(total(s, "journey_events_total") for s in samples) == len(events)
    finally:
        for w in workers:
            w.stop()
