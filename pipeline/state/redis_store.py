"""Live per-customer state in Redis, updated a whole batch at a time.

A batch costs two round trips: one pipeline that reads every touched profile
and duplicate mark, and one Lua script that writes them back. The script is a
compare-and-set on each profile's version, so the pure engine can run in
Python between the two while per-customer updates stay atomic even if two
workers briefly process the same customer (during a rebalance): a customer
whose version moved is reported back, re-read and recomputed.

Key layout (the profile hash-tagged on the customer, so a future Redis
Cluster keeps one customer's keys in one slot):

- ``jt:{<customer>}:p``            hash ``v`` (version), ``d`` (profile JSON)
- ``jt:e:<event_id>``               duplicate mark, expires after the dedupe TTL.
  Event ids are unique across customers (DESIGN: the idempotency key), so the
  mark is global, not per customer; under Redis Cluster this key would sit in
  another slot than the profile, which the script does not support yet.
- ``jt:stage_customers:<partition>`` hash ``<journey>\\x1f<stage>`` → customers now
  there, per Kafka partition, so each worker can export exactly the partitions
  it owns and the sum over workers is the total.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.stages import Profile

FIELD_SEP = "\x1f"

# KEYS: every key touched. ARGV[1]: JSON plan (indexes into KEYS), ARGV[2]: mark TTL.
# Returns the plan indexes of customers that raced: their version had moved, or
# one of their events was marked meanwhile (by another customer's batch with
# the same event id). Nothing is written for those; the caller re-reads them.
CAS_APPLY = """
local plan = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local conflicts = {}
for i, item in ipairs(plan) do
  local key = KEYS[item.k]
  local current = tonumber(redis.call('HGET', key, 'v') or '0')
  local clean = current == item.v
  for _, m in ipairs(item.m) do
    if clean and redis.call('EXISTS', KEYS[m]) == 1 then
      clean = false
    end
  end
  if not clean then
    table.insert(conflicts, i)
  else
    redis.call('HSET', key, 'v', item.v + 1, 'd', item.d)
    for _, m in ipairs(item.m) do
      redis.call('SET', KEYS[m], '1', 'EX', ttl)
    end
    for _, c in ipairs(item.c) do
      redis.call('HINCRBY', KEYS[c[1]], c[2], c[3])
    end
  end
end
return conflicts
"""


def profile_key(customer: str) -> str:
    return f"jt:{{{customer}}}:p"


def mark_key(event_id: str) -> str:
    return f"jt:e:{event_id}"


def counts_key(partition: int) -> str:
    return f"jt:stage_customers:{partition}"


def count_field(journey: str, stage: str) -> str:
    return f"{journey}{FIELD_SEP}{stage}"


@dataclass
class Loaded:
    """A profile as read, with the version the write must still find."""

    profile: Profile
    version: int


@dataclass
class Update:
    customer: str
    version: int
    profile: Profile
    event_ids: list[str]
    partition: int
    # (journey, stage) -> change in customers now in that stage
    deltas: Mapping[tuple[str, str], int] = field(default_factory=dict)


class RedisStore:
    def __init__(self, url: str, dedupe_ttl_seconds: int) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self.dedupe_ttl_seconds = dedupe_ttl_seconds
        self._cas = self.redis.register_script(CAS_APPLY)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def load(self, wanted: Mapping[str, Sequence[str]]) -> tuple[dict[str, Loaded], set[str]]:
        """Profiles of ``wanted``'s customers and which of their event ids were seen.

        ``wanted`` maps customer → event ids in the batch. One round trip.
        """
        customers = list(wanted)
        pipe = self.redis.pipeline(transaction=False)
        for customer in customers:
            pipe.hmget(profile_key(customer), "v", "d")
        marks = [e for c in customers for e in wanted[c]]
        for event_id in marks:
            pipe.exists(mark_key(event_id))
        results = await pipe.execute()
        loaded: dict[str, Loaded] = {}
        for customer, (version, data) in zip(customers, results, strict=False):
            if data is None:
                loaded[customer] = Loaded(Profile.empty(customer), 0)
            else:
                loaded[customer] = Loaded(Profile.from_json(data), int(version))
        seen = {
            mark for mark, exists in zip(marks, results[len(customers) :], strict=True) if exists
        }
        return loaded, seen

    async def commit(self, updates: Sequence[Update]) -> list[str]:
        """Write all updates atomically per customer; return customers that conflicted."""
        if not updates:
            return []
        keys: list[str] = []
        index: dict[str, int] = {}

        def k(name: str) -> int:
            if name not in index:
                keys.append(name)
                index[name] = len(keys)  # Lua is 1-based
            return index[name]

        plan: list[dict[str, Any]] = []
        for u in updates:
            plan.append(
                {
                    "k": k(profile_key(u.customer)),
                    "v": u.version,
                    "d": u.profile.to_json().decode(),
                    "m": [k(mark_key(e)) for e in u.event_ids],
                    "c": [
                        [k(counts_key(u.partition)), count_field(j, s), d]
                        for (j, s), d in u.deltas.items()
                        if d
                    ],
                }
            )
        # cjson encodes an empty Lua table as {}: harmless, ipairs over it does nothing.
        conflicts = await self._cas(keys=keys, args=[orjson.dumps(plan), self.dedupe_ttl_seconds])
        return [updates[int(i) - 1].customer for i in conflicts]

    async def stage_customers(self, partitions: Iterable[int]) -> dict[tuple[str, str], int]:
        """Customers now in each (journey, stage), summed over ``partitions``."""
        parts = list(partitions)
        if not parts:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hgetall(counts_key(p))
        totals: dict[tuple[str, str], int] = {}
        for mapping in await pipe.execute():
            for raw_field, raw_value in mapping.items():
                journey, _, stage = raw_field.decode().partition(FIELD_SEP)
                totals[(journey, stage)] = totals.get((journey, stage), 0) + int(raw_value)
        return totals

    async def all_stage_customers(self) -> dict[tuple[str, str], int]:
        """Totals over every partition: for `journey up`'s view, not for metrics."""
        partitions = [
            int(key.decode().rsplit(":", 1)[1])
            async for key in self.redis.scan_iter(match="jt:stage_customers:*", count=1000)
        ]
        return await self.stage_customers(partitions)

    async def profile(self, customer: str) -> Profile | None:
        data = await self.redis.hget(profile_key(customer), "d")
        return None if data is None else Profile.from_json(data)

    async def close(self) -> None:
        await self.redis.aclose()
