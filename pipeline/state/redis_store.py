"""Live per-customer state in Redis, updated a whole chunk of a batch at a time.

A chunk costs two or three round trips: one script call that reads every
touched profile and duplicate mark (a second only when an anonymous id leads
to a customer not read yet), and one that writes everything back. The write
is a compare-and-set on each profile's version, so the pure engine runs in
Python between the read and the write while per-customer updates stay atomic
even if two workers briefly handle the same customer (a rebalance, or a
device and its customer on different partitions). It is all or nothing: if
any profile moved, nothing is written and the groups that raced are reported
back, so the chunk is re-read and recomputed. That costs a whole chunk on a
conflict, which only a rebalance or a cross-partition login makes, and lets
everything else be summed per chunk: one outbox entry, one ledger tally, one
increment per population count.

Key layout (profiles hash-tagged on the profile, so a future Redis Cluster
keeps one profile's keys in one slot):

- ``jt:{c:<customer>}:p`` / ``jt:{a:<anonymous id>}:p``  hash:
  ``v`` version, ``d`` profile JSON, ``h`` home partition (where its
  population and deadline are counted), ``l`` (devices only) the customer it
  was linked to; a linked device keeps ``v``/``h``/``l`` and loses ``d``.
  (Profiles written before chunk commits also hold a ``t``, no longer read.)
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
- ``jt:outbox:<partition>``        hash: commit token → the rows and messages a
  committed chunk still owes ClickHouse and Kafka (pipeline/writeout.py).
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

# KEYS: every key touched. ARGV[1]: a JSON head: "ttl" (mark TTL), "g" (per group:
# [writes, marks]; a write is [profile key, version read, home partition, deadlines
# key, sorted-set member (the profile's ref), the device's link, the deadline score,
# index in ARGV of the profile data], '' for "none" in link, deadline and data (0);
# marks are flattened [mark key, "<partition>:<offset>[:<index>]", ...]), "c"
# ([[key, field, n], ...]: the population counts and ledger tallies of the whole
# commit, summed), "q" (guarded tallies [[message mark key, ledger key, [[field, n],
# ...]], ...]: a rejected or duplicate message, tallied only if its mark was not set
# yet), "k" (partition clocks [[key, newest event time], ...]), "p" ([registry key,
# [partition, ...]]), "o" ([outbox key, token, index in ARGV of the payload]; absent:
# no outbox entry). Keys are indexes into KEYS. The profiles' data and the outbox
# payload follow as ARGV[2...], kept out of the JSON so they are not escaped twice;
# the rest is in the head because redis-py encodes each argument in Python, which
# cost more than the script's JSON decoding.
#
# All or nothing: if any group finds a version moved or one of its events marked
# meanwhile, nothing is written and the indexes of those groups are returned, to be
# re-read and recomputed. A commit whose outbox entry is already there ran before
# (the reply to an earlier try of this same call was lost): it counts as applied, so
# a retry after a dropped connection does not turn the chunk into duplicates. The
# outbox entry (the chunk's ClickHouse rows and Kafka messages) is written with the
# state and deleted once they are out: see pipeline/writeout.py.
COMMIT = """
local head = cjson.decode(ARGV[1])
if head.o and redis.call('HEXISTS', KEYS[head.o[1]], head.o[2]) == 1 then
  return {}
end
local conflicts = {}
for n, group in ipairs(head.g) do
  local clean = true
  for _, w in ipairs(group[1]) do
    local v = redis.call('HGET', KEYS[w[1]], 'v')
    if tonumber(v or '0') ~= w[2] then
      clean = false
    end
  end
  local marks = group[2]
  for j = 1, #marks, 2 do
    if clean and redis.call('EXISTS', KEYS[marks[j]]) == 1 then
      clean = false
    end
  end
  if not clean then
    table.insert(conflicts, n)
  end
end
if #conflicts > 0 then
  return conflicts
end
local ttl = head.ttl
for _, group in ipairs(head.g) do
  for _, w in ipairs(group[1]) do
    local key = KEYS[w[1]]
    local version = w[2] + 1
    if w[8] > 0 then
      redis.call('HSET', key, 'v', version, 'h', w[3], 'd', ARGV[w[8]])
    else
      redis.call('HSET', key, 'v', version, 'h', w[3])
      redis.call('HDEL', key, 'd')
    end
    if w[6] ~= '' then
      redis.call('HSET', key, 'l', w[6])
    end
    if w[7] ~= '' then
      redis.call('ZADD', KEYS[w[4]], w[7], w[5])
    else
      redis.call('ZREM', KEYS[w[4]], w[5])
    end
  end
  local marks = group[2]
  for j = 1, #marks, 2 do
    redis.call('SET', KEYS[marks[j]], marks[j + 1], 'EX', ttl)
  end
end
for _, c in ipairs(head.c) do
  redis.call('HINCRBY', KEYS[c[1]], c[2], c[3])
end
for _, x in ipairs(head.q) do
  if redis.call('SET', KEYS[x[1]], '1', 'NX', 'EX', ttl) then
    for _, f in ipairs(x[3]) do
      redis.call('HINCRBY', KEYS[x[2]], f[1], f[2])
    end
  end
end
if #head.k > 0 then
  local t = redis.call('TIME')
  local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
  for _, c in ipairs(head.k) do
    local newest = tonumber(c[2])
    if newest > tonumber(redis.call('HGET', KEYS[c[1]], 'newest') or '-1e18') then
      redis.call('HSET', KEYS[c[1]], 'newest', c[2], 'seen', now)
    end
  end
end
if #head.p[2] > 0 then
  redis.call('SADD', KEYS[head.p[1]], unpack(head.p[2]))
end
if head.o then
  redis.call('HSET', KEYS[head.o[1]], head.o[2], ARGV[head.o[3]])
end
return {}
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
class Group:
    """The profiles one group of events changes, and those events' marks.

    A group is the unit of conflict: if another worker changed one of its
    profiles (or marked one of its events) since it was read, the group is
    reported back to be read and computed again.
    """

    writes: list[Write]
    # event id -> "<partition>:<offset>[:<index>]": where in Kafka it was carried
    event_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Commit:
    """What one chunk of a batch (or one sweep step) changes in Redis: all of it, or nothing.

    ``token`` names the outbox entry, and tells a retried call that this commit already ran.
    """

    groups: list[Group] = field(default_factory=list)
    # (partition, payload): the ClickHouse rows and Kafka messages owed once this is applied
    outbox: tuple[int, bytes] | None = None
    # partition -> field -> n: what this adds to the business metrics (pipeline/ledger.py)
    tally: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    # partition -> the newest event time this commit saw on it (the partition's clock)
    clocks: Mapping[int, float] = field(default_factory=dict)
    guarded: Sequence[Guarded] = ()
    # 64 random bits are plenty, and short.
    token: str = field(default_factory=lambda: secrets.token_hex(8))


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
        self._commit = self.redis.register_script(COMMIT)
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

    async def commit(self, commit: Commit) -> list[int]:
        """Apply the commit atomically; return the indexes of its groups that conflicted.

        An empty list: it was applied (now, or by an earlier try whose reply was
        lost). Otherwise nothing was written.
        """
        keys: list[str] = []
        index: dict[str, int] = {}

        def k(name: str) -> int:
            found = index.get(name)
            if found is None:
                keys.append(name)
                found = index[name] = len(keys)  # Lua is 1-based
            return found

        args: list[Any] = [b""]  # the head, filled in below; then profile data, payload
        groups: list[list[list[Any]]] = []
        counts: dict[tuple[int, str], int] = {}
        touched = set(commit.clocks) | {g.partition for g in commit.guarded}
        for group in commit.groups:
            writes: list[Any] = []
            for w in group.writes:
                touched.add(w.home)
                profile, linked, deadline = w.slot.profile, w.slot.linked_to, w.deadline
                data = 0
                if profile is not None:
                    args.append(profile.to_json())
                    data = len(args)  # Lua is 1-based
                writes.append(
                    [
                        k(profile_key(w.ref)),
                        w.version,
                        w.home,
                        k(deadlines_key(w.home)),
                        str(w.ref),
                        "" if linked is None else linked,
                        "" if deadline is None else repr(float(deadline)),
                        data,
                    ]
                )
                for (journey, stage), delta in w.deltas.items():
                    if delta:
                        at = (k(counts_key(w.home)), count_field(journey, stage))
                        counts[at] = counts.get(at, 0) + delta
            marks: list[Any] = []
            for event_id, position in group.event_ids.items():
                marks += [k(mark_key(event_id)), position]
            groups.append([writes, marks])
        for partition, tally in commit.tally.items():
            ledger = k(ledger_key(partition))
            for name, n in tally.items():
                if n:
                    counts[(ledger, name)] = counts.get((ledger, name), 0) + n
            touched.add(partition)
        head: dict[str, Any] = {
            "ttl": self.dedupe_ttl_seconds,
            "g": groups,
            "c": [[key, name, n] for (key, name), n in counts.items() if n],
            "q": [
                [
                    k(tallied_key(g.partition, g.offset, g.item)),
                    k(ledger_key(g.partition)),
                    [[f, n] for f, n in g.tally.items() if n],
                ]
                for g in commit.guarded
            ],
            "k": [[k(clock_key(p)), repr(float(ts))] for p, ts in commit.clocks.items()],
        }
        if commit.outbox is not None:
            partition, payload = commit.outbox
            touched.add(partition)
            args.append(payload)
            head["o"] = [k(outbox_key(partition)), commit.token, len(args)]
        head["p"] = [k(PARTITIONS_KEY), [str(p) for p in sorted(touched)]]
        args[0] = orjson.dumps(head)
        if not (groups or commit.outbox or head["c"] or head["q"] or head["k"]):
            return []  # nothing to write
        conflicts = await self._commit(keys=keys, args=args)
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
