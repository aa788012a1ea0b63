"""One batch of raw Kafka messages → Redis state, ClickHouse rows, metrics.

This is the I/O shell around the pure core: decode with the validator, run
the stage engine per customer, and hand the results to the adapters. It knows
nothing of Faust, so it can be driven by any consumer (and by tests).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from pipeline.events import Event, Rejection, Validator
from pipeline.journeys import Journey
from pipeline.metrics import Metrics
from pipeline.sinks.clickhouse import ClickHouseSink, event_row, rejected_row, transition_row
from pipeline.stages import Profile, Transition, apply_event
from pipeline.state.redis_store import Loaded, RedisStore, Update

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

# Rejected events carry no trustworthy channel; this label keeps the series bounded.
UNKNOWN_CHANNEL = "unknown"


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    value: bytes


@dataclass
class BatchResult:
    accepted: int = 0
    duplicates: int = 0
    transitions: list[Transition] = field(default_factory=list)
    rejected: list[tuple[RawMessage, Rejection]] = field(default_factory=list)


@dataclass
class _Computed:
    update: Update
    events: list[Event]
    duplicates: list[Event]
    transitions: list[Transition]


def stage_deltas(before: Profile, after: Profile) -> dict[tuple[str, str], int]:
    """How a profile change moves the per-stage population counts."""
    deltas: dict[tuple[str, str], int] = defaultdict(int)
    for journey in set(before.positions) | set(after.positions):
        old = before.positions.get(journey)
        new = after.positions.get(journey)
        old_stage = old.stage if old else None
        new_stage = new.stage if new else None
        if old_stage != new_stage:
            if old_stage is not None:
                deltas[(journey, old_stage)] -= 1
            if new_stage is not None:
                deltas[(journey, new_stage)] += 1
    return dict(deltas)


def compute(
    loaded: Loaded,
    events: Sequence[Event],
    seen: set[str],
    journeys: Sequence[Journey],
    partition: int,
) -> _Computed:
    """Pure: apply one customer's events of this batch to their stored profile.

    ``events`` hold no id twice (the batch is deduplicated first); ``seen`` are
    the ids Redis already marked.
    """
    profile = loaded.profile
    fresh: list[Event] = []
    duplicates: list[Event] = []
    transitions: list[Transition] = []
    for event in events:
        if event.event_id in seen:
            duplicates.append(event)
            continue
        profile, moved = apply_event(profile, event, journeys)
        transitions.extend(moved)
        fresh.append(event)
    update = Update(
        customer=loaded.profile.customer,
        version=loaded.version,
        profile=profile,
        event_ids=[e.event_id for e in fresh],
        partition=partition,
        deltas=stage_deltas(loaded.profile, profile),
    )
    return _Computed(update, fresh, duplicates, transitions)


class BatchProcessor:
    def __init__(
        self,
        validator: Validator,
        journeys: Sequence[Journey],
        store: RedisStore,
        sink: ClickHouseSink,
        metrics: Metrics,
        retry_max_seconds: float = 30.0,
    ) -> None:
        self.retry_max_seconds = retry_max_seconds
        self.validator = validator
        self.journeys = journeys
        self.store = store
        self.sink = sink
        self.metrics = metrics

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        started = time.monotonic()
        now = time.time()
        result = BatchResult()
        by_customer: dict[str, list[Event]] = defaultdict(list)
        partition_of: dict[str, int] = {}
        in_batch: set[str] = set()
        repeated: list[Event] = []
        for message in messages:
            decoded = self.validator.decode(message.value, now=now)
            if isinstance(decoded, Rejection):
                result.rejected.append((message, decoded))
            elif decoded.event_id in in_batch:
                # A repeat within the batch, whichever customer it names, is a
                # duplicate of the first in arrival order, as in stages.replay.
                repeated.append(decoded)
            else:
                in_batch.add(decoded.event_id)
                by_customer[decoded.key].append(decoded)
                partition_of[decoded.key] = message.partition
        decoded_at = time.monotonic()

        computed = await self._apply_to_state(by_customer, partition_of)
        stored_at = time.monotonic()

        for c in computed:
            self.sink.add_events([event_row(e, now) for e in c.events])
            self.sink.add_transitions([transition_row(t) for t in c.transitions])
            result.transitions.extend(c.transitions)
        self.sink.add_rejected(
            [rejected_row(r, m.topic, m.partition, m.offset, now) for m, r in result.rejected]
        )
        await self.sink.flush()
        flushed_at = time.monotonic()

        self._count(computed, repeated, result)
        m = self.metrics
        m.batch_size.observe(len(messages))
        m.batch_seconds.labels("decode").observe(decoded_at - started)
        m.batch_seconds.labels("redis").observe(stored_at - decoded_at)
        m.batch_seconds.labels("clickhouse").observe(flushed_at - stored_at)
        m.batch_seconds.labels("total").observe(time.monotonic() - started)
        return result

    async def _apply_to_state(
        self, by_customer: dict[str, list[Event]], partition_of: dict[str, int]
    ) -> list[_Computed]:
        """Read, compute, compare-and-set; recompute the customers that raced."""
        done: list[_Computed] = []
        pending = dict(by_customer)
        while pending:
            wanted = {c: [e.event_id for e in evs] for c, evs in pending.items()}
            loaded, seen = await self._retrying("load", self.store.load, wanted)
            batch = [
                compute(loaded[c], evs, seen, self.journeys, partition_of[c])
                for c, evs in pending.items()
            ]
            updates = [b.update for b in batch if b.events]
            conflicts = set(await self._retrying("commit", self.store.commit, updates))
            if conflicts:
                self.metrics.cas_conflicts.inc(len(conflicts))
                log.info("%d customers changed concurrently; recomputing them", len(conflicts))
            done.extend(b for b in batch if b.update.customer not in conflicts)
            pending = {c: pending[c] for c in conflicts}
        return done

    async def _retrying(self, what: str, fn: Callable[[A], Awaitable[R]], arg: A) -> R:
        """Retry a Redis call until it succeeds: the agent waits, so consumption stops."""
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=self.retry_max_seconds),
            retry=retry_if_exception_type((RedisError, OSError)),
            reraise=True,
        ):
            with attempt:
                try:
                    return await fn(arg)
                except (RedisError, OSError) as exc:
                    self.metrics.sink_errors.labels("redis", what).inc()
                    log.warning("Redis %s failed (%s: %s); retrying", what, type(exc).__name__, exc)
                    raise
        raise AssertionError("unreachable")

    def _count(self, computed: list[_Computed], repeated: list[Event], result: BatchResult) -> None:
        m = self.metrics
        now = time.time()
        for e in repeated:
            m.event(e.channel, "duplicate")
        result.duplicates += len(repeated)
        for c in computed:
            for e in c.events:
                m.event(e.channel, "accepted")
                m.lag.observe(max(0.0, now - e.ts))
            for e in c.duplicates:
                m.event(e.channel, "duplicate")
            result.accepted += len(c.events)
            result.duplicates += len(c.duplicates)
            for t in c.transitions:
                m.transitions.labels(t.journey, t.kind).inc()
                if t.to_stage is not None and t.kind != "merged":
                    m.entry(t.journey, t.to_stage, t.channel)
                if t.kind == "advanced" and t.from_stage is not None:
                    m.exit(t.journey, t.from_stage, t.channel, "advanced")
        for _, rejection in result.rejected:
            m.event(UNKNOWN_CHANNEL, "rejected")
            m.rejected.labels(rejection.code).inc()


def transition_message(t: Transition) -> bytes:
    return orjson.dumps(t.to_dict())


def rejected_message(message: RawMessage, rejection: Rejection, received_at: float) -> bytes:
    """The dead-letter record: the raw payload (as text) with where it came from and why."""
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "code": rejection.code,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "received_at": received_at,
            "raw": rejection.raw.decode("utf-8", errors="backslashreplace"),
        }
    )
