"""One batch of raw Kafka messages → Redis state, ClickHouse rows, metrics; and the sweep.

This is the I/O shell around the pure core: decode with the validator,
resolve identities, run the engine per group of profiles, and hand the
results to the adapters. It knows nothing of Faust, so it can be driven by any
consumer (and by tests).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from pipeline import engine, ledger
from pipeline.engine import Outcome, Slot
from pipeline.events import Event, Rejection, Validator
from pipeline.health import Health
from pipeline.identity import (
    REFUSED_CLAIMED,
    Ref,
    Resolved,
    anonymous,
    customer,
    groups,
    resolve,
    usable_ids,
)
from pipeline.journeys import Journey
from pipeline.metrics import Metrics, observe_many
from pipeline.settings import REJECTED_TOPIC, TRANSITIONS_TOPIC
from pipeline.sinks.clickhouse import (
    ClickHouseSink,
    event_row,
    feedback_row,
    from_outbox,
    handoff_row,
    rejected_row,
    transition_row,
)
from pipeline.stages import DWELL_KINDS, Profile, Transition, next_deadline
from pipeline.state.redis_store import Commit, Group, Guarded, Loaded, RedisStore, Write
from pipeline.writeout import OutMessage, Owed, WriteOut

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

# How many past-deadline profiles one sweep step handles per partition.
SWEEP_LIMIT = 500
# An event stamped later than its arrival plus this does not move its partition's
# clock further: a producer with a wrong clock must not drop everyone at once.
CLOCK_SKEW_SECONDS = 5.0
# An outbox entry older than this whose batch is not in flight here was left by
# a worker that died (or lost the partition) before its rows and messages were out.
RECOVER_AFTER_SECONDS = 5.0
# A dead letter bigger than this carries the start of its payload only: a message
# near Kafka's size limit grows when quoted into JSON and could not be published.
DEAD_LETTER_MAX_BYTES = 512 * 1024
# Redis failures worth waiting for (down, restarting, loading its data). A script
# or type error is a bug: retrying it would replay a half-applied script forever.
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp: float | None = None  # Kafka record time: when the event was received


@dataclass
class BatchResult:
    accepted: int = 0
    duplicates: int = 0
    transitions: list[Transition] = field(default_factory=list)
    rejected: list[tuple[RawMessage, Rejection]] = field(default_factory=list)


@dataclass
class _Pending:
    event: Event
    partition: int
    offset: int
    received_at: float | None
    item: int | None = None  # index in the message's envelope; None for a plain message

    @property
    def position(self) -> str:
        """Where the event sits in Kafka: its idempotency mark holds this."""
        return position(self.partition, self.offset, self.item)


@dataclass(frozen=True, slots=True)
class _Item:
    """One decoded event of a message, before it is sorted into applied or refused."""

    message: RawMessage
    index: int | None
    decoded: Event | Rejection

    @property
    def rejection(self) -> Rejection:
        assert isinstance(self.decoded, Rejection)
        return self.decoded


def _kafka_order(p: _Pending) -> tuple[int, int, int]:
    return (p.partition, p.offset, -1 if p.item is None else p.item)


def position(partition: int, offset: int, item: int | None = None) -> str:
    """``partition:offset`` of a plain message, ``partition:offset:index`` inside an envelope."""
    return f"{partition}:{offset}" if item is None else f"{partition}:{offset}:{item}"


Publisher = Callable[[Sequence[OutMessage]], Awaitable[None]]


async def _publish_nowhere(messages: Sequence[OutMessage]) -> None:
    """For tests and tools that run the processor without Kafka."""


def stage_deltas(before: Profile | None, after: Profile | None) -> dict[tuple[str, str], int]:
    """How a profile change moves the per-stage population counts."""
    deltas: dict[tuple[str, str], int] = defaultdict(int)
    old_positions = before.positions if before is not None else {}
    new_positions = after.positions if after is not None else {}
    for journey in set(old_positions) | set(new_positions):
        old = old_positions.get(journey)
        new = new_positions.get(journey)
        old_stage = old.stage if old else None
        new_stage = new.stage if new else None
        if old_stage != new_stage:
            if old_stage is not None:
                deltas[(journey, old_stage)] -= 1
            if new_stage is not None:
                deltas[(journey, new_stage)] += 1
    return dict(deltas)


def _refs_named(event: Event) -> list[Ref]:
    ids = usable_ids(event.customer_id, event.anonymous_id)
    refs = []
    if ids.customer_id is not None:
        refs.append(customer(ids.customer_id))
    if ids.anonymous_id is not None:
        refs.append(anonymous(ids.anonymous_id))
    return refs


def writes_for(
    loaded: dict[Ref, Loaded],
    slots: dict[Ref, Slot],
    changed: Iterable[Ref],
    home_if_new: dict[Ref, int],
    journeys: Sequence[Journey],
) -> list[Write]:
    """Pure: what the store must write for the profiles a computation changed."""
    writes = []
    for ref in sorted(changed):
        before = loaded[ref]
        slot = slots[ref]
        home = before.home if before.home is not None else home_if_new[ref]
        profile = slot.profile
        writes.append(
            Write(
                ref=ref,
                version=before.version,
                slot=slot,
                home=home,
                deadline=None if profile is None else next_deadline(profile, journeys),
                deltas=stage_deltas(before.slot.profile, profile),
            )
        )
    return writes


class BatchProcessor:
    def __init__(
        self,
        validator: Validator,
        journeys: Sequence[Journey],
        store: RedisStore,
        sink: ClickHouseSink,
        metrics: Metrics,
        retry_max_seconds: float = 30.0,
        allowed_lateness_seconds: float = 60.0,
        publish: Publisher = _publish_nowhere,
        health: Health | None = None,
        max_events: int = 1000,
        flush_seconds: float = 1.0,
        flush_rows: int = 50_000,
    ) -> None:
        self.publish = publish
        # Events per Redis script call (JOURNEY_BATCH_SIZE).
        self.max_events = max_events
        self.health = health or Health()
        # Outbox entries this process has committed (or is recovering) and not yet forgotten.
        self._in_flight: set[str] = set()
        self.retry_max_seconds = retry_max_seconds
        self.allowed_lateness_seconds = allowed_lateness_seconds
        self.validator = validator
        self.journeys = journeys
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self.writeout = WriteOut(sink, self._publish, self._done, flush_rows, flush_seconds)
        self.writeout.written = self._written
        # Newest event time per partition seen by this process: only for
        # counting late events (the clock that drives drop-off is in Redis).
        self._newest: dict[int, float] = {}
        # Devices already warned about, so one shared device cannot flood the log.
        self._warned: OrderedDict[str, None] = OrderedDict()

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        """Apply a batch of messages, in chunks of at most ``max_events`` events.

        A message may be an envelope of many events: chunking keeps one Redis
        script call to a bounded size whatever the messages hold. Each chunk's
        state is committed, with an outbox entry holding what it owes ClickHouse
        and Kafka, before the next is applied; those rows and messages then go
        out with other chunks' (pipeline/writeout.py), so this returns once the
        state is in Redis, and offsets may be committed then: a crash before the
        rows are out leaves them in the outbox for ``recover``. ``drain`` waits
        for them.
        """
        result = BatchResult()
        chunk: list[_Item] = []
        started = time.monotonic()
        now = time.time()
        for message in messages:
            for index, decoded in self.validator.decode_message(message.value, now=now):
                chunk.append(_Item(message, index, decoded))
            if len(chunk) >= self.max_events:
                await self._process_chunk(chunk, result, started, now)
                chunk = []
                started = time.monotonic()
                now = time.time()
        if chunk:
            await self._process_chunk(chunk, result, started, now)
        return result

    async def drain(self) -> None:
        """Write out everything committed so far; returns once it is in ClickHouse and Kafka."""
        await self.writeout.drain()

    async def _process_chunk(
        self, items: list[_Item], result: BatchResult, started: float, now: float
    ) -> None:
        rejected: list[_Item] = []
        pending: list[_Pending] = []
        in_batch: set[str] = set()
        repeated: list[_Pending] = []
        for item in items:
            decoded, message = item.decoded, item.message
            if isinstance(decoded, Rejection):
                rejected.append(item)
                continue
            entry = _Pending(
                decoded, message.partition, message.offset, message.timestamp, item.index
            )
            if decoded.event_id in in_batch:
                # A repeat within the batch, whichever customer it names, is a
                # duplicate of the first in arrival order, as in a replay.
                repeated.append(entry)
            else:
                in_batch.add(decoded.event_id)
                pending.append(entry)
        decoded_at = time.monotonic()

        rejected_rows = [
            rejected_row(
                i.rejection, i.message.topic, i.message.partition, i.message.offset, now, i.index
            )
            for i in rejected
        ]
        dead = [
            (REJECTED_TOPIC, None, rejected_message(i.message, i.rejection, now, i.index))
            for i in rejected
        ]
        guarded = [
            Guarded(
                i.message.partition, i.message.offset, ledger.rejected(i.rejection.code), i.index
            )
            for i in rejected
        ]
        guarded += [
            Guarded(p.partition, p.offset, ledger.duplicate(p.event.channel), p.item)
            for p in repeated
        ]
        home = items[0].message.partition
        applied, duplicates, outcome, owed = await self._apply_to_state(
            pending, now, home, guarded, rejected_rows, dead
        )
        stored_at = time.monotonic()

        result.transitions.extend(outcome.transitions)
        result.accepted += len(applied)
        result.duplicates += len(repeated) + len(duplicates)
        result.rejected.extend((i.message, i.rejection) for i in rejected)
        m = self.metrics
        m.batch_size.observe(len(items))
        m.batch_seconds.labels("decode").observe(decoded_at - started)
        m.batch_seconds.labels("redis").observe(stored_at - decoded_at)
        m.batch_seconds.labels("total").observe(stored_at - started)
        m.last_batch.set(time.time())
        self._observe_events(applied)
        self.observe_outcome(outcome)
        if owed is not None:
            await self.writeout.add(owed)

    async def _apply_to_state(
        self,
        pending: list[_Pending],
        now: float,
        home: int,
        guarded: list[Guarded],
        rejected_rows: list[list[Any]],
        dead: Sequence[OutMessage],
    ) -> tuple[list[_Pending], list[Event], Outcome, Owed | None]:
        """Read, resolve, compute, commit the chunk; on a conflict, all of it again.

        Returns what was applied, the duplicates, the outcome, and what the
        commit owes ClickHouse and Kafka (None: nothing). ``guarded`` are the
        tallies of messages that change no state (rejected, repeated in the
        chunk); ``home`` is the partition the chunk's outbox entry and ledger
        tally are filed under (any partition's owner recovers any entry).
        """
        while True:
            named = [r for p in pending for r in _refs_named(p.event)]
            ids = [p.event.event_id for p in pending]
            loaded, seen = await self._retrying("load", partial(self.store.load, named, ids))
            # A message that finds its own position in the mark was applied before a
            # crash or restart (its offset was not committed yet): skip it, uncounted.
            fresh = [p for p in pending if p.event.event_id not in seen]
            duplicates = [
                p
                for p in pending
                if p.event.event_id in seen and seen[p.event.event_id] != p.position
            ]
            tallies = guarded + [
                Guarded(p.partition, p.offset, ledger.duplicate(p.event.channel), p.item)
                for p in duplicates
            ]
            links = {
                ref.id: lo.slot.linked_to
                for ref, lo in loaded.items()
                if ref.anonymous and lo.slot.linked_to is not None
            }
            resolution = resolve([p.event for p in fresh], links)
            missing = {r.target for r in resolution.events} - set(loaded)
            if missing:
                more, _ = await self._retrying("load", partial(self.store.load, missing))
                loaded.update(more)

            outcome = Outcome()
            groups_: list[Group] = []
            for indexes in groups(resolution.events):
                items = [(fresh[i], resolution.events[i]) for i in indexes]
                groups_.append(self._compute(items, loaded, outcome))
            clocks: dict[int, float] = {}
            for p in fresh:
                arrived = p.received_at if p.received_at is not None else time.time()
                ts = min(p.event.ts, arrived + CLOCK_SKEW_SECONDS)
                clocks[p.partition] = max(clocks.get(p.partition, ts), ts)
            rows = {
                "events": [event_row(p.event, now) for p in fresh],
                **_outcome_rows(outcome),
                "rejected": rejected_rows,
            }
            messages = [*_transition_messages(outcome.transitions), *dead]
            payload = _payload(now, rows, messages) if any(rows.values()) or messages else None
            tally = ledger.accepted(p.event.channel for p in fresh) + ledger.outcome(outcome)
            commit = Commit(
                groups_,
                outbox=None if payload is None else (home, payload),
                tally={home: tally},
                clocks=clocks,
                guarded=tallies,
            )
            self._in_flight.add(commit.token)
            conflicts = await self._retrying("commit", partial(self.store.commit, commit))
            if not conflicts:
                owed = None
                if payload is not None:
                    owed = Owed(
                        rows,
                        messages,
                        (home, commit.token),
                        [p.event.ts for p in fresh],
                    )
                else:
                    self._in_flight.discard(commit.token)
                return fresh, [p.event for p in duplicates], outcome, owed
            self._in_flight.discard(commit.token)
            self.metrics.cas_conflicts.inc(len(conflicts))
            log.info(
                "%d groups of profiles changed concurrently; recomputing their chunk",
                len(conflicts),
            )

    def _compute(
        self, items: list[tuple[_Pending, Resolved]], loaded: dict[Ref, Loaded], into: Outcome
    ) -> Group:
        """One group's events on the profiles they reach; its records are added to ``into``."""
        refs = {r.target for _, r in items} | {r.absorb for _, r in items if r.absorb}
        slots = {ref: Slot(loaded[ref].slot.profile, loaded[ref].slot.linked_to) for ref in refs}
        home_if_new: dict[Ref, int] = {}
        for p, r in items:
            home_if_new.setdefault(r.target, p.partition)
            if r.absorb is not None:
                home_if_new.setdefault(r.absorb, p.partition)
            if r.result == REFUSED_CLAIMED and self._first_claim_warning(p.event.anonymous_id):
                log.warning(
                    "event %r: anonymous id %r already belongs to another customer; "
                    "not linking it to %r (first claim wins; counted in "
                    'journey_identity_merges_total{result="claimed"}, logged once per device)',
                    p.event.event_id,
                    p.event.anonymous_id,
                    r.target.id,
                )
        out = engine.run_events(slots, [(p.event, r) for p, r in items], self.journeys)
        _extend(into, out)
        writes = writes_for(loaded, slots, out.changed, home_if_new, self.journeys)
        return Group(writes, {p.event.event_id: p.position for p, _ in items})

    def _first_claim_warning(self, anonymous_id: str | None) -> bool:
        """True the first time (within the last 10,000 devices) a device's claim is refused."""
        key = anonymous_id or ""
        if key in self._warned:
            return False
        self._warned[key] = None
        if len(self._warned) > 10_000:
            self._warned.popitem(last=False)
        return True

    async def sweep(
        self, partitions: Iterable[int], idle: Collection[int] = ()
    ) -> list[Transition]:
        """Drop the customers of ``partitions`` whose deadline the partition clock passed.

        The watermark is the partition's newest event time minus the allowed
        lateness. Only for ``idle`` partitions (consumed up to the end, nothing
        waiting in Kafka) does the clock run on at wall-clock rate since the
        newest event arrived: a partition with a backlog (after a restart, or
        while a sink is down) must not drop customers whose next event is
        still waiting. A profile that changed meanwhile is left for the next
        sweep (compare-and-set). The drops' rows and messages go out with the
        write-out, as a chunk's do.
        """
        parts = list(partitions)
        if not parts:
            return []
        started = time.monotonic()
        server_now = await self._retrying("time", self.store.server_time)
        clocks = await self._retrying("clocks", partial(self.store.clocks, parts))
        outcome = Outcome()
        for partition, clock in clocks.items():
            now = clock.now(server_now) if partition in idle else clock.newest
            watermark = now - self.allowed_lateness_seconds
            refs = await self._retrying(
                "due", partial(self.store.due, partition, watermark, SWEEP_LIMIT)
            )
            if not refs:
                continue
            loaded, _ = await self._retrying("load", partial(self.store.load, refs))
            steps: list[tuple[Group, list[Transition]]] = []
            for ref in refs:
                slots = {ref: Slot(loaded[ref].slot.profile, loaded[ref].slot.linked_to)}
                dropped = engine.sweep(slots, [ref], self.journeys, watermark)
                writes = writes_for(loaded, slots, [ref], {ref: partition}, self.journeys)
                steps.append((Group(writes), dropped))
            while steps:
                dropped = [t for _, ts in steps for t in ts]
                rows = {"transitions": [transition_row(t) for t in dropped]}
                messages = _transition_messages(dropped)
                wall = time.time()
                commit = Commit(
                    [g for g, _ in steps],
                    outbox=(partition, _payload(wall, rows, messages)) if dropped else None,
                    tally={partition: ledger.outcome(Outcome(transitions=dropped))},
                )
                self._in_flight.add(commit.token)
                conflicts = set(await self._retrying("commit", partial(self.store.commit, commit)))
                if conflicts:
                    # Changed since read: those are left for the next sweep, the rest retried.
                    self._in_flight.discard(commit.token)
                    steps = [s for i, s in enumerate(steps) if i not in conflicts]
                    continue
                outcome.transitions.extend(dropped)
                if dropped:
                    await self.writeout.add(Owed(rows, messages, (partition, commit.token)))
                else:
                    self._in_flight.discard(commit.token)
                break
        if clocks:
            self.metrics.event_clock.set(max(c.now(server_now) for c in clocks.values()))
        self.observe_outcome(outcome)
        self.metrics.sweep_seconds.observe(time.monotonic() - started)
        return outcome.transitions

    async def recover(self, partitions: Iterable[int]) -> int:
        """Write out what a worker that died left in the outboxes of ``partitions``.

        Its state was committed with the outbox entry, so its rows and messages
        are owed: ClickHouse collapses rows already there (ReplacingMergeTree),
        and a transition or dead letter may reach Kafka twice. Returns how many
        entries were written out (this waits until they are).
        """
        recovered: list[tuple[int, str]] = []
        wall = time.time()
        for partition in partitions:
            entries = await self._retrying(
                "outbox", partial(self.store.outbox, partition, set(self._in_flight))
            )
            for token, payload in entries.items():
                if token in self._in_flight:
                    continue
                doc = orjson.loads(payload)
                if wall - float(doc["at"]) < RECOVER_AFTER_SECONDS:
                    continue  # may still be on its way out from another worker
                # Entries before this one may have let this process's own write-out
                # finish (and forget) one fetched while in flight: look again.
                if token in self._in_flight or not await self._retrying(
                    "outbox", partial(self.store.outbox_holds, partition, token)
                ):
                    continue
                self._in_flight.add(token)
                messages = [
                    (topic, None if key is None else key.encode(), value.encode())
                    for topic, key, value in doc["messages"]
                ]
                await self.writeout.add(
                    Owed(from_outbox(doc["rows"]), messages, (partition, token))
                )
                recovered.append((partition, token))
        if recovered:
            await self.writeout.drain()
            self.metrics.outbox_recovered.inc(len(recovered))
            log.warning(
                "wrote out %d batches left unfinished by a stopped worker (partitions %s)",
                len(recovered),
                ", ".join(str(p) for p in sorted({p for p, _ in recovered})),
            )
        return len(recovered)

    async def _publish(self, messages: Sequence[OutMessage]) -> None:
        """Publish, retrying while the broker is away: the outbox entry waits meanwhile."""
        if not messages:
            return
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=self.retry_max_seconds),
            retry=retry_if_exception_type((KafkaError, OSError)),
            reraise=True,
        ):
            with attempt:
                try:
                    await self.publish(messages)
                except (KafkaError, OSError) as exc:
                    self.metrics.sink_errors.labels("kafka", "publish").inc()
                    self.health.failed("kafka", exc)
                    log.warning("Kafka publish failed (%s: %s); retrying", type(exc).__name__, exc)
                    raise
                self.health.ok("kafka")

    async def _done(self, tokens: list[tuple[int, str]]) -> None:
        """Forget outbox entries whose rows are in ClickHouse and messages in Kafka."""
        if tokens:
            await self._retrying("outbox", partial(self.store.outbox_done, tokens))
        for _, token in tokens:
            self._in_flight.discard(token)

    def _written(self, owed: Sequence[Owed], seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.labels("clickhouse").observe(seconds)
        now = time.time()
        observe_many(m.written_lag, [max(0.0, now - ts) for o in owed for ts in o.event_times])

    async def _retrying(self, what: str, call: Callable[[], Awaitable[R]]) -> R:
        """Retry a Redis call until it succeeds: the agent waits, so consumption stops."""
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=self.retry_max_seconds),
            retry=retry_if_exception_type(TRANSIENT_REDIS_ERRORS),
            reraise=True,
        ):
            with attempt:
                try:
                    result = await call()
                except TRANSIENT_REDIS_ERRORS as exc:
                    self.metrics.sink_errors.labels("redis", what).inc()
                    self.health.failed("redis", exc)
                    log.warning("Redis %s failed (%s: %s); retrying", what, type(exc).__name__, exc)
                    raise
                self.health.ok("redis")
                return result
        raise AssertionError("unreachable")

    def _observe_events(self, applied: list[_Pending]) -> None:
        """This process's view of its committed events: lag, lateness. Counts are in the ledger."""
        m = self.metrics
        now = time.time()
        lags: list[float] = []
        lateness: dict[str, list[float]] = defaultdict(list)
        late: dict[str, int] = defaultdict(int)
        # In Kafka order: ``applied`` is in customer-group order, in which a customer's
        # event looks late behind another customer's later one.
        for p in sorted(applied, key=_kafka_order):
            e = p.event
            lags.append(max(0.0, now - e.ts))
            if p.received_at is not None:
                lateness[e.channel].append(max(0.0, p.received_at - e.ts))
            newest = self._newest.get(p.partition)
            if newest is not None and e.ts < newest - self.allowed_lateness_seconds:
                late[e.channel] += 1
            if newest is None or e.ts > newest:
                self._newest[p.partition] = e.ts
        observe_many(m.lag, lags)
        for channel, values in lateness.items():
            observe_many(m.lateness.labels(channel), values)
        for channel, n in late.items():
            m.late_events.labels(channel).inc(n)

    def observe_outcome(self, outcome: Outcome) -> None:
        """Time in stage of everyone who left one (a histogram, per process)."""
        by_series: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for t in outcome.transitions:
            if t.kind in DWELL_KINDS and t.from_stage is not None:
                by_series[(t.journey, t.from_stage, t.kind)].append(t.seconds_in_previous)
        for labels, values in by_series.items():
            observe_many(self.metrics.time_in_stage.labels(*labels), values)


def _outcome_rows(outcome: Outcome) -> dict[str, list[list[Any]]]:
    return {
        "transitions": [transition_row(t) for t in outcome.transitions],
        "handoffs": [handoff_row(h) for h in outcome.handoffs],
        "feedback": [feedback_row(f) for f in outcome.feedback],
    }


def _transition_messages(transitions: Iterable[Transition]) -> list[OutMessage]:
    return [(TRANSITIONS_TOPIC, t.customer.encode(), transition_message(t)) for t in transitions]


def _payload(at: float, rows: dict[str, list[list[Any]]], messages: Sequence[OutMessage]) -> bytes:
    """An outbox entry: the rows and messages owed once the state is committed."""
    return orjson.dumps(
        {
            "at": at,
            "rows": {table: r for table, r in rows.items() if r},
            "messages": [
                [topic, None if key is None else key.decode(), value.decode()]
                for topic, key, value in messages
            ],
        }
    )


def _extend(into: Outcome, more: Outcome) -> None:
    into.transitions.extend(more.transitions)
    into.handoffs.extend(more.handoffs)
    into.feedback.extend(more.feedback)
    into.merge_results.update(more.merge_results)
    into.changed |= more.changed


def transition_message(t: Transition) -> bytes:
    return orjson.dumps(t.to_dict())


def rejected_message(
    message: RawMessage, rejection: Rejection, received_at: float, item: int | None = None
) -> bytes:
    """The dead-letter record: the raw payload (as text) with where it came from and why.

    ``item`` is the event's index in its envelope; absent for a plain message.
    """
    record: dict[str, Any] = {
        "reason": rejection.reason,
        "code": rejection.code,
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "received_at": received_at,
        "raw": rejection.raw.decode("utf-8", errors="backslashreplace"),
    }
    if item is not None:
        record["item"] = item
    out = orjson.dumps(record)
    if len(out) > DEAD_LETTER_MAX_BYTES:
        # Under the producer's 1 MB request limit even if every character is escaped
        # (6 bytes each); the whole payload is in ClickHouse rejected_events.
        record["raw"] = record["raw"][: DEAD_LETTER_MAX_BYTES // 8]
        record["raw_truncated"] = True
        record["raw_bytes"] = len(rejection.raw)
        out = orjson.dumps(record)
    return out
