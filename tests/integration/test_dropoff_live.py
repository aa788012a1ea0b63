"""Drop-off, re-engagement and identity merges through the real worker, then again on replay.

A journey with dwell times of seconds; a scenario with known answers (stalls
on given channels, a late event that re-engages, devices merged across web,
app and store, a claimed device, placeholder ids). The worker must end with
exactly what the pure reference computes once every deadline has passed —
with no event arriving after the last batch, so the drops come from the
sweep on an idle partition clock — and a second worker replaying the topic
into empty stores must end with the same.
"""

from __future__ import annotations

import time
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
from pipeline.consistency import consistency_index
from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import load_journeys
from pipeline.settings import Settings
from tests.integration.workers import Samples, WorkerProcess, broker, journey, total, wait_until

pytestmark = pytest.mark.services

JOURNEYS = """\
journeys:
  - name: quick
    stages:
      - name: awareness
        events: [page_view, store_visit]
        max_dwell: 4s
      - name: consideration
        events: [search, add_to_cart]
        max_dwell: 4s
      - name: purchase
        events: [order_completed]
        max_dwell: 6s
      - name: retention
        events: [repeat_purchase]
        max_dwell: 3s
        dwell_from: last_activity
      - name: advocacy
        events: [referral_sent]
"""


def scenario(t0: float) -> list[bytes]:
    def ev(
        event_id: str,
        event_type: str,
        at: float,
        channel: str,
        customer_id: str | None = None,
        anonymous_id: str | None = None,
        **props: Any,
    ) -> bytes:
        doc: dict[str, Any] = {
            "event_id": event_id,
            "occurred_at": datetime.fromtimestamp(t0 + at, UTC).isoformat(),
            "channel": channel,
            "event_type": event_type,
            "schema_version": 1,
            "properties": props,
        }
        if customer_id is not None:
            doc["customer_id"] = customer_id
        if anonymous_id is not None:
            doc["anonymous_id"] = anonymous_id
        return orjson.dumps(doc)

    return [
        # stalls in consideration; the app was their last channel there
        ev("s1", "page_view", 0, "web", "stall-1"),
        ev("s2", "search", 1, "app", "stall-1"),
        # stalls in awareness in the store
        ev("s3", "store_visit", 0, "store", "stall-2"),
        # comes back after the awareness deadline: dropped, then re-engaged at purchase
        ev("r1", "page_view", 0, "web", "back-1"),
        ev("r2", "order_completed", 10, "store", "back-1", order_value=20),
        # a device on web, one on app, then logins from both: one customer, two merges
        ev("d1", "page_view", 0, "web", anonymous_id="web-dev"),
        ev("d2", "search", 1, "app", anonymous_id="app-dev"),
        ev("d3", "login", 2, "app", "merged-1", "app-dev"),
        ev("d4", "login", 2.5, "web", "merged-1", "web-dev"),
        ev("d5", "add_to_cart", 3, "web", anonymous_id="web-dev"),  # reaches merged-1
        ev("d6", "order_completed", 3.5, "store", "merged-1"),
        # someone else claims the web device: refused, their own event still counts
        ev("d7", "page_view", 4, "web", "thief", "web-dev"),
        # placeholder ids never link
        ev("p1", "page_view", 1, "web", "placeholder-1", "null"),
        ev("p2", "page_view", 1, "web", "undefined", "dev-p"),
        ev("p3", "page_view", 1, "web", "0", "[object Object]"),  # names nobody: rejected
        # loyal until they go quiet (retention dwells from last activity)
        ev("l1", "order_completed", 0, "web", "loyal-1"),
        ev("l2", "repeat_purchase", 1, "store", "loyal-1", csat=5),
        ev("l3", "repeat_purchase", 3, "app", "loyal-1", nps=9),
        # reaches the last stage: never dropped
        ev("a1", "order_completed", 0, "web", "fan-1"),
        ev("a2", "referral_sent", 2, "social", "fan-1"),
        # duplicate
        ev("a2", "referral_sent", 2, "social", "fan-1"),
    ]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=2) as service:
        yield service


def run_worker(
    settings: Settings, log: Path, expected: engine.Reference, lines: int
) -> tuple[Samples, dict[tuple[str, str], int]]:
    """Run a worker until it processed everything and made every expected drop."""
    worker = WorkerProcess(settings, log)
    kinds = expected.kinds()
    try:
        wait_until(
            lambda: total(worker.metrics(), "journey_events_total") >= lines,
            timeout=180,
            what="the worker to process every line",
        )
        wait_until(
            lambda: (
                total(worker.metrics(), "journey_transitions_total", kind="dropped")
                >= kinds["dropped"]
            ),
            timeout=60,
            what="the sweep to drop the idle customers",
        )
        time.sleep(3)  # a gauge refresh, and time for anything that would over-count
        samples = worker.metrics()
    finally:
        worker.stop()
    client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    try:
        rows = client.query(
            "SELECT kind, count() FROM journey.transitions FINAL GROUP BY kind"
        ).result_rows
    finally:
        client.close()
    return samples, {k: int(n) for k, n in rows}


def check(samples: Samples, rows: dict[str, int], expected: engine.Reference) -> None:
    kinds = expected.kinds()
    assert {k: n for k, n in rows.items()} == dict(kinds)
    for kind, n in kinds.items():
        assert total(samples, "journey_transitions_total", kind=kind) == n, kind
    drops = Counter(
        (t.from_stage, t.channel) for t in expected.outcome.transitions if t.kind == "dropped"
    )
    for (stage, channel), n in drops.items():
        assert total(samples, "journey_dropoffs_total", stage=stage or "", channel=channel) == n
        assert (
            total(
                samples,
                "journey_stage_exits_total",
                stage=stage or "",
                channel=channel,
                outcome="dropped",
            )
            == n
        )
    assert total(samples, "journey_dropoffs_total") == kinds["dropped"]
    population = expected.stage_customers()
    for (j, stage), n in population.items():
        assert total(samples, "journey_stage_customers", journey=j, stage=stage) == n, stage
    assert total(samples, "journey_stage_customers") == sum(population.values())
    for result, n in expected.outcome.merge_results.items():
        assert total(samples, "journey_identity_merges_total", result=result) == n, result
    # The consistency gauge (every exit counts here: JOURNEY_CONSISTENCY_MIN_EXITS=1).
    exits: dict[str, dict[str, tuple[int, int]]] = {}
    for t in expected.outcome.transitions:
        if t.kind in ("advanced", "dropped") and t.from_stage is not None:
            advanced, n = exits.setdefault(t.from_stage, {}).get(t.channel, (0, 0))
            exits[t.from_stage][t.channel] = (advanced + (t.kind == "advanced"), n + 1)
    for stage in ("awareness", "consideration", "purchase", "retention", "advocacy"):
        index = consistency_index(exits.get(stage, {}), min_exits=1)
        key = (
            "journey_cross_channel_consistency",
            frozenset({("journey", "quick"), ("stage", stage)}),
        )
        if index is None:
            assert key not in samples, stage
        else:
            assert samples[key] == pytest.approx(index, abs=1e-6), stage
    assert any(k[0] == "journey_cross_channel_consistency" for k in samples)


def test_dropoffs_reengagements_and_merges_match_the_reference_live_and_on_replay(
    kafka: Service, redis_service: Service, redis_client: redis.Redis, tmp_path: Path
) -> None:
    journeys_path = tmp_path / "quick.yaml"
    journeys_path.write_text(JOURNEYS)
    journeys = load_journeys(journeys_path)
    lines = scenario(time.time() - 30)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good = [d for d in (Validator().decode(x) for x in lines) if isinstance(d, Event)]
    assert len(lines) - len(good) == 1  # the event that names nobody
    expected = engine.replay(good, journeys, until=1e12)

    # Hand-checked against the scenario above, so the reference itself is pinned.
    assert expected.kinds() == Counter(
        {"entered": 10, "advanced": 4, "dropped": 9, "reengaged": 1, "merged": 2}
    )
    assert expected.outcome.merge_results == Counter({"merged": 2, "claimed": 1, "placeholder": 2})
    assert expected.stage_customers() == Counter({("quick", "advocacy"): 1})

    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'live'}",
        journeys_path=journeys_path,
        web_port=free_port(),
        batch_seconds=0.1,
        allowed_lateness_seconds=1.0,
        sweep_seconds=0.5,
        app_id="dropoff-live",
        consistency_min_exits=1,
        consistency_refresh_seconds=1.0,
    )
    sent = journey(settings, "send", str(path))
    assert sent.returncode == 0, sent.stderr
    samples, rows = run_worker(settings, tmp_path / "live.log", expected, len(lines))
    check(samples, rows, expected)
    assert total(samples, "journey_events_total", outcome="duplicate") == 1
    assert redis_client.hget("jt:{a:web-dev}:p", "l") == b"merged-1"

    # Replay the topic from the start into empty stores: the same answer.
    redis_client.flushall()
    replay_settings = Settings(
        **{
            **settings.__dict__,
            "clickhouse_dsn": f"chdb://{tmp_path / 'replay'}",
            "web_port": free_port(),
            "app_id": "dropoff-replay",
        }
    )
    samples, rows = run_worker(replay_settings, tmp_path / "replay.log", expected, len(lines))
    check(samples, rows, expected)
