"""The Redis store against a real redis-server."""

from __future__ import annotations

import pytest
import redis

from pipeline.embedded import Service
from pipeline.engine import Slot
from pipeline.identity import Ref, anonymous, customer
from pipeline.stages import Position, Profile
from pipeline.state.redis_store import Commit, Group, RedisStore, Write

pytestmark = pytest.mark.services


def profile(name: str, stage: str) -> Profile:
    return Profile(
        customer=name,
        positions={"retail": Position(stage, 100.0, 100.0, "web")},
        channels=frozenset({"web"}),
        last_channel="web",
        last_event_at=100.0,
    )


def write(
    ref: Ref,
    version: int,
    stage: str | None,
    partition: int = 0,
    deadline: float | None = None,
    delta: int = 1,
) -> Write:
    slot = Slot(None if stage is None else profile(ref.id, stage))
    deltas = {} if stage is None else {("retail", stage): delta}
    return Write(ref, version, slot, partition, deadline, deltas)


async def test_commit_writes_state_marks_counts_and_deadlines(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """One commit stores the profile, its home, the marks, the counts and the deadline."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    c1 = customer("c1")
    try:
        loaded, seen = await store.load([c1], ["e1", "e2"])
        assert loaded[c1].version == 0 and loaded[c1].home is None and not seen
        group = Group(
            [write(c1, 0, "purchase", partition=3, deadline=500.0)], {"e1": "3:0", "e2": "3:1"}
        )
        assert await store.commit(Commit([group], clocks={3: 150.0})) == []
        loaded, seen = await store.load([c1], ["e1", "e3"])
        assert loaded[c1].version == 1 and loaded[c1].home == 3
        assert loaded[c1].slot.profile == profile("c1", "purchase")
        assert seen == {"e1": "3:0"}  # the position that applied it
        assert await store.stage_customers([3]) == {("retail", "purchase"): 1}
        assert await store.stage_customers([0, 1]) == {}
        assert 0 < redis_client.ttl("jt:e:e1") <= 60
        assert await store.due(3, 500.0, 10) == []  # strictly before
        assert await store.due(3, 500.001, 10) == [c1]
        assert await store.pending_deadlines([3]) == 1
        clocks = await store.clocks([3, 4])
        assert list(clocks) == [3] and clocks[3].newest == 150.0
    finally:
        await store.close()


async def test_a_stale_version_voids_the_whole_commit_and_is_reported(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """A group based on an old read is reported by its index; nothing of the commit is written."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    c1, c2 = customer("c1"), customer("c2")
    try:
        first = Commit([Group([write(c1, 0, "awareness")], {"e1": "0:1"})], tally={0: {"n": 1}})
        assert await store.commit(first) == []
        stale = Group([write(c1, 0, "purchase")], {"e9": "0:9"})
        ok = Group([write(c2, 0, "awareness")], {"e2": "0:2"})
        both = Commit([ok, stale], outbox=(0, b"owed"), tally={0: {"n": 2}}, clocks={0: 9.0})
        assert await store.commit(both) == [1]
        assert (await store.profile(c1)) == profile("c1", "awareness")
        assert await store.profile(c2) is None
        assert redis_client.exists("jt:e:e9", "jt:e:e2", "jt:outbox:0", "jt:clock:0") == 0
        assert await store.stage_customers([0]) == {("retail", "awareness"): 1}
        assert await store.ledger() == {"n": 1}
        stale.writes[0].version = 1
        assert await store.commit(both) == []
        assert await store.stage_customers([0]) == {
            ("retail", "awareness"): 2,  # c1 (the helper's deltas only add) and c2
            ("retail", "purchase"): 1,
        }
        assert await store.ledger() == {"n": 3}
        assert redis_client.hget("jt:outbox:0", both.token) == b"owed"
    finally:
        await store.close()


async def test_a_commit_that_already_ran_is_not_applied_again(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """Sent again after its reply was lost, a commit finds its outbox entry and changes nothing."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    c1 = customer("c1")
    try:
        commit = Commit(
            [Group([write(c1, 0, "awareness")], {"e1": "0:1"})],
            outbox=(0, b"owed"),
            tally={0: {"n": 1}},
        )
        assert await store.commit(commit) == []
        assert await store.commit(commit) == []  # versions moved, yet not a conflict
        loaded, _ = await store.load([c1])
        assert loaded[c1].version == 1
        assert await store.ledger() == {"n": 1}
        assert await store.stage_customers([0]) == {("retail", "awareness"): 1}
    finally:
        await store.close()


async def test_a_group_stands_or_falls_together(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """A merge writes the device and the customer in one commit; one stale version voids both."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    c1, a1 = customer("c1"), anonymous("a1")
    try:
        assert await store.commit(Commit([Group([write(a1, 0, "awareness", deadline=50.0)])])) == []
        merge = Group(
            [
                write(c1, 0, "consideration"),
                Write(a1, 0, Slot(None, "c1"), 0, None, {("retail", "awareness"): -1}),
            ],
            {"login": "0:5"},
        )
        assert await store.commit(Commit([merge])) == [0]  # a1 is at version 1 now
        assert await store.profile(c1) is None
        merge.writes[1].version = 1
        assert await store.commit(Commit([merge])) == []
        assert await store.linked_to("a1") == "c1"
        assert await store.profile(a1) is None
        loaded, _ = await store.load([a1])
        assert loaded[a1].slot == Slot(None, "c1") and loaded[a1].version == 2
        assert await store.stage_customers([0]) == {
            ("retail", "awareness"): 0,
            ("retail", "consideration"): 1,
        }
        assert await store.due(0, 1e12, 10) == []  # the device's deadline went with it
    finally:
        await store.close()


async def test_script_survives_a_flushed_script_cache(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """After a restart or failover the script cache is empty; commits still work."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    c1 = customer("c1")
    try:
        assert await store.commit(Commit([Group([write(c1, 0, "awareness")])])) == []
        redis_client.script_flush()
        assert await store.commit(Commit([Group([write(c1, 1, "purchase")])])) == []
        assert (await store.profile(c1)) == profile("c1", "purchase")
    finally:
        await store.close()


async def test_an_event_id_marked_meanwhile_is_a_conflict(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """Two customers' batches claiming one event id: the second is sent back to re-read."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    a, b = customer("a"), customer("b")
    try:
        assert (
            await store.commit(Commit([Group([write(a, 0, "awareness")], {"shared": "0:1"})])) == []
        )
        assert await store.commit(
            Commit([Group([write(b, 0, "awareness")], {"shared": "1:7"})])
        ) == [0]
        assert await store.profile(b) is None
        _, seen = await store.load([b], ["shared"])
        assert seen == {"shared": "0:1"}
        assert await store.stage_customers([0]) == {("retail", "awareness"): 1}
    finally:
        await store.close()


async def test_partition_clock_only_moves_forward(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """An old event does not pull the clock back; the clock runs on with server time."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        await store.commit(Commit(clocks={0: 1000.0}))
        await store.commit(Commit(clocks={0: 900.0}))
        clock = (await store.clocks([0]))[0]
        assert clock.newest == 1000.0
        now = await store.server_time()
        assert 1000.0 <= clock.now(now) < 1000.0 + 5
        assert clock.now(clock.seen + 30) == pytest.approx(1030.0)
    finally:
        await store.close()


async def test_partitions_are_registered_not_scanned_for(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """Readers find partitions in jt:partitions: a SCAN would walk every duplicate mark."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        await store.commit(Commit(clocks={3: 1.0, 11: 2.0}))
        assert redis_client.smembers("jt:partitions") == {b"3", b"11"}
        redis_client.set("jt:clock:99", "stray")  # not registered: not found
        assert await store.known_partitions("jt:clock:") == [3, 11]
        redis_client.delete("jt:partitions")  # state from before the registry: scanned
        assert sorted(await store.known_partitions("jt:clock:")) == [3, 11, 99]
    finally:
        await store.close()
