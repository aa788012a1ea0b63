"""The batch processor and the sweep against real Redis and chDB, without Kafka.

Two processors stand for two workers of one group: they share Redis and
ClickHouse, and the partitions they are told to sweep stand for ownership.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from pipeline import engine, ledger
from pipeline.embedded import Service
from pipeline.events import Event, Rejection, Validator
from pipeline.journeys import parse_journeys
from pipeline.metrics import Metrics
from pipeline.processor import (
    DEAD_LETTER_MAX_BYTES,
    BatchProcessor,
    RawMessage,
    _payload,
    rejected_message,
)
from pipeline.sinks.clickhouse import ClickHouseSink, event_row
from pipeline.state.redis_store import RedisStore

pytestmark = pytest.mark.services

JOURNEYS = parse_journeys(
    """\
journeys:
  - name: quick
    stages:
      - name: browse
        events: [page_view]
        max_dwell: 10s
      - name: cart
        events: [add_to_cart]
        max_dwell: 10s
      - name: bought
        events: [order_completed]
""",
    "quick.yaml",
)
T0 = 1_780_000_000.0


def event(
    event_id: str,
    event_type: str,
    at: float,
    customer: str | None = None,
    device: str | None = None,
    channel: str = "web",
) -> bytes:
    doc: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": datetime.fromtimestamp(T0 + at, UTC).isoformat(),
        "channel": channel,
        "event_type": event_type,
        "schema_version": 1,
    }
    if customer:
        doc["customer_id"] = customer
    if device:
        doc["anonymous_id"] = device
    return orjson.dumps(doc)


def processor(redis_url: str, sink: ClickHouseSink) -> BatchProcessor:
    metrics = Metrics(lambda: iter(()))
    store = RedisStore(redis_url, dedupe_ttl_seconds=3600)
    return BatchProcessor(
        Validator(), JOURNEYS, store, sink, metrics, 1.0, allowed_lateness_seconds=0.0
    )


def messages(values: list[bytes], partitions: int = 2) -> list[RawMessage]:
    return [
        RawMessage("journey.events", i % partitions, i, v, T0 + 1) for i, v in enumerate(values)
    ]


def kinds(transitions: list[Any]) -> Counter[str]:
    return Counter(t.kind for t in transitions)


async def test_new_owner_sweeps_what_the_old_one_left_and_nobody_drops_twice(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    old, new = processor(redis_service.url, sink), processor(redis_service.url, sink)
    values = [event(f"e{i}", "page_view", i * 0.1, customer=f"c{i}") for i in range(40)]
    values += [event("late", "add_to_cart", 1.0, customer="c0")]
    try:
        result = await old.process(messages(values))
        assert result.accepted == 41
        # The newest event is at T0+3.9; nobody's deadline (entry + 10 s) is behind it yet.
        assert await old.sweep([0, 1]) == []
        # The old owner is gone; the clock runs on. Ownership moved: both sweep at once,
        # as two workers briefly do during a rebalance.
        redis_client.hset("jt:clock:0", "newest", T0 + 100)
        redis_client.hset("jt:clock:1", "newest", T0 + 100)
        first, second = await asyncio.gather(new.sweep([0, 1]), old.sweep([0, 1]))
        dropped = first + second
        assert kinds(dropped) == Counter({"dropped": 40})
        assert len({t.customer for t in dropped}) == 40  # each once
        assert await new.sweep([0, 1]) == []
        assert await new.store.stage_customers([0, 1]) == {
            ("quick", "browse"): 0,
            ("quick", "cart"): 0,
        }
        assert await new.store.pending_deadlines([0, 1]) == 0

        await old.drain()
        await new.drain()
        good = [d for d in (Validator().decode(v) for v in values) if isinstance(d, Event)]
        expected = engine.replay(good, JOURNEYS, until=T0 + 100)
        assert kinds(result.transitions + dropped) == expected.kinds()
        rows = await sink.query(
            "SELECT kind, count() FROM journey.transitions FINAL GROUP BY kind ORDER BY kind"
        )
        assert dict(rows) == dict(expected.kinds())
    finally:
        await old.store.close()
        await new.store.close()
        await sink.close()


async def test_merges_across_partitions_keep_the_population_exact(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """A device's events on one partition, the customer's login on another, in parallel."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    a, b = processor(redis_service.url, sink), processor(redis_service.url, sink)
    devices = [event(f"d{i}", "page_view", 0, device=f"dev{i}") for i in range(30)]
    logins = [
        event(f"l{i}", "add_to_cart", 1, customer=f"cust{i}", device=f"dev{i}") for i in range(30)
    ]
    later = [event(f"x{i}", "order_completed", 2, device=f"dev{i}") for i in range(0, 30, 3)]
    try:
        await a.process([RawMessage("journey.events", 0, i, v) for i, v in enumerate(devices)])
        await asyncio.gather(
            b.process([RawMessage("journey.events", 1, i, v) for i, v in enumerate(logins)]),
            a.process([RawMessage("journey.events", 0, 100 + i, v) for i, v in enumerate(later)]),
        )
        good = [
            d
            for d in (Validator().decode(v) for v in devices + logins + later)
            if isinstance(d, Event)
        ]
        assert len(good) == 70
        counts = await a.store.stage_customers([0, 1])
        # Each device merged into its customer: 30 people, each counted once. A later
        # device event reaches the customer whether it lost the race to the login
        # (applied to the device, then merged: the further stage wins) or won it.
        assert {k: n for k, n in counts.items() if n} == {
            ("quick", "cart"): 20,
            ("quick", "bought"): 10,
        }
        expected = engine.replay(good, JOURNEYS)
        assert Counter({k: n for k, n in counts.items() if n}) == expected.stage_customers()
        for i in range(30):
            assert redis_client.hget(f"jt:{{a:dev{i}}}:p", "l") == f"cust{i}".encode()
    finally:
        await a.store.close()
        await b.store.close()
        await sink.close()


class LosesFirstReply(RedisStore):
    """A commit that runs on the server but whose reply is lost, as in a dropped connection."""

    lost = 0

    async def commit(self, commit: Any) -> list[int]:
        result = await super().commit(commit)
        if commit.groups and not self.lost:
            self.lost += 1
            raise redis.exceptions.ConnectionError("connection reset by peer (test)")
        return result


async def test_a_commit_retried_after_a_lost_reply_is_not_a_duplicate(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    p.store = LosesFirstReply(redis_service.url, dedupe_ttl_seconds=3600)
    try:
        result = await p.process(messages([event("e1", "page_view", 0, customer="c1")]))
        assert p.store.lost == 1
        assert (result.accepted, result.duplicates) == (1, 0)
        assert kinds(result.transitions) == Counter({"entered": 1})
        assert redis_client.hget("jt:{c:c1}:p", "v") == b"1"
        await p.drain()
        rows = await sink.query("SELECT count() FROM journey.events FINAL")
        assert rows == [(1,)]
        totals = await p.store.ledger()
        assert totals[ledger.series("events", "web", "accepted")] == 1  # not 2
        assert totals[ledger.series("entries", "quick", "browse", "web")] == 1
    finally:
        await p.store.close()
        await sink.close()


async def test_a_replayed_batch_adds_nothing_to_the_ledger(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """Accepted, duplicate (in the batch and across batches) and rejected messages count once."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    first = messages([event("e1", "page_view", 0, customer="c1")])
    batch = [
        RawMessage("journey.events", 0, 10, event("e2", "add_to_cart", 1, customer="c1")),
        RawMessage("journey.events", 0, 11, event("e2", "add_to_cart", 1, customer="c1")),
        RawMessage("journey.events", 0, 12, event("e1", "page_view", 0, customer="c1")),
        RawMessage("journey.events", 0, 13, b"not json"),
        RawMessage(
            "journey.events", 0, 14, event("e3", "page_view", 2, customer="c3", channel="fax")
        ),
    ]
    try:
        await p.process(first)
        result = await p.process(batch)
        assert (result.accepted, result.duplicates, len(result.rejected)) == (1, 2, 2)
        once = await p.store.ledger()
        # A worker killed after the commit replays the batch from its last committed offset.
        again = await p.process(batch)
        assert again.accepted == 0
        assert await p.store.ledger() == once
        want = {
            ledger.series("events", "web", "accepted"): 2,
            ledger.series("events", "web", "duplicate"): 2,
            ledger.series("events", "unknown", "rejected"): 2,
            ledger.series("rejected", "not_json"): 1,
            ledger.series("rejected", "channel"): 1,
            ledger.series("transitions", "quick", "entered"): 1,
            ledger.series("transitions", "quick", "advanced"): 1,
            ledger.series("entries", "quick", "browse", "web"): 1,
            ledger.series("entries", "quick", "cart", "web"): 1,
            ledger.series("exits", "quick", "browse", "web", "advanced"): 1,
        }
        assert {k: v for k, v in once.items() if v} == want
    finally:
        await p.store.close()
        await sink.close()


async def test_a_backlogged_partition_does_not_run_its_clock_on(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """After downtime the clock stands still until the partition has caught up."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    try:
        await p.process(messages([event("e1", "page_view", 0, customer="c1")], partitions=1))
        # As if the worker had been down for ten minutes since that event arrived.
        seen = float(redis_client.hget("jt:clock:0", "seen") or 0)
        redis_client.hset("jt:clock:0", "seen", seen - 600)
        assert await p.sweep([0], idle=()) == []
        assert kinds(await p.sweep([0], idle={0})) == Counter({"dropped": 1})
    finally:
        await p.store.close()
        await sink.close()


async def test_a_clock_from_the_future_is_capped_and_a_corrupt_profile_starts_afresh(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    redis_client.hset("jt:{c:broken}:p", mapping={"v": 3, "d": b"{not json", "h": 0})
    try:
        now = time.time()
        future = datetime.fromtimestamp(now + 23 * 3600, UTC).isoformat()
        skewed = orjson.dumps(
            {
                "event_id": "f1",
                "occurred_at": future,
                "customer_id": "c-skewed",
                "channel": "app",
                "event_type": "page_view",
                "schema_version": 1,
            }
        )
        broken = orjson.dumps(
            {
                "event_id": "b1",
                "occurred_at": datetime.fromtimestamp(now, UTC).isoformat(),
                "customer_id": "broken",
                "channel": "web",
                "event_type": "page_view",
                "schema_version": 1,
            }
        )
        result = await p.process([RawMessage("journey.events", 0, 0, skewed, now)])
        assert result.accepted == 1  # accepted (within the day the validator allows)...
        newest = float(redis_client.hget("jt:clock:0", "newest") or 0)
        assert newest <= now + 6  # ...but it does not drag the clock a day ahead
        result = await p.process([RawMessage("journey.events", 0, 1, broken, now)])
        assert kinds(result.transitions) == Counter({"entered": 1})
        assert redis_client.hget("jt:{c:broken}:p", "v") == b"4"
    finally:
        await p.store.close()
        await sink.close()


class Crash(Exception):
    """Stands for SIGKILL: the process is gone between two steps."""


class DiesBeforeClickHouse(ClickHouseSink):
    async def flush(self) -> None:
        raise Crash("killed after the Redis commit, before the ClickHouse insert")

    async def start(self, *args: Any) -> None:
        pass


async def test_a_batch_cut_off_after_its_commit_is_written_out_by_the_next_owner(
    redis_service: Service,
    redis_client: redis.Redis,
    chdb_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """State committed, rows and messages not out: the replay skips, the outbox delivers."""
    values = [event(f"e{i}", "page_view", i, customer=f"c{i % 7}") for i in range(20)]
    values += [event(f"k{i}", "add_to_cart", 30 + i, customer=f"c{i}") for i in range(3)]
    values += [b"not json", event("e0", "page_view", 0, customer="c0")]  # a dead letter, a dup
    batch = messages(values)
    dying = processor(redis_service.url, DiesBeforeClickHouse(f"chdb://{chdb_path}"))
    await dying.process(batch)  # the state is committed; offsets may be committed now
    with pytest.raises(RuntimeError) as failed:
        await dying.drain()
    assert isinstance(failed.value.__cause__, Crash)
    await dying.store.close()
    assert redis_client.hlen("jt:outbox:0") + redis_client.hlen("jt:outbox:1") > 0

    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    published: list[Any] = []

    async def publish(out: Any) -> None:
        published.extend(out)

    heir = processor(redis_service.url, sink)
    heir.publish = publish
    monkeypatch.setattr("pipeline.processor.RECOVER_AFTER_SECONDS", 0.0)
    try:
        # Kafka redelivers the uncommitted batch: nothing is applied or counted twice...
        again = await heir.process(batch)
        assert (again.accepted, again.duplicates, again.transitions) == (0, 1, [])
        # ...and the outbox owes the rows and messages of the first run.
        assert await heir.recover([0, 1]) > 0
        assert redis_client.hlen("jt:outbox:0") + redis_client.hlen("jt:outbox:1") == 0
        good = [d for d in (Validator().decode(v) for v in values) if isinstance(d, Event)]
        expected = engine.replay(good, JOURNEYS)
        rows = await sink.query("SELECT kind, count() FROM journey.transitions FINAL GROUP BY kind")
        assert dict(rows) == dict(expected.kinds())
        events = await sink.query("SELECT count() FROM journey.events FINAL")
        assert events == [(len(good) - expected.duplicates,)]
        rejected = await sink.query("SELECT count() FROM journey.rejected_events FINAL")
        assert rejected == [(1,)]  # keyed by its Kafka position: the replay collapses onto it
        topics = Counter(topic for topic, _, _ in published)
        assert topics["journey.transitions"] == sum(expected.kinds().values())
        assert await heir.recover([0, 1]) == 0
    finally:
        await heir.store.close()
        await sink.close()


def envelope(*events: bytes) -> bytes:
    return b'{"envelope":1,"events":[' + b",".join(events) + b"]}"


async def test_an_envelope_counts_each_event_once_even_split_across_chunks(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """Its events are judged one by one; replayed whole or cut into chunks, each counts once."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    p.max_events = 2  # the envelope below spans three chunks
    first = messages([event("e1", "page_view", 0, customer="c1")])
    batch = [
        RawMessage(
            "journey.events",
            0,
            20,
            envelope(
                event("e2", "add_to_cart", 1, customer="c1"),
                event("e2", "add_to_cart", 1, customer="c1"),
                event("e1", "page_view", 0, customer="c1"),
                b"123",
                event("e3", "page_view", 2, customer="c3", channel="fax"),
                event("e4", "page_view", 3, customer="c4"),
            ),
        ),
        RawMessage("journey.events", 0, 21, b'{"envelope":1,"events":[]}'),
    ]
    try:
        await p.process(first)
        result = await p.process(batch)
        assert (result.accepted, result.duplicates, len(result.rejected)) == (2, 2, 3)
        once = await p.store.ledger()
        again = await p.process(batch)  # a replay from the last committed offset
        assert again.accepted == 0
        assert await p.store.ledger() == once
        await p.drain()
        want = {
            ledger.series("events", "web", "accepted"): 3,
            ledger.series("events", "web", "duplicate"): 2,
            ledger.series("events", "unknown", "rejected"): 3,
            ledger.series("rejected", "not_object"): 1,
            ledger.series("rejected", "channel"): 1,
            ledger.series("rejected", "envelope"): 1,
        }
        assert {k: v for k, v in once.items() if k in want} == want
        # Marks name the event's place: partition, offset and index in the envelope.
        assert redis_client.get("jt:e:e2") == b"0:20:0"
        assert redis_client.get("jt:e:e4") == b"0:20:5"
        rows = await sink.query(
            "SELECT offset, item, code FROM journey.rejected_events FINAL ORDER BY offset, item"
        )
        assert rows == [(20, 3, "not_object"), (20, 4, "channel"), (21, 0, "envelope")]
    finally:
        await p.store.close()
        await sink.close()


@pytest.mark.parametrize("fill", [b"x", b"\x01", "é".encode()])
def test_a_dead_letter_always_fits_a_kafka_message(fill: bytes) -> None:
    """A payload near Kafka's limit grows when quoted; its dead letter keeps the start."""
    raw = fill * (1_000_000 // len(fill))
    message = RawMessage("journey.events", 1, 7, raw)
    out = rejected_message(message, Rejection("too big", "too_large", raw), T0, item=3)
    assert len(out) <= DEAD_LETTER_MAX_BYTES
    doc = orjson.loads(out)
    assert (doc["raw_truncated"], doc["raw_bytes"], doc["item"]) == (True, len(raw), 3)
    assert raw.decode().startswith(doc["raw"])
    small = rejected_message(message, Rejection("bad", "not_json", b"{"), T0)
    assert "raw_truncated" not in orjson.loads(small) and "item" not in orjson.loads(small)


async def test_late_events_are_judged_in_kafka_order(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """Events in time order are not late, however the batch groups their customers."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    # Alternate customers, a minute apart, in one partition: each group is in order,
    # but the second customer's first event is older than the first customer's last.
    values = [event(f"o{i}", "page_view", 60.0 * i, customer=f"c{i % 2}") for i in range(6)]
    try:
        await p.process(messages(values, partitions=1))
        late = p.metrics.registry.get_sample_value("journey_late_events_total", {"channel": "web"})
        assert late in (None, 0.0)
        # A genuinely late one (two minutes behind the newest, lateness allowed: 0) counts.
        old = [event("o-late", "page_view", 60.0 * 3, customer="c9")]
        await p.process([RawMessage("journey.events", 0, 99, old[0], T0 + 1)])
        late = p.metrics.registry.get_sample_value("journey_late_events_total", {"channel": "web"})
        assert late == 1.0
    finally:
        await p.store.close()
        await sink.close()


async def test_recovery_skips_an_entry_forgotten_after_it_was_read(
    redis_service: Service, redis_client: redis.Redis, chdb_path: Path
) -> None:
    """An outbox read can be stale by the time its entry's turn comes: nothing is written twice."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    p = processor(redis_service.url, sink)
    decoded = Validator().decode(event("gone", "page_view", 0, customer="c1"))
    assert isinstance(decoded, Event)
    stale = _payload(time.time() - 60, {"events": [event_row(decoded, T0)]}, [])

    async def snapshot(partition: int, skip: Collection[str] = ()) -> dict[str, bytes]:
        return {"t-gone": stale}  # read before its writer forgot it; Redis no longer has it

    p.store.outbox = snapshot  # type: ignore[method-assign]
    try:
        assert await p.recover([0]) == 0
        assert await sink.query("SELECT count() FROM journey.events") == [(0,)]
    finally:
        await p.store.close()
        await sink.close()
