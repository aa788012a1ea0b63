"""The Redis store against a real redis-server."""

from __future__ import annotations

import pytest
import redis

from pipeline.embedded import Service
from pipeline.stages import Position, Profile
from pipeline.state.redis_store import RedisStore, Update

pytestmark = pytest.mark.services


def profile(customer: str, stage: str) -> Profile:
    return Profile(
        customer=customer,
        positions={"retail": Position(stage, 100.0, 100.0, "web")},
        channels=frozenset({"web"}),
        last_channel="web",
        last_event_at=100.0,
    )


async def test_commit_writes_state_marks_and_counts(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """One commit stores the profile, the duplicate marks and the per-partition counts."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        loaded, seen = await store.load({"c1": ["e1", "e2"]})
        assert loaded["c1"].version == 0 and not seen
        update = Update(
            "c1",
            0,
            profile("c1", "purchase"),
            ["e1", "e2"],
            partition=3,
            deltas={("retail", "purchase"): 1},
        )
        assert await store.commit([update]) == []
        loaded, seen = await store.load({"c1": ["e1", "e3"]})
        assert loaded["c1"].version == 1
        assert loaded["c1"].profile == profile("c1", "purchase")
        assert seen == {"e1"}
        assert await store.stage_customers([3]) == {("retail", "purchase"): 1}
        assert await store.stage_customers([0, 1]) == {}
        assert 0 < redis_client.ttl("jt:e:e1") <= 60
    finally:
        await store.close()


async def test_stale_version_is_refused_and_reported(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """A write based on an old read changes nothing and names the customer."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        first = Update("c1", 0, profile("c1", "awareness"), ["e1"], 0, {("retail", "awareness"): 1})
        ok = Update("c2", 0, profile("c2", "awareness"), ["e2"], 0, {("retail", "awareness"): 1})
        assert await store.commit([first]) == []
        stale = Update("c1", 0, profile("c1", "purchase"), ["e9"], 0, {("retail", "purchase"): 1})
        assert await store.commit([stale, ok]) == ["c1"]
        assert (await store.profile("c1")) == profile("c1", "awareness")
        assert redis_client.exists("jt:e:e9") == 0
        assert await store.stage_customers([0]) == {("retail", "awareness"): 2}
    finally:
        await store.close()


async def test_script_survives_a_flushed_script_cache(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """After a restart or failover the script cache is empty; commits still work."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        assert await store.commit([Update("c1", 0, profile("c1", "awareness"), [], 0, {})]) == []
        redis_client.script_flush()
        assert await store.commit([Update("c1", 1, profile("c1", "purchase"), [], 0, {})]) == []
        assert (await store.profile("c1")) == profile("c1", "purchase")
    finally:
        await store.close()


async def test_an_event_id_marked_meanwhile_is_a_conflict(
    redis_service: Service, redis_client: redis.Redis
) -> None:
    """Two customers' batches claiming one event id: the second is sent back to re-read."""
    store = RedisStore(redis_service.url, dedupe_ttl_seconds=60)
    try:
        a = Update("a", 0, profile("a", "awareness"), ["shared"], 0, {("retail", "awareness"): 1})
        b = Update("b", 0, profile("b", "awareness"), ["shared"], 0, {("retail", "awareness"): 1})
        assert await store.commit([a]) == []
        assert await store.commit([b]) == ["b"]
        assert await store.profile("b") is None
        _, seen = await store.load({"b": ["shared"]})
        assert seen == {"shared"}
        assert await store.stage_customers([0]) == {("retail", "awareness"): 1}
    finally:
        await store.close()
