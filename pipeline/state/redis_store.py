"""Live per-customer state in Redis, updated a whole batch at a time.

A batch costs two or three round trips: one pipeline that reads every touched
profile and duplicate mark (a second only when an anonymous id leads to a
customer not read yet), and one Lua script that writes everything back. The
script is a compare-and-set on each profile's version, so the pure engine
runs in Python between the read and the write while per-customer updates stay
atomic even if two workers briefly handle the same customer (a rebalance, or
a device and its customer on different partitions). A group whose versions
moved is reported back, re-read and recomputed.

Key layout (profiles hash-tagged on the profile, so a future Redis Cluster
keeps one profile's keys in one slot):

- ``jt:{c:<customer>}:p`` / ``jt:{a:<anonymous id>}:p``  hash:
  ``v`` version, ``d`` profile JSON, ``h`` home partition (where its
  population and deadline are counted), ``l`` (devices only) the customer it
  was linked to; a linked device keeps ``v``/``h``/``l`` and loses ``d``.
- ``jt:e:<event_id>``               duplicate mark, expires after the dedupe TTL.
  Event ids are unique across customers (DESIGN: the idempotency key), so the
  mark is global; under Redis Cluster it would sit in another slot than the
  profile, which the script does not support yet.
- ``jt:stage_customers:<partition>`` hash ``<journey>\\x1f<stage>`` → customers now
  there, per home partition, so each worker exports exactly the partitions it
  owns and the sum over workers is the total.
- ``jt:deadlines:<partition>``      sorted set: profile → its earliest drop-off
  deadline (event time). The owner of the partition sweeps it.
- ``jt:clock:<partition>``          hash ``newest`` (newest event time seen on
  the partition) and ``seen`` (Redis server time when it arrived): the
  partition's event-time clock, which runs on at wall-clock rate while idle.
- ``jt:ledger:<partition>``         hash: the business metrics' counts
  (pipeline/ledger.py), added in the same script as the state they count.
- ``jt:x:<partition>:<offset>[:<index>]``  a rejected or duplicate event
  already tallied (the index is its place in an envelope); expires after the
  dedupe TTL, as event marks do.
- ``jt:partitions``                 set of every partition with keys above, so
  readers never SCAN the keyspace (millions of marks) to find them.

Deadlines and clocks live here, not in worker memory, so a partition's new
owner after a rebalance picks up exactly where the old one stopped.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.engine import Slot
from pipeline.identity import Ref, anonymous
from pipeline.stages import Profile

log = logging.getLogger(__name__)

FIELD_SEP = "\x1f"

# KEYS: ARGV[1] profile keys, then mark keys. Returns, per profile, its
# [v, d, h, l] (false where absent), then each mark's value (false: none).
READ = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  out[i] = redis.call('HMGET', KEYS[i], 'v', 'd', 'h', 'l')
end
for i = n + 1, #KEYS do
  out[i] = redis.call('GET', KEYS[i])
end
return out
"""

# KEYS: every key touched. ARGV[1]: JSON plan of groups (indexes into KEYS),
# ARGV[2]: mark TTL, ARGV[3]: partition clocks [[key, newest event time], ...],
# ARGV[4]: the batch's own outbox entry [key, field, ARGV index] or '', ARGV[5]:
# guarded tallies [[message mark key, ledger key, [[field, n], ...]], ...] (a
# rejected or duplicate message: tallied only if its mark was not set yet),
# ARGV[6]: [registry key, [partition, ...]] the partitions this call touches,
# ARGV[7..]: outbox payloads (kept out of the JSON plan so they are not escaped twice).
# A group's tally ("x": [ledger key, [[field, n], ...]]) is added with its state.
# A group's marks are [key, "<partition>:<offset>[:<index in envelope>]"]: a replayed event finds
# its own position there and is known as already applied, not as a duplicate.
# A group's outbox entry (its ClickHouse rows and Kafka messages) is written
# with its state, and deleted once they are out: see pipeline/processor.py.
# Absent JSON fields mean "none" (cjson turns null into a truthy userdata).
# Returns the plan indexes of groups that raced: a version had moved, or one
# of their events was marked meanwhile. Nothing is written for those. A group
# whose profiles all carry its token already ran (the reply to an earlier try
# of this same call was lost): it counts as applied, not as a conflict, so a
# retry after a dropped connection does not turn the batch into duplicates.
CAS_APPLY = """
local plan = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local clocks = cjson.decode(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local conflicts = {}
for i, g in ipairs(plan) do
  local clean = true
  local applied = #g.w > 0
  for _, w in ipairs(g.w) do
    local current = redis.call('HMGET', KEYS[w.k], 'v', 't')
    if tonumber(current[1] or '0') ~= w.v then
      clean = false
    end
    if current[2] ~= g.t then
      applied = false
    end
  end
  if clean then
    for _, m in ipairs(g.m) do
      if redis.call('EXISTS', KEYS[m[1]]) == 1 then
        clean = false
      end
    end
  end
  if not clean then
    if not applied then
      table.insert(conflicts, i)
    end
  else
    for _, w in ipairs(g.w) do
      local key = KEYS[w.k]
      redis.call('HSET', key, 'v', w.v + 1, 'h', w.h, 't', g.t)
      if w.d then
        redis.call('HSET', key, 'd', w.d)
      else
        redis.call('HDEL', key, 'd')
      end
      if w.l then
        redis.call('HSET', key, 'l', w.l)
      end
      if w.s then
        redis.call('ZADD', KEYS[w.z], w.s, w.r)
      else
        redis.call('ZREM', KEYS[w.z], w.r)
      end
    end
    for _, m in ipairs(g.m) do
      redis.call('SET', KEYS[m[1]], m[2], 'EX', ttl)
    end
    if g.o then
      redis.call('HSET', KEYS[g.o[1]], g.t, ARGV[g.o[2]])
    end
    for _, c in ipairs(g.c) do
      redis.call('HINCRBY', KEYS[c[1]], c[2], c[3])
    end
    if g.x then
      for _, f in ipairs(g.x[2]) do
        redis.call('HINCRBY', KEYS[g.x[1]], f[1], f[2])
      end
    end
  end
end
for _, x in ipairs(cjson.decode(ARGV[5])) do
  if redis.call('SET', KEYS[x[1]], '1', 'NX', 'EX', ttl) then
    for _, f in ipairs(x[3]) do
      redis.call('HINCRBY', KEYS[x[2]], f[1], f[2])
    end
  end
end
for _, c in ipairs(clocks) do
  local newest = tonumber(c[2])
  if newest > tonumber(redis.call('HGET', KEYS[c[1]], 'newest') or '-1e18') then
    redis.call('HSET', KEYS[c[1]], 'newest', c[2], 'seen', string.format('%.6f', now))
  end
end
local touched = cjson.decode(ARGV[6])
if #touched[2] > 0 then
  redis.call('SADD', KEYS[touched[1]], unpack(touched[2]))
end
if ARGV[4] ~= '' then
  local o = cjson.decode(ARGV[4])
  redis.call('HSET', KEYS[o[1]], o[2], ARGV[o[3]])
end
return conflicts
"""


def profile_key(ref: Ref) -> str:
    return f"jt:{{{ref}}}:p"


def mark_key(event_id: str) -> str:
    return f"jt:e:{event_id}"


def counts_key(partition: int) -> str:
    return f"jt:stage_customers:{partition}"


def deadlines_key(partition: int) -> str:
    return f"jt:deadlines:{partition}"


def clock_key(partition: int) -> str:
    return f"jt:clock:{partition}"


def outbox_key(partition: int) -> str:
    return f"jt:outbox:{partition}"


PARTITIONS_KEY = "jt:partitions"


def ledger_key(partition: int) -> str:
    return f"jt:ledger:{partition}"


def tallied_key(partition: int, offset: int, item: int | None = None) -> str:
    suffix = "" if item is None else f":{item}"
    return f"jt:x:{partition}:{offset}{suffix}"


def count_field(journey: str, stage: str) -> str:
    return f"{journey}{FIELD_SEP}{stage}"


@dataclass
class Loaded:
    """A profile slot as read, with the version the write must still find."""

    slot: Slot
    version: int
    home: int | None  # None: never stored


@dataclass
class Write:
    ref: Ref
    version: int  # the version read; the write bumps it
    slot: Slot
    home: int
    deadline: float | None
    # (journey, stage) -> change in customers now there, counted at ``home``
    deltas: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class Commit:
    """Writes that stand or fall together: one group of a batch, or one swept profile.

    ``token`` tells a retried call that this commit already ran.
    """

    writes: list[Write]
    # event id -> "<partition>:<offset>[:<index>]": where in Kafka it was carried
    event_ids: Mapping[str, str] = field(default_factory=dict)
    # Stored in every profile the commit writes: 64 random bits are plenty, and short.
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    # (partition, payload): what must reach ClickHouse and Kafka once this is applied
    outbox: tuple[int, bytes] | None = None
    # (partition, field -> n): what this adds to the business metrics (pipeline/ledger.py)
    tally: tuple[int, Mapping[str, int]] | None = None


@dataclass(frozen=True)
class Guarded:
    """The tally of an event that changes no state (rejected, duplicate), counted once."""

    partition: int
    offset: int
    tally: Mapping[str, int]
    item: int | None = None  # index in the message's envelope


@dataclass(frozen=True)
class Clock:
    """A partition's event-time clock (see the module docstring)."""

    newest: float
    seen: float

    def now(self, server_time: float) -> float:
        return self.newest + max(0.0, server_time - self.seen)


def _decode(ref: Ref, data: bytes) -> Profile | None:
    """A stored profile; one that cannot be read starts afresh rather than stopping the worker.

    Nothing this version writes is unreadable; this guards against a hand edit
    or another program writing under our prefix. The next write replaces it.
    """
    try:
        return Profile.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.error(
            "profile %s in Redis is unreadable (%s: %s); starting it afresh: its next event "
            "re-enters it, and its stage counts may be off by one until then",
            profile_key(ref),
            type(exc).__name__,
            exc,
        )
        return None


class RedisStore:
    def __init__(self, url: str, dedupe_ttl_seconds: int) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self.dedupe_ttl_seconds = dedupe_ttl_seconds
        self._cas = self.redis.register_script(CAS_APPLY)
        self._read = self.redis.register_script(READ)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def load(
        self, refs: Iterable[Ref], event_ids: Sequence[str] = ()
    ) -> tuple[dict[Ref, Loaded], dict[str, str]]:
        """Slots of ``refs``, and the marks of those ``event_ids`` already applied. One round trip.

        A mark is the position (``"<partition>:<offset>[:<index>]"``) that applied the event.
        """
        wanted = list(dict.fromkeys(refs))
        if not wanted and not event_ids:
            return {}, {}
        # One script call rather than a pipeline of one command per profile and mark:
        # redis-py's per-command cost was the larger part of a batch's Redis time.
        results = await self._read(
            keys=[*(profile_key(ref) for ref in wanted), *(mark_key(e) for e in event_ids)],
            args=[len(wanted)],
        )
        loaded: dict[Ref, Loaded] = {}
        for ref, (version, data, home, linked) in zip(wanted, results, strict=False):
            profile = None if data is None else _decode(ref, data)
            loaded[ref] = Loaded(
                Slot(profile, None if linked is None else linked.decode()),
                0 if version is None else int(version),
                None if home is None else int(home),
            )
        marks = results[len(wanted) :]
        seen = {
            e: mark.decode() if isinstance(mark, bytes) else str(mark)
            for e, mark in zip(event_ids, marks, strict=True)
            if mark is not None
        }
        return loaded, seen

    async def commit(
        self,
        commits: Sequence[Commit],
        clocks: Mapping[int, float] | None = None,
        outbox: tuple[int, str, bytes] | None = None,
        guarded: Sequence[Guarded] = (),
    ) -> list[int]:
        """Apply each commit atomically; return the indexes of those that conflicted.

        ``clocks`` advances partitions' event-time clocks (partition → newest
        event time in this batch) in the same script; ``guarded`` tallies
        messages that change no state, each at most once.
        """
        if not commits and not clocks and outbox is None and not guarded:
            return []
        payloads: list[bytes] = []

        def arg(payload: bytes) -> int:
            payloads.append(payload)
            return 6 + len(payloads)  # ARGV[7] is the first payload

        keys: list[str] = []
        index: dict[str, int] = {}

        def k(name: str) -> int:
            if name not in index:
                keys.append(name)
                index[name] = len(keys)  # Lua is 1-based
            return index[name]

        plan: list[dict[str, Any]] = []
        for commit in commits:
            writes = []
            counts: list[list[Any]] = []
            for w in commit.writes:
                item: dict[str, Any] = {
                    "k": k(profile_key(w.ref)),
                    "v": w.version,
                    "h": w.home,
                    "z": k(deadlines_key(w.home)),
                    "r": str(w.ref),
                }
                if w.slot.profile is not None:
                    item["d"] = w.slot.profile.to_json().decode()
                if w.slot.linked_to is not None:
                    item["l"] = w.slot.linked_to
                if w.deadline is not None:
                    item["s"] = repr(float(w.deadline))
                writes.append(item)
                counts.extend(
                    [k(counts_key(w.home)), count_field(j, s), d]
                    for (j, s), d in w.deltas.items()
                    if d
                )
            marks = [[k(mark_key(e)), pos] for e, pos in commit.event_ids.items()]
            item = {"w": writes, "m": marks, "c": counts, "t": commit.token}
            if commit.outbox is not None:
                partition, payload = commit.outbox
                item["o"] = [k(outbox_key(partition)), arg(payload)]
            if commit.tally is not None and any(commit.tally[1].values()):
                partition, tally = commit.tally
                item["x"] = [k(ledger_key(partition)), [[f, n] for f, n in tally.items() if n]]
            plan.append(item)
        clock_plan = [[k(clock_key(p)), repr(float(ts))] for p, ts in (clocks or {}).items()]
        touched = set(clocks or ()) | {g.partition for g in guarded}
        for commit in commits:
            touched |= {w.home for w in commit.writes}
            if commit.outbox is not None:
                touched.add(commit.outbox[0])
            if commit.tally is not None:
                touched.add(commit.tally[0])
        own = b""
        if outbox is not None:
            partition, field_name, payload = outbox
            own = orjson.dumps([k(outbox_key(partition)), field_name, arg(payload)])
        conflicts = await self._cas(
            keys=keys,
            args=[
                orjson.dumps(plan),
                self.dedupe_ttl_seconds,
                orjson.dumps(clock_plan),
                own,
                orjson.dumps(
                    [
                        [
                            k(tallied_key(g.partition, g.offset, g.item)),
                            k(ledger_key(g.partition)),
                            [[f, n] for f, n in g.tally.items() if n],
                        ]
                        for g in guarded
                    ]
                ),
                orjson.dumps([k(PARTITIONS_KEY), [str(p) for p in sorted(touched)]]),
                *payloads,
            ],
        )
        return [int(i) - 1 for i in conflicts]

    async def outbox(self, partition: int, skip: Collection[str] = ()) -> dict[str, bytes]:
        """Entries of a partition's outbox: token -> payload, those in ``skip`` left unread.

        The worker calls this every sweep while its own entries (a chunk's rows, a
        few hundred KB) are in flight; reading only the others keeps that cheap.
        """
        key = outbox_key(partition)
        tokens = [
            t.decode() if isinstance(t, bytes) else str(t) for t in await self.redis.hkeys(key)
        ]
        wanted = [t for t in tokens if t not in skip]
        if not wanted:
            return {}
        values = await self.redis.hmget(key, wanted)
        return {
            t: v if isinstance(v, bytes) else str(v).encode()
            for t, v in zip(wanted, values, strict=True)
            if v is not None
        }

    async def outbox_holds(self, partition: int, token: str) -> bool:
        """Whether the entry is still owed (nobody has written it out and forgotten it)."""
        return bool(await self.redis.hexists(outbox_key(partition), token))

    async def outbox_done(self, entries: Iterable[tuple[int, str]]) -> None:
        """Forget outbox entries whose rows and messages are out."""
        pipe = self.redis.pipeline(transaction=False)
        for partition, token in entries:
            pipe.hdel(outbox_key(partition), token)
        await pipe.execute()

    async def server_time(self) -> float:
        seconds, micros = await self.redis.time()
        return float(seconds) + micros / 1_000_000

    async def clocks(self, partitions: Iterable[int]) -> dict[int, Clock]:
        parts = list(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hmget(clock_key(p), "newest", "seen")
        out: dict[int, Clock] = {}
        for p, (newest, seen) in zip(parts, await pipe.execute(), strict=True):
            if newest is not None and seen is not None:
                out[p] = Clock(float(newest), float(seen))
        return out

    async def due(self, partition: int, before: float, limit: int) -> list[Ref]:
        """Profiles of ``partition`` whose earliest deadline is strictly before ``before``."""
        members = await self.redis.zrangebyscore(
            deadlines_key(partition), "-inf", f"({before!r}", start=0, num=limit
        )
        return [Ref.parse(m.decode() if isinstance(m, bytes) else str(m)) for m in members]

    async def pending_deadlines(self, partitions: Iterable[int]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.zcard(deadlines_key(p))
        return sum(int(n) for n in await pipe.execute())

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

    async def known_partitions(self, prefix: str = "jt:stage_customers:") -> list[int]:
        """Every partition the state has keys for (its clock, counts, ledger, deadlines).

        Read from the ``jt:partitions`` set; only state written before that set
        existed makes this fall back to scanning for ``prefix`` keys.
        """
        members = await self.redis.smembers(PARTITIONS_KEY)
        if members:
            return sorted(int(m) for m in members)
        return [
            int(key.decode().rsplit(":", 1)[1])
            async for key in self.redis.scan_iter(match=f"{prefix}*", count=1000)
        ]

    async def all_stage_customers(self) -> dict[tuple[str, str], int]:
        """Totals over every partition: for `journey up`'s view, not for metrics."""
        return await self.stage_customers(await self.known_partitions())

    async def ledger(self) -> dict[str, int]:
        """The business metrics' totals over every partition (pipeline/ledger.py)."""
        partitions = await self.known_partitions("jt:ledger:")
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.hgetall(ledger_key(p))
        totals: dict[str, int] = {}
        for mapping in await pipe.execute() if partitions else []:
            for raw_field, raw_value in mapping.items():
                name = raw_field.decode()
                totals[name] = totals.get(name, 0) + int(raw_value)
        return totals

    async def profile(self, ref: Ref) -> Profile | None:
        data = await self.redis.hget(profile_key(ref), "d")
        return None if data is None else Profile.from_json(data)

    async def linked_to(self, anonymous_id: str) -> str | None:
        data = await self.redis.hget(profile_key(anonymous(anonymous_id)), "l")
        if data is None:
            return None
        return data.decode() if isinstance(data, bytes) else str(data)

    async def close(self) -> None:
        await self.redis.aclose()
