"""Throughput of the worker against a plain consumer, a Quix Streams peer and a naive Faust agent.

Reproduce (from the project root):

    .venv/bin/pip install -e '.[dev,bench]'            # quixstreams (the peer), py-spy
    .venv/bin/python bench/throughput.py               # 1,000,000 events, 4 partitions
    .venv/bin/python bench/throughput.py --events 100000          # a quick run
    .venv/bin/python bench/throughput.py --events 200000 --profile  # + py-spy of the worker
    .venv/bin/python bench/throughput.py --events 200000 --workers 2 --skip peer --skip naive

One run starts Tansu, redis-server (AOF on, as in production), ClickHouse's
HTTP interface over chDB in a process of its own (bench/clickhouse_http.py: no
ClickHouse server binary is available here; ``--clickhouse chdb`` puts chDB
inside the worker instead, as `journey up` does) and, in turn, each contender
on this machine; nothing else of the project runs meanwhile.
It pre-loads ``journey.events`` with ``--events`` simulator events (the
generator of `journey simulate`: every channel, identity stitching, ~1%
resent duplicates, ~3% unmapped types), packed as `journey send` and
`journey simulate` pack them: envelopes of up to ``--envelope`` events (100),
each partition's events in order (``--envelope 1``: one event per message,
as a simple producer sends them; its results go to throughput_single.json).
Then each contender reads that same content from the beginning, one after
the other:

- ceiling: a plain aiokafka consumer, every partition assigned, ``getmany``
  and ``orjson.loads`` per message (an envelope's events are parsed with it),
  nothing else (run first and last: the better
  of the two is the ceiling, the gap between them is the machine's noise);
- peer: the default journey's stage assignment on Quix Streams with RocksDB
  state per customer; with envelopes it opens them and re-keys each event by
  customer (``group_by``), Quix's way to keep state per customer
  (bench/throughput_apps.py says what it does and skips);
- worker: ``journey worker`` as a child process (``--workers N``: N of them in
  one consumer group, started together), end to end: from the
  start of its first batch (the earliest ``received_at`` in ClickHouse) until
  ``journey_events_total`` on /metrics (read from Redis at the scrape) reaches
  the topic's event count and ``journey_written_lag_seconds`` has counted
  every accepted event (observed once its rows' insert returned): the moment
  the last event is in Redis, the metrics and ClickHouse. Cross-checked
  independently: events in the topic and rows in ClickHouse, over the wall
  time between the first and the last batch stamped in ClickHouse;
- baseline: a Faust agent doing one awaited Redis call and one ClickHouse insert
  per event (an envelope's events one by one), on a sample (``--naive-events``
  or ``--naive-seconds``).

Group joins (15–35 s on Tansu) come before each contender's first event and
are not timed. Each timed figure is events / seconds from its first event to
its last. It also reports the cost of state after the worker's run (Redis
bytes per profile and per customer held, ClickHouse bytes per stored event
from ``system.parts``), the CPU seconds per event of the worker, Tansu and
redis-server, and the worker's own split of a batch (decode, Redis,
ClickHouse). ``--profile`` samples the worker with py-spy and sums where its
time goes per event.

Everything shares 2 cores, so read the ratios more than the absolute figures.
Results are printed and written to bench/results/throughput.json (and
throughput_profile.txt with ``--profile``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clickhouse_http
from pipeline.embedded import Service, create_topics, free_port, start_kafka, start_redis
from pipeline.envelope import DEFAULT_ENVELOPE_EVENTS, Outgoing, Packer
from pipeline.producer import bootstrap_servers, produce_batches
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from pipeline.simulate import generate, key_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "throughput.json"
# --envelope 1: the same run on one event per message, kept beside the default's.
RESULTS_SINGLE = ROOT / "bench" / "results" / "throughput_single.json"
PROFILE_OUT = ROOT / "bench" / "results" / "throughput_profile.txt"
APPS = Path(__file__).resolve().parent / "throughput_apps.py"
# `journey worker` with the consumer's fetch wait Tansu needs (see that file).
TANSU_WORKER = Path(__file__).resolve().parent / "tansu_worker.py"
# The fetch waits compared by fetch_hold(): Faust's, and the one the worker runs with here.
FAUST_FETCH_WAIT_MS = 1500
TANSU_FETCH_WAIT_MS = 100
COMMAND = ".venv/bin/python bench/throughput.py"
console = Console(width=120)

# A group join on Tansu takes 15–35 s; a child that has not started processing
# after this long is stuck, not slow.
JOIN_TIMEOUT_S = 180.0
# py-spy samples per second: enough for a per-event split over a run of tens of seconds.
PROFILE_RATE = 100
# How often the run polls the worker's /metrics: each scrape costs the worker CPU, and
# half a second is under 1% of a run of a minute or more.
SCRAPE_EVERY_S = 0.5
# Latency traffic: the longest an event waits for its envelope to fill, as the
# producers' default linger (pipeline.producer.produce_batches).
LINGER_S = 0.02


@dataclass
class Contender:
    name: str
    events: int
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TopicStats:
    events: int = 0
    bytes: int = 0
    keys: int = 0
    duplicates: int = 0
    event_time_span_s: float = 0.0


# --- the input ---------------------------------------------------------------------------


def records(count: int, seed: int, stats: TopicStats) -> Iterator[tuple[bytes, bytes]]:
    """Simulator events over the hour before now, keyed as `journey simulate` keys them."""
    rng = random.Random(seed)
    start = time.time() - 3600
    keys: set[str] = set()
    ids: set[str] = set()
    first_ts = last_ts = ""
    for event in generate(rng, start, rate=max(1.0, count / 3600), duration=None):
        key = key_of(event)
        value = orjson.dumps(event)
        keys.add(key)
        if event["event_id"] in ids:
            stats.duplicates += 1
        ids.add(event["event_id"])
        first_ts = first_ts or event["occurred_at"]
        last_ts = event["occurred_at"]
        stats.events += 1
        stats.bytes += len(value)
        yield key.encode(), value
        if stats.events == count:
            break
    stats.keys = len(keys)
    stats.event_time_span_s = _parse_ts(last_ts) - _parse_ts(first_ts)


def _parse_ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- small pure helpers ------------------------------------------------------------------


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text → sample name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def total(
    samples: Mapping[str, list[tuple[dict[str, str], float]]], name: str, **match: str
) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


# Which part of the worker a sampled stack belongs to: the innermost frame whose file
# matches one of these wins; generic frames (asyncio, threading, stdlib) are skipped, and
# so are mode's entry points, under which the whole event loop runs.
PROFILE_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ClickHouse insert (clickhouse-connect + chDB)", ("clickhouse_connect/", "chdb/")),
    ("Redis client (redis-py)", ("redis/",)),
    ("validation (orjson + fastjsonschema + Event)", ("pipeline/events.py", "fastjsonschema")),
    ("stage engine + identity (pure)", ("pipeline/stages.py", "pipeline/engine.py")),
    ("stage engine + identity (pure)", ("pipeline/identity.py", "pipeline/journeys.py")),
    ("Redis store adapter (plan, JSON)", ("pipeline/state/",)),
    ("ClickHouse rows (event_row…)", ("pipeline/sinks/",)),
    ("processor (outbox, grouping, metrics calls)", ("pipeline/processor.py",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("transitions out (Faust send + aiokafka producer)", ("faust/topics.py", "aiokafka/producer/")),
    ("Faust / mode (stream, take_events, acks)", ("faust/", "mode/")),
    ("aiokafka consumer (fetch, records)", ("aiokafka/",)),
    ("web server (aiohttp: /metrics scrapes)", ("aiohttp/",)),
    ("worker agent and timers (pipeline/worker.py)", ("pipeline/worker.py",)),
)
OTHER_PART = "event loop and stdlib (asyncio, selectors, threads)"
# Frames every stack of a thread starts with: they own no time of their own.
ENTRY_POINTS = ("mode/worker.py", "mode/threads.py", "run_worker (pipeline/worker.py")


def profile_part(stack: Sequence[str]) -> str:
    """The part of the worker that a py-spy stack (root first) is spending time in."""
    for frame in reversed(stack):
        if any(entry in frame for entry in ENTRY_POINTS):
            continue
        for part, needles in PROFILE_PARTS:
            if any(needle in frame for needle in needles):
                return part
    return OTHER_PART


def summarise_profile(raw: str) -> Counter[str]:
    """py-spy's raw (collapsed) output → samples per part of the worker."""
    parts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts[profile_part(stack.split(";"))] += int(count)
    return parts


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus's histogram_quantile: ``buckets`` are (le, cumulative count), sorted by le.

    Linear inside the bucket that holds the q-th observation; a quantile that
    falls in the +Inf bucket is reported as the largest finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return 0.0
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def quantile(values: Sequence[float], q: float) -> float:
    """The q-th quantile of ``values`` (nearest rank), 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- contenders --------------------------------------------------------------------------


async def ceiling(kafka_url: str, partitions: int, events: int) -> Contender:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(kafka_url), enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(EVENTS_TOPIC, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        count = 0
        messages_read = 0
        first = 0.0
        deadline = time.monotonic() + 60
        while count < events:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the plain consumer read {count} of {events} events")
                continue
            if count == 0:
                first = time.perf_counter()
            for messages in batches.values():
                for message in messages:
                    doc = orjson.loads(message.value)
                    # An envelope counts its events; reading them is the parse above.
                    count += len(doc["events"]) if "envelope" in doc else 1
                messages_read += len(messages)
            deadline = time.monotonic() + 60
        return Contender(
            "aiokafka getmany + orjson.loads",
            count,
            time.perf_counter() - first,
            extra={"messages": messages_read},
        )
    finally:
        await consumer.stop()


def _child(args: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=log.parent,
        )


def _stop(child: Any, timeout: float = 20) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""


def wait_result(child: Any, result: Path, log: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not result.exists():
        if child.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {child.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.stem} gave no result within {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.2)
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def peer(kafka: Service, events: int, work: Path, envelopes: bool = False) -> Contender:
    result = work / "peer.json"
    log = work / "quix-peer.log"
    child = _child(
        [
            *(sys.executable, str(APPS), "peer", "--kafka", kafka.url, "--events", str(events)),
            *("--result", str(result), "--state-dir", str(work / "quix-state")),
            *(["--envelopes"] if envelopes else []),
        ],
        log,
    )
    try:
        data = wait_result(child, result, log, JOIN_TIMEOUT_S + events / 1000)
        cpu = cpu_seconds(child.pid)
    finally:
        _stop(child)
    return Contender(
        "Quix Streams 3.28 + RocksDB state, same engine",
        data["events"],
        data["seconds"],
        "validate + apply_event per customer key; no stitching, dedupe or sinks"
        + ("; envelopes opened and re-keyed by customer (group_by)" if envelopes else ""),
        {
            "accepted": data["accepted"],
            "transitions": data["transitions"],
            "process_cpu_s": cpu,
        },
    )


def naive(
    kafka: Service, redis_service: Service, events: int, seconds: float, work: Path
) -> Contender:
    result = work / "naive.json"
    log = work / "faust-naive.log"
    child = _child(
        [
            *(sys.executable, str(APPS), "naive", "--kafka", kafka.url),
            *("--redis", redis_service.url, "--chdb", str(work / "naive-chdb")),
            *("--events", str(events), "--seconds", str(seconds), "--result", str(result)),
        ],
        log,
    )
    try:
        data = wait_result(child, result, log, JOIN_TIMEOUT_S + seconds + 60)
    finally:
        _stop(child)
    return Contender(
        "Faust agent, 1 Redis call + 1 insert per event",
        data["events"],
        data["seconds"],
        f"a sample: {data['events']:,} events",
        {"accepted": data["accepted"]},
    )


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return metric_samples(resp.read().decode())
    except OSError:
        return {}


@dataclass
class WorkerRun:
    contender: Contender
    done_at: float
    samples: dict[str, list[tuple[dict[str, str], float]]]
    cpu: dict[str, float]
    profile: Counter[str] | None
    redis: dict[str, Any]
    latency: dict[str, Any] | None


def scrape_all(ports: Sequence[int]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every worker's /metrics as one: per-process series summed over the workers.

    ``journey_events_total`` is read from Redis by each worker at its scrape (one
    total for the whole group), so it is taken from the first worker alone.
    """
    scraped = [scrape(port) for port in ports]
    merged: dict[str, list[tuple[dict[str, str], float]]] = {}
    for samples in scraped:
        for name, values in samples.items():
            merged.setdefault(name, []).extend(values)
    merged["journey_events_total"] = scraped[0].get("journey_events_total", [])
    return merged


def worker(
    kafka: Service,
    redis_service: Service,
    events: int,
    work: Path,
    profile: bool,
    latency_seconds: float,
    redis_used_before: int,
    envelope: int = 1,
    clickhouse: Service | None = None,
    workers: int = 1,
) -> WorkerRun:
    """``clickhouse``: the HTTP endpoint the worker inserts into; None: chDB in the worker.

    ``workers`` above 1 starts that many worker processes at once, one consumer
    group sharing the partitions (they need ``clickhouse``: chDB admits one process).
    """
    if workers > 1 and clickhouse is None:
        raise ValueError("several workers need ClickHouse over HTTP (--clickhouse http)")
    settings = [
        Settings(
            kafka_url=kafka.url,
            redis_url=redis_service.url,
            clickhouse_dsn=clickhouse.url if clickhouse is not None else f"chdb://{work / 'chdb'}",
            web_port=free_port(),
        )
        for _ in range(workers)
    ]
    ports = [s.web_port for s in settings]
    logs = [work / ("worker.log" if n == 0 else f"worker-{n + 1}.log") for n in range(workers)]
    children = [
        _child(
            [
                *(sys.executable, str(TANSU_WORKER)),
                *("--fetch-max-wait-ms", str(TANSU_FETCH_WAIT_MS), "--loglevel", "warning"),
            ],
            log,
            {**os.environ, **s.to_env()},
        )
        for s, log in zip(settings, logs, strict=True)
    ]
    spy: Any = None
    pids = {"tansu": kafka.process.pid, "redis": redis_service.process.pid}
    if clickhouse is not None:
        pids["clickhouse"] = clickhouse.process.pid

    def check_alive() -> None:
        for child, log in zip(children, logs, strict=True):
            if child.poll() is not None:
                raise RuntimeError(f"a worker exited with {child.returncode}:\n{_tail(log)}")

    def cpu_now() -> dict[str, float]:
        used = {name: cpu_seconds(pid) for name, pid in pids.items()}
        used["worker"] = sum(cpu_seconds(c.pid) for c in children)
        return used

    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while total(scrape(ports[0]), "journey_events_total") <= 0:
            check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers processed nothing in {JOIN_TIMEOUT_S:.0f}s")
            time.sleep(0.1)
        moving_at = time.time()
        cpu_before = cpu_now()
        if profile:
            spy = _child(
                [
                    *(_py_spy(), "record", "--pid", str(children[0].pid), "--format", "raw"),
                    *("--rate", str(PROFILE_RATE), "--nonblocking", "--threads"),
                    *("--output", str(work / "worker.pyspy")),
                ],
                work / "py-spy.log",
            )
        deadline = time.monotonic() + JOIN_TIMEOUT_S + events / 500
        while True:
            samples = scrape_all(ports)
            if total(samples, "journey_events_total") >= events and written(samples):
                break
            check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the workers counted {total(samples, 'journey_events_total'):.0f} of {events}"
                )
            time.sleep(SCRAPE_EVERY_S)
        done_at = time.time()
        cpu_after = cpu_now()
        cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
        cpu["window_s"] = done_at - moving_at
        parts = None
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            raw = (work / "worker.pyspy").read_text()
            parts = summarise_profile(raw)
        with console.status("reading Redis…"):
            state = redis_facts(redis_service.url, redis_used_before)
        latency = None
        if latency_seconds > 0 and workers == 1:
            rate = events / max(done_at - moving_at, 1e-9) / 2
            with console.status(f"latency: {rate:,.0f} events/s for {latency_seconds:.0f}s…"):
                latency = asyncio.run(
                    steady(
                        kafka.url,
                        redis_service.url,
                        ports[0],
                        rate,
                        latency_seconds,
                        envelope,
                    )
                )
            with console.status("latency: the broker's fetch hold…"):
                latency["fetch_hold_ms"] = {
                    str(wait): asyncio.run(fetch_hold(kafka.url, wait))
                    for wait in (FAUST_FETCH_WAIT_MS, TANSU_FETCH_WAIT_MS)
                }
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        for child in children:
            _stop(child, 60)
    name = "journey worker (validate, Redis, ClickHouse, metrics)"
    if workers > 1:
        name = f"{workers} × journey worker (validate, Redis, ClickHouse, metrics)"
    contender = Contender(name, events, 0.0)
    return WorkerRun(contender, done_at, samples, cpu, parts, state, latency)


def written(samples: Mapping[str, list[tuple[dict[str, str], float]]]) -> bool:
    """Every accepted event's rows are in ClickHouse (and its transitions on Kafka)."""
    accepted = total(samples, "journey_events_total", outcome="accepted")
    return total(samples, "journey_written_lag_seconds_count") >= accepted


def lag_buckets(
    samples: Mapping[str, list[tuple[dict[str, str], float]]],
    name: str = "journey_event_lag_seconds",
) -> list[list[float]]:
    buckets = [[float(labels["le"]), value] for labels, value in samples.get(f"{name}_bucket", [])]
    return sorted(buckets)


def lag_quantiles(
    before: Mapping[str, list[tuple[dict[str, str], float]]],
    after: Mapping[str, list[tuple[dict[str, str], float]]],
    name: str,
) -> tuple[dict[str, float], list[list[Any]]]:
    """p50/p95/p99 in ms of a lag histogram's observations between two scrapes."""
    old = dict((le, n) for le, n in lag_buckets(before, name))
    delta = [(le, n - old.get(le, 0.0)) for le, n in lag_buckets(after, name)]
    ms = {f"p{q}": histogram_quantile(delta, q / 100) * 1000 for q in (50, 95, 99)}
    return ms, [["+Inf" if le == float("inf") else le, n] for le, n in delta]


async def steady(
    kafka_url: str, redis_url: str, web_port: int, rate: float, seconds: float, envelope: int = 1
) -> dict[str, Any]:
    """Live traffic at ``rate``, event time = send time; how soon each event is visible.

    Events are packed as `journey simulate` packs them (up to ``envelope`` per
    message, none waiting more than LINGER_S), so the figures include that wait.

    - Redis: every 10th event's duplicate mark (``jt:e:<event_id>``), written by
      the same Lua call as the customer's profile, polled every 20 ms;
    - /metrics: the worker's ``journey_event_lag_seconds`` over this phase (event
      time → committed with its ledger counts, which a scrape reads from Redis);
    - ClickHouse: ``journey_written_lag_seconds`` (event time → its rows inserted,
      observed once the insert returned: queryable from then on).
    """
    import redis.asyncio as aioredis

    from pipeline.producer import start_producer
    from pipeline.simulate import format_time

    before = await asyncio.to_thread(scrape, web_port)
    counted_before = total(before, "journey_events_total")
    producer = await start_producer(kafka_url, linger_ms=5)
    partitions = len(await producer.partitions_for(EVENTS_TOPIC))
    packer = Packer(partitions, envelope)
    client = aioredis.Redis.from_url(redis_url)
    rng = random.Random(99)
    source = generate(rng, time.time(), rate=rate, duration=None)
    ids: set[str] = set()
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    pending: list[Any] = []
    sent = 0
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set() or len(seen_at) < len(sent_at):
            waiting = [i for i in sent_at if i not in seen_at]
            if waiting:
                async with client.pipeline(transaction=False) as pipe:
                    for event_id in waiting:
                        pipe.exists(f"jt:e:{event_id}")
                    found = await pipe.execute()
                now = time.time()
                for event_id, there in zip(waiting, found, strict=True):
                    if there:
                        seen_at[event_id] = now
            if stop.is_set() and time.time() > stop_at + 60:
                break
            await asyncio.sleep(0.02)

    async def send(out: Outgoing) -> Any:
        return await producer.send(EVENTS_TOPIC, out.value, key=out.key, partition=out.partition)

    stop_at = time.time() + seconds
    poller = asyncio.create_task(poll())
    try:
        started = time.time()
        while time.time() < stop_at:
            due = int((time.time() - started) * rate)
            while sent < due:
                event = next(source)
                now = time.time()
                event["occurred_at"] = format_time(now)
                key, value = key_of(event).encode(), orjson.dumps(event)
                for out in packer.add(key, value, now):
                    pending.append(await send(out))
                if sent % 10 == 0 and event["event_id"] not in ids:
                    sent_at[event["event_id"]] = now
                ids.add(event["event_id"])
                sent += 1
            for out in packer.due(time.time(), LINGER_S):
                pending.append(await send(out))
            await asyncio.sleep(0.005)
        for out in packer.flush():
            pending.append(await send(out))
        await producer.flush()
        for future in pending:
            await future
        stop.set()
        deadline = time.monotonic() + 60
        while True:
            now_samples = await asyncio.to_thread(scrape, web_port)
            counted = total(now_samples, "journey_events_total") >= counted_before + sent
            if (counted and written(now_samples)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await poller
    finally:
        await producer.stop()
        await client.aclose()
    after = await asyncio.to_thread(scrape, web_port)
    counted_ms, counted_buckets = lag_quantiles(before, after, "journey_event_lag_seconds")
    written_ms, written_buckets = lag_quantiles(before, after, "journey_written_lag_seconds")
    redis_ms = [(seen_at[i] - sent_at[i]) * 1000 for i in seen_at]
    return {
        "rate": rate,
        "seconds": seconds,
        "envelope": envelope,
        "linger_ms": LINGER_S * 1000,
        "sent": sent,
        "counted": total(after, "journey_events_total") - counted_before,
        "redis_sampled": len(sent_at),
        "redis_seen": len(seen_at),
        "redis_ms": {f"p{q}": quantile(redis_ms, q / 100) for q in (50, 95, 99)},
        "counted_ms": counted_ms,
        "clickhouse_ms": written_ms,
        "lag_buckets": counted_buckets,
        "written_lag_buckets": written_buckets,
    }


async def fetch_hold(kafka_url: str, wait_ms: int, seconds: float = 5.0) -> dict[str, float]:
    """Send → consumed on this broker for a plain consumer with ``wait_ms`` fetch wait.

    One record every 5 ms over 4 partitions; p50/p99 in ms. On Kafka this is a
    few ms whatever the wait (a fetch returns once a byte is there); on Tansu it
    grows with the wait: what a worker with Faust's 1500 ms would add.
    """
    from aiokafka import AIOKafkaConsumer

    from pipeline.producer import start_producer

    topic = f"bench.fetch-hold.{wait_ms}"
    await asyncio.to_thread(create_topics, kafka_url, {topic: 4})
    producer = await start_producer(kafka_url, linger_ms=0)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers(kafka_url),
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=wait_ms,
    )
    await consumer.start()
    latencies: list[float] = []
    try:
        await asyncio.sleep(1.0)  # assigned and fetching before the first record
        stop_at = time.time() + seconds

        async def produce() -> None:
            i = 0
            while time.time() < stop_at:
                await producer.send(topic, repr(time.time()).encode(), partition=i % 4)
                i += 1
                await asyncio.sleep(0.005)

        sending = asyncio.create_task(produce())
        while time.time() < stop_at + 2 * wait_ms / 1000 + 1:
            got = await consumer.getmany(timeout_ms=200)
            now = time.time()
            latencies += [(now - float(r.value or b"0")) * 1000 for rs in got.values() for r in rs]
        await sending
    finally:
        await consumer.stop()
        await producer.stop()
    return {"p50": quantile(latencies, 0.5), "p99": quantile(latencies, 0.99)}


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    return found


# --- after the worker: what ClickHouse and Redis hold ------------------------------------


def clickhouse_facts(dsn: str, until: float) -> dict[str, Any]:
    """Read after the worker stopped: a ``chdb://`` directory admits one process at a time.

    Rows and times are of the batches stamped up to ``until`` (the end of the
    throughput run, before any latency traffic); bytes are of everything stored.
    """
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=dsn)
    rows, distinct, first_ms, last_ms = client.query(
        "SELECT count(), uniqExact(event_id), toUnixTimestamp64Milli(min(received_at)), "
        "toUnixTimestamp64Milli(max(received_at)) FROM journey.events "
        f"WHERE received_at <= fromUnixTimestamp64Milli({int(until * 1000)}, 'UTC')"
    ).result_rows[0]
    transitions = client.query("SELECT count() FROM journey.transitions").result_rows[0][0]
    parts = client.query(
        "SELECT table, sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes), count() "
        "FROM system.parts WHERE database = 'journey' AND active GROUP BY table ORDER BY table"
    ).result_rows
    tables = {
        str(t): {"rows": int(r), "bytes": int(b), "uncompressed": int(u), "parts": int(n)}
        for t, r, b, u, n in parts
    }
    client.command("OPTIMIZE TABLE journey.events FINAL")
    merged = client.query(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
        "WHERE database = 'journey' AND table = 'events' AND active"
    ).result_rows[0]
    client.close()
    events = tables.get("events", {"rows": 0, "bytes": 0})
    return {
        "event_rows": int(rows),
        "distinct_event_ids": int(distinct),
        "transition_rows": int(transitions),
        "first_received_at": first_ms / 1000,
        "last_received_at": last_ms / 1000,
        "tables": tables,
        "events_bytes_per_row": events["bytes"] / events["rows"] if events["rows"] else 0.0,
        "events_bytes_per_row_merged": int(merged[1]) / int(merged[0]) if merged[0] else 0.0,
        "all_tables_bytes_per_event": sum(t["bytes"] for t in tables.values()) / events["rows"]
        if events["rows"]
        else 0.0,
    }


def redis_facts(url: str, used_before: int, sample: int = 2000) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        used = int(client.info("memory")["used_memory"])
        counts: Counter[str] = Counter()
        profiles: list[bytes] = []
        marks: list[bytes] = []
        for key in client.scan_iter(match="jt:*", count=10_000):
            if key.endswith(b":p"):
                kind = "customers" if key.startswith(b"jt:{c:") else "devices"
                counts[kind] += 1
                if len(profiles) < sample:
                    profiles.append(key)
            elif key.startswith(b"jt:e:"):
                counts["event_marks"] += 1
                if len(marks) < sample:
                    marks.append(key)
            else:
                counts["other"] += 1

        def mean_usage(keys: list[bytes]) -> float:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key, samples=0)
            sizes = [s for s in pipe.execute() if s is not None]
            return sum(sizes) / len(sizes) if sizes else 0.0

        held = counts["customers"] + counts["devices"]
        commands = {
            name.removeprefix("cmdstat_"): {
                "calls": int(stat["calls"]),
                "usec_per_call": float(stat["usec_per_call"]),
                "seconds": int(stat["usec"]) / 1e6,
            }
            for name, stat in client.info("commandstats").items()
            if isinstance(stat, dict)
        }
        return {
            "commands": commands,
            "used_memory_delta": used - used_before,
            "profiles_held": held,
            "keys": dict(counts),
            "bytes_per_profile_key": mean_usage(profiles),
            "bytes_per_event_mark": mean_usage(marks),
            "used_memory_delta_per_profile": (used - used_before) / held if held else 0.0,
        }
    finally:
        client.close()


# --- the run -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events pre-loaded")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of journey.events")
    parser.add_argument("--seed", type=int, default=1, help="simulator seed")
    parser.add_argument(
        "--envelope",
        type=int,
        default=DEFAULT_ENVELOPE_EVENTS,
        help="events per Kafka message, as `journey send`/`simulate` pack them (1: one per "
        "message, as a simple producer sends them); every contender reads the same messages",
    )
    parser.add_argument("--naive-events", type=int, default=5_000, help="baseline sample size")
    parser.add_argument("--naive-seconds", type=float, default=60.0, help="baseline time cap")
    parser.add_argument("--skip", action="append", default=[], choices=("peer", "naive"))
    parser.add_argument("--profile", action="store_true", help="py-spy the worker")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the partitions (above 1: needs --clickhouse http; "
        "no latency phase)",
    )
    parser.add_argument(
        "--clickhouse",
        choices=("http", "chdb"),
        default="http",
        help="http (default): the worker inserts over HTTP into chDB in a process of its own "
        "(bench/clickhouse_http.py), as into a ClickHouse server; chdb: chDB inside the "
        "worker, as `journey up` runs it",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=30.0,
        help="after the worker's run: live traffic at half its rate this long (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.workers > 1 and args.clickhouse != "http":
        parser.error("--workers above 1 needs --clickhouse http: chDB admits one process")
    command = COMMAND + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    services: list[Service] = []
    stats = TopicStats()
    contenders: dict[str, Contender] = {}
    try:
        with console.status("starting Tansu and redis-server…"):
            kafka = start_kafka(log_dir=work)
            services.append(kafka)
            redis_service = start_redis(data_dir=work / "redis", appendonly=True)
            services.append(redis_service)
            clickhouse = None
            if args.clickhouse == "http":
                clickhouse = clickhouse_http.start(work / "chdb", work)
                services.append(clickhouse)
            create_topics(
                kafka.url,
                {
                    EVENTS_TOPIC: args.partitions,
                    REJECTED_TOPIC: 1,
                    TRANSITIONS_TOPIC: args.partitions,
                },
            )
        with console.status(f"pre-loading {args.events:,} simulator events…"):
            started = time.perf_counter()
            sent = asyncio.run(
                produce_batches(
                    kafka.url,
                    EVENTS_TOPIC,
                    records(args.events, args.seed, stats),
                    envelope=args.envelope,
                )
            )
            assert sent == args.events == stats.events, (sent, stats.events)
            preload_s = time.perf_counter() - started
        console.print(
            f"pre-loaded {stats.events:,} events ({stats.bytes / stats.events:.0f} bytes each, "
            f"{stats.keys:,} keys, {stats.duplicates:,} resent duplicates; up to "
            f"{args.envelope} per message) in {preload_s:.0f}s"
        )

        with console.status("ceiling: plain aiokafka consumer…"):
            first_ceiling = asyncio.run(ceiling(kafka.url, args.partitions, args.events))
        console.print(f"ceiling (first): {first_ceiling.events_per_s:,.0f} events/s")

        if "peer" not in args.skip:
            with console.status("peer: Quix Streams (group join, then the whole topic)…"):
                contenders["peer"] = peer(kafka, args.events, work, args.envelope > 1)
            console.print(f"peer: {contenders['peer'].events_per_s:,.0f} events/s")

        redis_client = redis.Redis.from_url(redis_service.url)
        used_before = int(redis_client.info("memory")["used_memory"])
        redis_client.close()
        with console.status("worker: journey worker (group join, then the whole topic)…"):
            run = worker(
                kafka,
                redis_service,
                args.events,
                work,
                args.profile,
                args.latency_seconds,
                used_before,
                args.envelope,
                clickhouse,
                args.workers,
            )
        with console.status("reading ClickHouse…"):
            dsn = clickhouse.url if clickhouse is not None else f"chdb://{work / 'chdb'}"
            ch = clickhouse_facts(dsn, run.done_at)
        state = run.redis
        seconds = run.done_at - ch["first_received_at"]
        samples = run.samples
        outcomes = {
            o: total(samples, "journey_events_total", outcome=o)
            for o in ("accepted", "duplicate", "rejected")
        }
        worker_result = Contender(
            run.contender.name,
            args.events,
            seconds,
            "end to end: first batch → last event counted on /metrics and its rows in ClickHouse",
            {"outcomes": outcomes},
        )
        contenders["worker"] = worker_result
        ch_span = ch["last_received_at"] - ch["first_received_at"]
        cross = {
            "topic_events": stats.events,
            "clickhouse_event_rows": ch["event_rows"],
            "rows_plus_duplicates_plus_rejected": ch["event_rows"]
            + outcomes["duplicate"]
            + outcomes["rejected"],
            "first_to_last_batch_s": ch_span,
            "topic_events_per_s_over_clickhouse_span": stats.events / ch_span if ch_span else 0.0,
            "clickhouse_rows_per_s_over_clickhouse_span": ch["event_rows"] / ch_span
            if ch_span
            else 0.0,
        }
        console.print(
            f"worker: {worker_result.events_per_s:,.0f} events/s; cross-check "
            f"{cross['topic_events_per_s_over_clickhouse_span']:,.0f} events/s "
            f"(topic events over ClickHouse's first-to-last batch)"
        )

        if "naive" not in args.skip:
            with console.status("baseline: naive Faust agent (group join, then a sample)…"):
                contenders["naive"] = naive(
                    kafka, redis_service, args.naive_events, args.naive_seconds, work
                )
            console.print(f"baseline: {contenders['naive'].events_per_s:,.0f} events/s")

        with console.status("ceiling again…"):
            last_ceiling = asyncio.run(ceiling(kafka.url, args.partitions, args.events))
    finally:
        for service in reversed(services):
            service.stop()

    best = max(first_ceiling, last_ceiling, key=lambda c: c.events_per_s)
    contenders = {"ceiling": best, **contenders}
    rate = worker_result.events_per_s
    ratios = {
        f"worker/{name}": rate / c.events_per_s
        for name, c in contenders.items()
        if name != "worker" and c.events_per_s > 0
    }
    per_event = _per_event(run, samples, args.events)

    table = Table(
        title=f"{args.events:,} simulator events (up to {args.envelope} per message), "
        f"{args.partitions} partitions, {args.workers} worker process(es), "
        f"Tansu + redis-server + chDB "
        f"({'over HTTP' if args.clickhouse == 'http' else 'in the worker'}, "
        f"{os.cpu_count()} cores)"
    )
    for column in ("contender", "events", "seconds", "events/s", "worker ×"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, c in contenders.items():
        table.add_row(
            c.name,
            f"{c.events:,}",
            f"{c.seconds:.1f}",
            f"{c.events_per_s:,.0f}",
            "" if name == "worker" else f"{ratios[f'worker/{name}']:.2f}",
        )
    console.print(table)
    console.print(
        f"ceiling runs: {first_ceiling.events_per_s:,.0f} and {last_ceiling.events_per_s:,.0f} "
        "events/s (first, last)"
    )
    console.print("ratios: " + ", ".join(f"{name} = {value:.3f}" for name, value in ratios.items()))
    console.print(
        f"cross-check: {cross['topic_events']:,} events in the topic, "
        f"{cross['clickhouse_event_rows']:,} rows in journey.events "
        f"(+ {outcomes['duplicate']:,.0f} duplicates + {outcomes['rejected']:,.0f} rejected = "
        f"{cross['rows_plus_duplicates_plus_rejected']:,.0f}); first to last batch "
        f"{ch_span:.1f}s = {cross['topic_events_per_s_over_clickhouse_span']:,.0f} events/s"
    )
    console.print(
        f"state: Redis {state['bytes_per_profile_key']:.0f} bytes per profile key "
        f"({state['profiles_held']:,} held), {state['used_memory_delta_per_profile']:.0f} bytes "
        f"of used_memory per profile with the duplicate marks "
        f"({state['bytes_per_event_mark']:.0f} bytes per mark); ClickHouse "
        f"{ch['events_bytes_per_row']:.1f} bytes per event row on disk "
        f"({ch['events_bytes_per_row_merged']:.1f} once merged), "
        f"{ch['all_tables_bytes_per_event']:.1f} bytes per event over all tables"
    )
    busiest = sorted(state["commands"].items(), key=lambda kv: -kv[1]["seconds"])[:4]
    console.print(
        "redis-server time by command: "
        + ", ".join(
            f"{name} {c['seconds']:.1f}s ({c['calls']:,} calls, {c['usec_per_call']:.0f} µs each)"
            for name, c in busiest
        )
    )
    console.print(
        "worker's CPU per event: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in per_event["cpu_us"].items())
        + "; its batch split per event: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in per_event["batch_us"].items())
    )
    if run.latency:
        lat = run.latency
        console.print(
            f"latency at {lat['rate']:,.0f} events/s (half the worker's rate) for "
            f"{lat['seconds']:.0f}s, event time → visible: Redis p50/p95/p99 "
            + "/".join(f"{v:.0f}" for v in lat["redis_ms"].values())
            + " ms (sampled marks); counted on /metrics "
            + "/".join(f"{v:.0f}" for v in lat["counted_ms"].values())
            + " ms; rows in ClickHouse "
            + "/".join(f"{v:.0f}" for v in lat["clickhouse_ms"].values())
            + f" ms (histogram buckets); {lat['counted']:,.0f} of {lat['sent']:,} counted"
        )
        hold = lat["fetch_hold_ms"]
        console.print(
            "the broker's fetch hold (a plain consumer, 200 records/s), p50/p99: "
            + "; ".join(
                f"{v['p50']:.0f}/{v['p99']:.0f} ms at a {wait} ms fetch wait"
                for wait, v in hold.items()
            )
            + f" (Faust's is {FAUST_FETCH_WAIT_MS} ms; the worker here runs with"
            " bench/tansu_worker.py's, as Kafka answers a fetch once a byte is there)"
        )
    if run.profile:
        lines = _profile_lines(run.profile, args.events)
        PROFILE_OUT.parent.mkdir(parents=True, exist_ok=True)
        PROFILE_OUT.write_text("\n".join(lines) + "\n")
        console.print("py-spy of the worker (CPU per event by part):")
        for line in lines:
            console.print("  " + line)

    results = RESULTS if args.envelope > 1 else RESULTS_SINGLE
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "command": command,
                "args": vars(args),
                "cores": os.cpu_count(),
                "topic": {
                    **asdict(stats),
                    "envelope": args.envelope,
                    "messages": first_ceiling.extra["messages"],
                },
                "preload_s": preload_s,
                "contenders": {
                    name: {**asdict(c), "events_per_s": c.events_per_s}
                    for name, c in contenders.items()
                },
                "ceiling_runs": [first_ceiling.events_per_s, last_ceiling.events_per_s],
                "ratios": ratios,
                "cross_check": cross,
                "clickhouse": ch,
                "redis": state,
                "worker_per_event": per_event,
                "latency": run.latency,
                "profile_samples": dict(run.profile) if run.profile else None,
            },
            indent=2,
        )
    )
    console.print(f"written to {results.relative_to(ROOT)}; logs in {work}")
    console.print(f"reproduce: {command}")


def _per_event(
    run: WorkerRun, samples: Mapping[str, list[tuple[dict[str, str], float]]], events: int
) -> dict[str, Any]:
    window = run.cpu["window_s"]
    names = [n for n in ("worker", "tansu", "redis", "clickhouse") if n in run.cpu]
    cpu_us = {name: run.cpu[name] / events * 1e6 for name in names}
    batch_us = {
        step: total(samples, "journey_batch_duration_seconds_sum", step=step) / events * 1e6
        for step in ("decode", "redis", "clickhouse", "total")
    }
    batches = total(samples, "journey_batch_size_count")
    return {
        "cpu_us": cpu_us,
        "cores_busy": {name: run.cpu[name] / window for name in names},
        "batch_us": batch_us,
        "batches": batches,
        "mean_batch": total(samples, "journey_batch_size_sum") / batches if batches else 0.0,
    }


def _profile_lines(parts: Counter[str], events: int) -> list[str]:
    all_samples = sum(parts.values())
    lines = []
    for part, n in parts.most_common():
        us = n / PROFILE_RATE / events * 1e6
        lines.append(f"{part:<52} {us:7.1f} µs/event  {100 * n / all_samples:5.1f}%")
    lines.append(
        f"{'all sampled (non-idle) threads':<52} "
        f"{all_samples / PROFILE_RATE / events * 1e6:7.1f} µs/event"
    )
    return lines


if __name__ == "__main__":
    main()
