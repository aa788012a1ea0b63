"""The worker's throughput for good traffic, alone and with hostile events mixed in.

Reproduce (from the project root):

    .venv/bin/pip install -e '.[dev,bench]'   # the catalogue is in tests/: pytest, hypothesis
    .venv/bin/python bench/hostile_mix.py      # 100,000 good events, 10% of messages hostile
    .venv/bin/python bench/hostile_mix.py --events 20000 --hostile-share 0.2 --rounds 2

The issue asks that a held-out list of hostile events lands where it belongs
"with the worker's throughput for good traffic unchanged". One run measures
the real ``journey worker`` (a child process with chDB, started and timed by
``bench/throughput.py``'s own ``worker()``) twice, on the same machine:

- (a) good only: ``--events`` simulator events (the generator of
  `journey simulate`, ~1% resent duplicates, ~3% unmapped types), one per
  message, keyed by ``pipeline.simulate.key_of``;
- (b) good + hostile: the same good messages, byte for byte, with hostile
  messages making up ``--hostile-share`` of all messages. They come from the
  catalogue of ``tests/test_hostile_input.py`` (the one
  ``tests/integration/test_hostile_worker.py`` sends through a worker): not
  JSON, not an object, wrong types, missing ids, placeholder ids, unknown
  channels and schema versions, timestamps in the far future or before 2000,
  payloads over 64 KiB, deeply nested and oversized properties, invalid UTF-8,
  control characters, SQL- and Redis-command-looking ids. Every case is sent
  about equally often (shuffled rounds of the whole catalogue) at random
  places in the stream; copies of a valid case get a fresh event id where that
  keeps them valid, so they are new events rather than duplicates. A quarter
  of the hostile messages (``--flood-share``, at most the integration test's
  3,000) is that test's flood of one customer, in one burst mid-stream.
  Hostile messages are keyed as `journey send` keys a line (the usable
  customer, else device id; none when there is none).

Each phase starts equal: a fresh Tansu broker (memory storage) holding only
that phase's messages, a fresh chDB directory, and the one redis-server
(AOF on, as in production) flushed, its AOF rewritten and its stats reset.
The group join (15–35 s on Tansu) is not timed. A phase's time runs from the
start of the worker's first batch (the earliest ``received_at`` in ClickHouse)
until ``journey_events_total`` on /metrics counts every message: a batch is
counted only after its Redis commit and ClickHouse insert. That figure moves
in steps of the worker's ledger refresh (2 s) and the scrape (0.5 s), so the
first-to-last batch span stamped in ClickHouse is reported beside it.

The figure that answers the issue is good events/s of (b) over (a). If a
hostile message cost what a good one costs, it would be ``1 − share`` (the
worker has that many more messages to get through); the report also gives
what one hostile message costs in good events' time. The worker keeps one core
busy, so the same comparison in its CPU per good event is steadier than wall
time when other processes come and go; each phase also shows how many cores
other processes kept busy meanwhile, and the report warns when that is high
enough to move the figure (use ``--rounds 2`` or more there: rounds alternate
which phase goes first).

After each phase it checks that every message landed where it belongs: each
rejected one in ClickHouse ``rejected_events`` and on
``journey.events.rejected`` with its raw payload verbatim and the catalogue's
code, counted by reason on /metrics; each valid hostile one in
``journey.events`` (or counted as a duplicate where its copy could not get a
fresh id); accepted, duplicate and rejected totals exactly as the input
implies. A failed check exits with status 1. A case larger than a Kafka record
carries (about 1 MB: today "envelope over 1 MB") cannot reach a worker at
all; it is left out and named in the report.

Everything shares 2 cores, so read the ratios more than the absolute figures.
Results are printed and written to bench/results/hostile_mix.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import redis
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import TopicStats, records, total, worker
from pipeline.embedded import Service, create_topics, start_kafka, start_redis
from pipeline.events import Event, Validator
from pipeline.producer import produce_batches
from pipeline.send import line_key
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "hostile_mix.json"
COMMAND = ".venv/bin/python bench/hostile_mix.py"
console = Console(width=120)

GOOD, MIXED = "(a) good only", "(b) good + hostile"
# A record over about 1 MB is refused by the producer (aiokafka's max_request_size) and by
# Kafka (message.max.bytes, 1,048,588 by default): such a case never reaches a worker.
KAFKA_MAX_BYTES = 1_000_000
# Cores busy with other processes during a timed window above which the report warns:
# on 2 cores, a third of one is enough to move a phase's figure by several percent.
OTHER_LOAD_WARNING = 0.3
Samples = dict[str, list[tuple[dict[str, str], float]]]
Record = tuple[bytes | None, bytes]


def _tests() -> tuple[ModuleType, ModuleType]:
    """The catalogue's modules: tests/ is not installed, so the project root goes on the path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tests.integration.test_hostile_worker as worker_test
    import tests.test_hostile_input as input_test

    return input_test, worker_test


# --- the input ---------------------------------------------------------------------------


@dataclass
class Mix:
    """The messages of one phase and what each kind of them must become."""

    messages: list[Record]
    good: int
    good_duplicates: int
    hostile: int = 0
    hostile_bytes: int = 0
    flood: int = 0
    # rejected: (raw as the worker stores it, code) → copies sent
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    valid_ids: set[str] = field(default_factory=set)  # distinct ids of valid hostile messages
    valid_copies: int = 0  # valid hostile messages sent (flood included)
    cases: Counter[str] = field(default_factory=Counter)  # catalogue case → copies sent
    catalogue_size: int = 0
    unsendable: list[str] = field(default_factory=list)  # cases too big for any Kafka record

    @property
    def by_code(self) -> Counter[str]:
        codes: Counter[str] = Counter()
        for (_, code), n in self.rejected.items():
            codes[code] += n
        return codes

    def expected(self) -> dict[str, int]:
        """Every message counted once: accepted (new ids), duplicate or rejected."""
        good_new = self.good - self.good_duplicates
        return {
            "messages": len(self.messages),
            "accepted": good_new + len(self.valid_ids),
            "duplicate": self.good_duplicates + self.valid_copies - len(self.valid_ids),
            "rejected": sum(self.rejected.values()),
        }


def fresh_copy(raw: bytes, copy: int, validator: Validator, now: float) -> bytes:
    """A valid case with a new event id (``h-`` → ``h-<copy>-``) if it stays valid, else as is.

    A case that cannot take a longer id (the one of exactly 64 KiB, an id of
    exactly 128 characters, an id without the ``h-`` prefix) is sent as is: its
    copies after the first are duplicates, and are counted as such.
    """
    variant = raw.replace(b'"event_id":"h-', f'"event_id":"h-{copy}-'.encode())
    if variant == raw:
        return raw
    original, decoded = validator.decode(raw, now=now), validator.decode(variant, now=now)
    if (
        isinstance(decoded, Event)
        and isinstance(original, Event)
        and decoded.event_id != original.event_id
    ):
        return variant
    return raw


def good_only(good: list[Record], stats: TopicStats) -> Mix:
    return Mix(list(good), stats.events, stats.duplicates)


def mixed(
    good: list[Record], stats: TopicStats, share: float, flood_share: float, seed: int
) -> Mix:
    """The good messages, in order, with hostile ones making up ``share`` of all messages."""
    input_test, worker_test = _tests()
    now = time.time()  # per phase: "just over a day ahead" must still be over a day ahead
    everything = input_test.catalogue(now)
    cases = [c for c in everything if len(c.raw) <= KAFKA_MAX_BYTES]
    rng = random.Random(seed)
    validator = Validator()
    hostile = round(len(good) * share / (1 - share))
    flood = min(worker_test.FLOOD, round(hostile * flood_share))
    mix = Mix([], stats.events, stats.duplicates, hostile=hostile, flood=flood)
    mix.catalogue_size = len(everything)
    mix.unsendable = sorted(c.name for c in everything if len(c.raw) > KAFKA_MAX_BYTES)

    drawn: list[Record] = []
    copies: Counter[str] = Counter()
    while len(drawn) < hostile - flood:
        for case in rng.sample(cases, len(cases)):
            if len(drawn) == hostile - flood:
                break
            raw = case.raw
            if case.code is None:
                raw = fresh_copy(raw, copies[case.name], validator, now)
                mix.valid_ids.add(orjson.loads(raw)["event_id"])
                mix.valid_copies += 1
            else:
                as_stored = raw.decode("utf-8", errors="backslashreplace")
                mix.rejected[(as_stored, case.code)] += 1
            copies[case.name] += 1
            drawn.append((line_key(raw)[0], raw))
    mix.cases = copies

    burst = worker_test.flood(now - 3590)[:flood]
    for raw in burst:
        mix.valid_ids.add(orjson.loads(raw)["event_id"])
    mix.valid_copies += len(burst)

    # Catalogue messages at random places among the good ones, the flood in one piece mid-way.
    slots = set(rng.sample(range(len(good) + len(drawn)), len(drawn)))
    goods, bad = iter(good), iter(drawn)
    stream = [next(bad) if i in slots else next(goods) for i in range(len(good) + len(drawn))]
    middle = len(stream) // 2
    stream[middle:middle] = [(line_key(raw)[0], raw) for raw in burst]
    mix.messages = stream
    mix.hostile_bytes = sum(len(raw) for _, raw in drawn) + sum(len(raw) for raw in burst)
    return mix


# --- one phase ---------------------------------------------------------------------------


class MachineCpu:
    """The machine's busy CPU seconds (/proc/stat), sampled in a thread through the run.

    The machine may be shared: the CPU that neither the worker, Tansu,
    redis-server nor this process used in a timed window is other load, which
    says how far to trust that phase's figure.
    """

    EVERY_S = 0.25

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            own = sum(os.times()[:2])  # this process: its /metrics scrapes and this thread
            self.samples.append((time.time(), self.busy() - own))
            self._stop.wait(self.EVERY_S)

    def __enter__(self) -> MachineCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        """Busy CPU seconds of other processes between two wall-clock times (interpolated)."""

        def at(t: float) -> float:
            before = [s for s in self.samples if s[0] <= t]
            after = [s for s in self.samples if s[0] >= t]
            if not before or not after:
                return (before or after)[-1 if before else 0][1]
            (t0, b0), (t1, b1) = before[-1], after[0]
            return b0 if t1 == t0 else b0 + (b1 - b0) * (t - t0) / (t1 - t0)

        return at(end) - at(start) if self.samples else 0.0


@dataclass
class Check:
    what: str
    expected: Any
    found: Any
    ok: bool


@dataclass
class Phase:
    name: str
    round: int
    messages: int
    good: int
    hostile: int
    message_bytes: int
    preload_s: float
    seconds: float  # first batch → last message counted on /metrics
    batch_span_s: float  # first → last batch stamped in ClickHouse
    outcomes: dict[str, float]
    rejected_by_reason: dict[str, float]
    late_events: float
    worker_cpu_s: float
    # cores busy with anything but the worker, Tansu, redis-server and this process meanwhile
    other_cores_busy: float
    batch_split_s: dict[str, float]
    redis: dict[str, Any]
    clickhouse: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def good_per_s(self) -> float:
        return self.good / self.seconds if self.seconds > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def good_per_s_batch_span(self) -> float:
        return self.good / self.batch_span_s if self.batch_span_s > 0 else 0.0

    @property
    def cpu_us_per_good(self) -> float:
        return self.worker_cpu_s / self.good * 1e6 if self.good else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "good_per_s": self.good_per_s,
            "messages_per_s": self.messages_per_s,
            "good_per_s_batch_span": self.good_per_s_batch_span,
            "cpu_us_per_good": self.cpu_us_per_good,
        }


def fresh_redis(url: str) -> int:
    """Empty Redis, AOF rewritten (no rewrite due mid-phase), stats reset; used_memory now."""
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        client.bgrewriteaof()
        deadline = time.monotonic() + 60
        while int(client.info("persistence")["aof_rewrite_in_progress"]) or int(
            client.info("persistence")["aof_rewrite_scheduled"]
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not finish its AOF rewrite in 60 s")
            time.sleep(0.1)
        client.config_resetstat()
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def stored(chdb_dir: Path, valid_ids: set[str]) -> dict[str, Any]:
    """What ClickHouse holds, read after the worker stopped (chDB: one process per directory)."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}")
    try:
        spans = []
        for table in ("events", "rejected_events"):
            n, first, last = client.query(
                "SELECT count(), toUnixTimestamp64Milli(min(received_at)), "
                f"toUnixTimestamp64Milli(max(received_at)) FROM journey.{table}"
            ).result_rows[0]
            if n:
                spans.append((first / 1000, last / 1000))
        event_rows = client.query("SELECT count() FROM journey.events FINAL").result_rows[0][0]
        rejected = Counter(
            (str(raw), str(code))
            for raw, code in client.query(
                "SELECT raw, code FROM journey.rejected_events FINAL"
            ).result_rows
        )
        found = {
            str(row[0])
            for row in client.query(
                "SELECT event_id FROM journey.events FINAL WHERE event_id IN {ids:Array(String)}",
                parameters={"ids": sorted(valid_ids)},
            ).result_rows
        }
        transitions = client.query("SELECT count() FROM journey.transitions").result_rows[0][0]
    finally:
        client.close()
    return {
        "first_batch_at": min((s[0] for s in spans), default=0.0),
        "last_batch_at": max((s[1] for s in spans), default=0.0),
        "event_rows": int(event_rows),
        "transition_rows": int(transitions),
        "rejected": rejected,
        "valid_ids_found": found,
    }


def dead_letters(kafka_url: str, expected: int) -> Counter[tuple[str, str]]:
    """(raw, code) of every record on the dead-letter topic (read from its start)."""
    if expected == 0:
        return Counter()
    from tests.integration.workers import consume_all

    return Counter(
        (doc["raw"], doc["code"])
        for doc in (orjson.loads(v) for v in consume_all(kafka_url, REJECTED_TOPIC, expected))
    )


def run_phase(
    name: str,
    round_: int,
    mix: Mix,
    redis_service: Service,
    partitions: int,
    work: Path,
    machine: MachineCpu,
) -> Phase:
    work.mkdir(parents=True)
    kafka = start_kafka(log_dir=work)
    try:
        create_topics(
            kafka.url, {EVENTS_TOPIC: partitions, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: partitions}
        )
        with console.status(f"{name}: pre-loading {len(mix.messages):,} messages…"):
            started = time.perf_counter()
            sent = asyncio.run(produce_batches(kafka.url, EVENTS_TOPIC, mix.messages))
            preload_s = time.perf_counter() - started
        assert sent == len(mix.messages), (sent, len(mix.messages))
        used_before = fresh_redis(redis_service.url)
        console.print(
            f"{name}: {sent:,} messages pre-loaded in {preload_s:.0f}s; "
            "the worker joins its group (15–35 s), then reads them all"
        )
        run = worker(kafka, redis_service, sent, work, False, 0.0, used_before)
        expected = mix.expected()
        dlq = dead_letters(kafka.url, expected["rejected"])
    finally:
        kafka.stop()
    with console.status(f"{name}: reading ClickHouse…"):
        ch = stored(work / "chdb", mix.valid_ids)
    samples: Samples = run.samples
    phase = Phase(
        name=name,
        round=round_,
        messages=sent,
        good=mix.good,
        hostile=len(mix.messages) - mix.good,
        message_bytes=sum(len(v) for _, v in mix.messages),
        preload_s=preload_s,
        seconds=run.done_at - ch["first_batch_at"],
        batch_span_s=ch["last_batch_at"] - ch["first_batch_at"],
        outcomes={
            o: total(samples, "journey_events_total", outcome=o)
            for o in ("accepted", "duplicate", "rejected")
        },
        rejected_by_reason={
            labels["reason"]: value
            for labels, value in samples.get("journey_rejected_events_total", [])
        },
        late_events=total(samples, "journey_late_events_total"),
        worker_cpu_s=run.cpu["worker"],
        other_cores_busy=(
            machine.between(run.done_at - run.cpu["window_s"], run.done_at)
            - sum(run.cpu[part] for part in ("worker", "tansu", "redis"))
        )
        / run.cpu["window_s"]
        if run.cpu["window_s"] > 0
        else 0.0,
        batch_split_s={
            step: total(samples, "journey_batch_duration_seconds_sum", step=step)
            for step in ("decode", "redis", "clickhouse", "total")
        },
        redis={k: run.redis[k] for k in ("profiles_held", "used_memory_delta", "keys")},
        clickhouse={k: ch[k] for k in ("event_rows", "transition_rows")},
    )
    phase.checks = checks(mix, phase, samples, ch, dlq)
    return phase


def checks(
    mix: Mix,
    phase: Phase,
    samples: Samples,
    ch: dict[str, Any],
    dlq: Counter[tuple[str, str]],
) -> list[Check]:
    """Every message where it belongs: counted, stored, dead-lettered, by kind and by code."""
    expected = mix.expected()
    out = [
        Check(
            f"/metrics: {outcome} messages",
            expected[outcome],
            phase.outcomes[outcome],
            phase.outcomes[outcome] == expected[outcome],
        )
        for outcome in ("accepted", "duplicate", "rejected")
    ]
    out.append(
        Check(
            "ClickHouse: rows in journey.events (FINAL)",
            expected["accepted"],
            ch["event_rows"],
            ch["event_rows"] == expected["accepted"],
        )
    )
    codes = mix.by_code
    stored_codes: Counter[str] = Counter()
    for (_, code), n in ch["rejected"].items():
        stored_codes[code] += n
    dlq_codes: Counter[str] = Counter()
    for (_, code), n in dlq.items():
        dlq_codes[code] += n
    for code in sorted(set(codes) | set(stored_codes) | set(phase.rejected_by_reason)):
        found = {
            "metrics": phase.rejected_by_reason.get(code, 0.0),
            "clickhouse": stored_codes[code],
            "dead_letter_topic": dlq_codes[code],
        }
        out.append(
            Check(
                f"rejected as {code}",
                codes[code],
                found,
                all(v == codes[code] for v in found.values()),
            )
        )
    matched = sum((ch["rejected"] & mix.rejected).values())
    out.append(
        Check(
            "ClickHouse rejected_events: each raw payload verbatim with its code",
            sum(mix.rejected.values()),
            matched,
            ch["rejected"] == mix.rejected,
        )
    )
    out.append(
        Check(
            "dead-letter topic: each raw payload verbatim with its code",
            sum(mix.rejected.values()),
            sum((dlq & mix.rejected).values()),
            dlq == mix.rejected,
        )
    )
    if mix.valid_ids:
        flood_ids = {i for i in mix.valid_ids if i.startswith("flood-")}
        found_ids: set[str] = ch["valid_ids_found"]
        out.append(
            Check(
                "ClickHouse journey.events: each valid hostile event id (catalogue)",
                len(mix.valid_ids - flood_ids),
                len(found_ids - flood_ids),
                found_ids - flood_ids == mix.valid_ids - flood_ids,
            )
        )
        out.append(
            Check(
                "ClickHouse journey.events: each event of the one-customer flood",
                len(flood_ids),
                len(found_ids & flood_ids),
                found_ids & flood_ids == flood_ids,
            )
        )
    return out


# --- the run -----------------------------------------------------------------------------


def ratio(b: float, a: float) -> float:
    return b / a if a > 0 else 0.0


def hostile_cost(good: Phase, bad: Phase) -> float:
    """One hostile message's time in good events' time: (b) − (a) over the hostile count."""
    if not bad.hostile or good.seconds <= 0:
        return 0.0
    per_good = good.seconds / good.good
    return (bad.seconds - good.seconds) / per_good / bad.hostile


def hostile_cpu_cost(good: Phase, bad: Phase) -> float:
    """The same in the worker's CPU: steadier than wall time when other load comes and goes."""
    if not bad.hostile or good.cpu_us_per_good <= 0:
        return 0.0
    return (bad.cpu_us_per_good / good.cpu_us_per_good - 1) * bad.good / bad.hostile


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="good simulator events")
    parser.add_argument(
        "--hostile-share", type=float, default=0.10, help="hostile share of all messages in (b)"
    )
    parser.add_argument(
        "--flood-share", type=float, default=0.25, help="share of the hostile messages that flood"
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of journey.events")
    parser.add_argument("--seed", type=int, default=1, help="simulator and mix seed")
    parser.add_argument(
        "--rounds", type=int, default=1, help="(a)+(b) pairs; even rounds run (b) first"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs' temporary directory")
    args = parser.parse_args(argv)
    if not 0 < args.hostile_share < 1:
        parser.error("--hostile-share must be between 0 and 1")
    if args.rounds < 1 or args.events < 1:
        parser.error("--rounds and --events must be at least 1")
    command = COMMAND + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")

    with console.status(f"generating {args.events:,} simulator events…"):
        stats = TopicStats()
        good: list[Record] = list(records(args.events, args.seed, stats))
    sample = mixed(good, stats, args.hostile_share, args.flood_share, args.seed)
    console.print(
        f"good: {stats.events:,} events ({stats.bytes / stats.events:.0f} bytes each, "
        f"{stats.duplicates:,} resent duplicates); hostile: {sample.hostile:,} messages "
        f"({sample.hostile_bytes / max(sample.hostile, 1):,.0f} bytes each on average), "
        f"{sum(sample.cases.values()):,} from {len(sample.cases)} of the catalogue's "
        f"{sample.catalogue_size} cases and a flood of {sample.flood:,} events of one customer"
    )
    if sample.unsendable:
        console.print(
            f"not sent (over {KAFKA_MAX_BYTES:,} bytes, more than a Kafka record carries): "
            + ", ".join(sample.unsendable)
        )

    work = Path(tempfile.mkdtemp(prefix="hostile-mix-"))
    phases: list[Phase] = []
    mixes: list[Mix] = []
    redis_service: Service | None = None
    try:
        redis_service = start_redis(data_dir=work / "redis", appendonly=True)
        with MachineCpu() as machine:
            for round_ in range(1, args.rounds + 1):
                order = (GOOD, MIXED) if round_ % 2 else (MIXED, GOOD)
                for name in order:
                    if name == GOOD:
                        mix = good_only(good, stats)
                    else:
                        mix = mixed(good, stats, args.hostile_share, args.flood_share, args.seed)
                        mixes.append(mix)
                    slug = "good" if name == GOOD else "mixed"
                    phase = run_phase(
                        name,
                        round_,
                        mix,
                        redis_service,
                        args.partitions,
                        work / f"{round_}-{slug}",
                        machine,
                    )
                    phases.append(phase)
                    console.print(
                        f"{name} (round {round_}): {phase.good_per_s:,.0f} good events/s "
                        f"({phase.messages_per_s:,.0f} messages/s) over {phase.seconds:.1f}s; "
                        f"other load {phase.other_cores_busy:.2f} cores"
                    )
    finally:
        if redis_service is not None:
            redis_service.stop()
        if args.keep:
            console.print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    report(args, command, stats, phases, mixes)


def report(
    args: argparse.Namespace,
    command: str,
    stats: TopicStats,
    phases: list[Phase],
    mixes: list[Mix],
) -> None:
    pairs = [
        (
            next(p for p in phases if p.round == r and p.name == GOOD),
            next(p for p in phases if p.round == r and p.name == MIXED),
        )
        for r in range(1, args.rounds + 1)
    ]
    ratios = {
        "good_per_s": [ratio(b.good_per_s, a.good_per_s) for a, b in pairs],
        "good_per_s_batch_span": [
            ratio(b.good_per_s_batch_span, a.good_per_s_batch_span) for a, b in pairs
        ],
        "messages_per_s": [ratio(b.messages_per_s, a.messages_per_s) for a, b in pairs],
        # measured from the first count on /metrics: 0 when a tiny run is done by then
        "cpu_us_per_good": [ratio(b.cpu_us_per_good, a.cpu_us_per_good) for a, b in pairs],
        "hostile_cost_in_good_events": [hostile_cost(a, b) for a, b in pairs],
        "hostile_cpu_cost_in_good_events": [hostile_cpu_cost(a, b) for a, b in pairs],
    }
    summary = {name: statistics.mean(values) for name, values in ratios.items()}
    same_cost = stats.events / pairs[0][1].messages

    table = Table(
        title=f"{stats.events:,} good events, {args.hostile_share:.0%} hostile messages in (b), "
        f"{args.partitions} partitions, Tansu + redis-server + chDB ({os.cpu_count()} cores)"
    )
    columns = (
        "phase",
        "hostile",
        "seconds",
        "good/s",
        "msgs/s",
        "good/s*",
        "CPU µs/good",
        "accepted",
        "duplicate",
        "rejected",
        "late",
        "other load",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for p in phases:
        table.add_row(
            p.name if args.rounds == 1 else f"{p.name} ({p.round})",
            f"{p.hostile:,}",
            f"{p.seconds:.1f}",
            f"{p.good_per_s:,.0f}",
            f"{p.messages_per_s:,.0f}",
            f"{p.good_per_s_batch_span:,.0f}",
            f"{p.cpu_us_per_good:,.0f}",
            *(f"{p.outcomes[o]:,.0f}" for o in ("accepted", "duplicate", "rejected")),
            f"{p.late_events:,.0f}",
            f"{p.other_cores_busy:.2f}",
        )
    table.caption = (
        "seconds: first batch → last message counted on /metrics; * over the first-to-last "
        "batch span stamped in ClickHouse; CPU: the worker's, from its first count on /metrics; "
        "other load: cores busy with other processes meanwhile"
    )
    console.print(table)
    for p in phases:
        console.print(
            f"{p.name} batch time per message: "
            + ", ".join(
                f"{step} {seconds / p.messages * 1e6:.0f} µs"
                for step, seconds in p.batch_split_s.items()
            )
        )
    console.print(
        f"good events/s, (b)/(a): {summary['good_per_s']:.3f} "
        f"(rounds: {', '.join(f'{v:.3f}' for v in ratios['good_per_s'])}); "
        f"over ClickHouse's batch span {summary['good_per_s_batch_span']:.3f}; "
        f"{same_cost:.3f} if a hostile message cost what a good one costs"
    )
    console.print(
        f"messages/s (b)/(a): {summary['messages_per_s']:.3f}; one hostile message takes the "
        f"time of {summary['hostile_cost_in_good_events']:.2f} good events"
    )
    console.print(
        f"worker CPU per good event (b)/(a): {summary['cpu_us_per_good']:.3f} "
        f"({1 / same_cost:.3f} if a hostile message cost what a good one costs); one hostile "
        f"message takes the worker CPU of {summary['hostile_cpu_cost_in_good_events']:.2f} "
        "good events"
    )

    bad = next(p for p in reversed(phases) if p.name == MIXED)
    landing = Table(title=f"where the messages of (b) landed (round {bad.round})")
    for column in ("check", "expected", "found", "ok"):
        landing.add_column(column, justify="left" if column == "check" else "right")
    for c in bad.checks:
        found = (
            " / ".join(f"{v:,.0f}" for v in c.found.values())
            if isinstance(c.found, dict)
            else f"{c.found:,.0f}"
        )
        landing.add_row(c.what, f"{c.expected:,}", found, "yes" if c.ok else "[red]NO[/red]")
    landing.caption = "rejected as <code>: /metrics / ClickHouse table / dead-letter topic"
    console.print(landing)
    loaded = [p for p in phases if p.other_cores_busy > OTHER_LOAD_WARNING]
    if loaded:
        console.print(
            "[yellow]other processes kept "
            + ", ".join(f"{p.other_cores_busy:.2f} cores busy in {p.name}" for p in loaded)
            + f" (of {os.cpu_count()}): read that ratio with care, or run again on a quiet "
            "machine[/yellow]"
        )
    failed = [(p.name, p.round, c) for p in phases for c in p.checks if not c.ok]
    for name, round_, c in failed:
        console.print(
            f"[red]check failed[/red] in {name} (round {round_}): {c.what}: "
            f"expected {c.expected}, found {c.found}"
        )
    if not failed:
        console.print(f"every check passed in all {len(phases)} phases")

    last = mixes[-1]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": command,
                "args": vars(args),
                "cores": os.cpu_count(),
                "good": asdict(stats),
                "hostile": {
                    "messages": last.hostile,
                    "bytes": last.hostile_bytes,
                    "flood": last.flood,
                    "catalogue_cases": last.catalogue_size,
                    "cases_sent": len(last.cases),
                    "cases_not_sendable_through_kafka": last.unsendable,
                    "copies_per_case": dict(sorted(last.cases.items())),
                    "rejected_by_code": dict(sorted(last.by_code.items())),
                    "valid_distinct_ids": len(last.valid_ids),
                    "valid_messages": last.valid_copies,
                    "expected_outcomes": last.expected(),
                },
                "phases": [p.to_json() for p in phases],
                "ratios_b_over_a": {"mean": summary, "rounds": ratios},
                "ratio_if_hostile_cost_as_good": same_cost,
                "checks_passed": not failed,
            },
            indent=2,
            default=str,
        )
    )
    console.print(f"written to {RESULTS.relative_to(ROOT)}")
    console.print(f"reproduce: {command}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
