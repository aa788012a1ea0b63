"""Load test of the HTTP collector on loopback, with a real worker consuming behind it.

Reproduce (from the project root, after ./scripts/setup.sh):

    .venv/bin/python bench/collector_load.py                 # 40,000 events, 16 clients
    .venv/bin/python bench/collector_load.py --events 200000 --clients 32 --batch 200

One run starts Tansu, redis-server, a `journey worker` (chDB) and a
`journey collector`, all on this machine, then measures on simulator traffic:

- baseline: the same kind of events produced straight to Kafka with aiokafka,
  the ceiling of any way in on this machine and broker;
- the collector with batches of ``--batch`` events per request, and with one
  event per request: requests/s, events/s, latency p50/p95/p99 (the answer
  comes after Kafka acknowledged), and events/s as a ratio of the baseline;
- the worker behind it: how fast it processed the collector's events, from its
  first to its last (``journey_events_total``), as a ratio of the collector's rate.

Everything shares the machine's cores (load generator, collector, broker,
worker, Redis), so read the ratios, not the absolute figures. Results are
printed and written to bench/results/collector_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from pipeline.collector.keys import hash_key, new_key
from pipeline.embedded import create_topics, free_port, start_kafka, start_redis
from pipeline.producer import produce_batches
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC, Settings
from pipeline.simulate import generate, key_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "collector_load.json"
BASELINE_TOPIC = "bench.baseline"
console = Console(width=120)  # a readable table when the output is a file or a pipe


@dataclass
class Phase:
    name: str
    requests: int
    events: int
    seconds: float
    statuses: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


def simulated(count: int, seed: int) -> list[dict[str, Any]]:
    """Simulator traffic over the last hour (event time in the past, never the future)."""
    rng = random.Random(seed)
    start = time.time() - 3600
    events: list[dict[str, Any]] = []
    for event in generate(rng, start, rate=max(1.0, count / 3000), duration=None):
        event["event_id"] = f"{seed}-{len(events)}"
        events.append(event)
        if len(events) == count:
            return events
    raise AssertionError("unreachable")


def percentile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else 0.0


async def baseline(kafka_url: str, events: list[dict[str, Any]]) -> float:
    records = [(key_of(e).encode(), orjson.dumps(e)) for e in events]
    started = time.perf_counter()
    sent = await produce_batches(kafka_url, BASELINE_TOPIC, records)
    assert sent == len(records)
    return len(records) / (time.perf_counter() - started)


async def load(
    url: str, key: str, events: list[dict[str, Any]], batch: int, clients: int, name: str
) -> Phase:
    """``clients`` concurrent posters share the batches; each waits for its answer."""
    batches = [orjson.dumps(events[i : i + batch]) for i in range(0, len(events), batch)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in batches:
        queue.put_nowait(body)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
            latencies.append(time.perf_counter() - t0)
            statuses[str(response.status)] += 1
            if response.status == 200:
                rejected = orjson.loads(answer)["rejected"]
                if rejected:
                    statuses["rejected events"] += rejected
            else:
                queue.put_nowait(body)  # 429/503: try again, as an SDK would

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return Phase(
        name,
        len(latencies),
        len(events),
        seconds,
        dict(statuses),
        percentile(ms, 0.50),
        percentile(ms, 0.95),
        percentile(ms, 0.99),
    )


def scrape_total(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "journey_events_total"
    )


def wait_for(port: int, expected: float, timeout: float) -> tuple[float, float]:
    """Poll the worker's counter until it reaches ``expected``; return (first seen moving, done)."""
    deadline = time.monotonic() + timeout
    first = None
    base = scrape_total(port)
    while time.monotonic() < deadline:
        total = scrape_total(port)
        if first is None and total > base:
            first = time.monotonic()
        if total >= expected:
            return first or time.monotonic(), time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"the worker reached {scrape_total(port):.0f} of {expected:.0f} events")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000, help="events in the batched phase")
    parser.add_argument("--single", type=int, default=4_000, help="events sent one per request")
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="collector-load-"))
    services = []
    children: list[subprocess.Popen[bytes]] = []
    try:
        with console.status("starting Tansu and redis-server…"):
            kafka = start_kafka(log_dir=work)
            services.append(kafka)
            redis_service = start_redis(data_dir=work / "redis", appendonly=True)
            services.append(redis_service)
            create_topics(
                kafka.url,
                {EVENTS_TOPIC: 4, REJECTED_TOPIC: 1, TRANSITIONS_TOPIC: 4, BASELINE_TOPIC: 4},
            )
        key = new_key()
        settings = Settings(
            kafka_url=kafka.url,
            redis_url=redis_service.url,
            clickhouse_dsn=f"chdb://{work / 'chdb'}",
            web_port=free_port(),
            collector_port=free_port(),
            collector_keys=f"bench:{hash_key(key)}",
            collector_max_events=max(500, args.batch),
            collector_rate=1e9,  # measure the collector, not its rate limit
            collector_burst=10**9,
        )
        env = {**os.environ, **settings.to_env()}
        for command in ("worker", "collector"):
            log = (work / f"{command}.log").open("wb")
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", command, "--loglevel", "warning"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            )
        url = f"http://127.0.0.1:{settings.collector_port}/v1/events"

        with console.status("generating simulator traffic…"):
            warmup = simulated(10, seed=1)
            batched = simulated(args.events, seed=2)
            single = simulated(args.single, seed=3)
            direct = simulated(args.events, seed=4)
        with console.status(f"baseline: {len(direct):,} events straight to Kafka…"):
            baseline_rate = asyncio.run(baseline(kafka.url, direct))

        with console.status("waiting for the worker to join its group (15–35 s on Tansu)…"):
            deadline = time.monotonic() + 120
            while True:
                try:
                    asyncio.run(load(url, key, warmup, 10, 1, "warm-up"))
                    break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            wait_for(settings.web_port, len(warmup), 120)

        phases = []
        worker_rate = 0.0
        seen = scrape_total(settings.web_port)
        with console.status(f"{len(batched):,} events in batches of {args.batch}…"):
            phases.append(
                asyncio.run(
                    load(url, key, batched, args.batch, args.clients, f"batches of {args.batch}")
                )
            )
            first, last = wait_for(settings.web_port, seen + len(batched), 600)
            worker_rate = len(batched) / max(last - first, 1e-9)
        seen = scrape_total(settings.web_port)
        with console.status(f"{len(single):,} events one per request…"):
            phases.append(asyncio.run(load(url, key, single, 1, args.clients, "one per request")))
            wait_for(settings.web_port, seen + len(single), 600)
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
        for service in reversed(services):
            service.stop()

    table = Table(
        title=f"HTTP collector on loopback, {args.clients} clients ({os.cpu_count()} cores)"
    )
    for column in ("way in", "requests/s", "events/s", "p50 ms", "p95 ms", "p99 ms", "× baseline"):
        table.add_column(column, justify="right" if column != "way in" else "left")
    table.add_row("aiokafka producer (baseline)", "–", f"{baseline_rate:,.0f}", "", "", "", "1.00")
    for phase in phases:
        table.add_row(
            f"collector, {phase.name}",
            f"{phase.requests_per_s:,.0f}",
            f"{phase.events_per_s:,.0f}",
            f"{phase.p50_ms:.1f}",
            f"{phase.p95_ms:.1f}",
            f"{phase.p99_ms:.1f}",
            f"{phase.events_per_s / baseline_rate:.2f}",
        )
    console.print(table)
    console.print(
        f"worker behind the collector: {worker_rate:,.0f} events/s from its first to its last "
        f"batched event = {worker_rate / phases[0].events_per_s:.2f} × the collector's rate "
        "(it drains behind the collector, so it cannot show more than the collector feeds it "
        "unless it started behind)."
    )
    console.print(f"answers: {[p.statuses for p in phases]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "args": vars(args),
                "cores": os.cpu_count(),
                "baseline_events_per_s": baseline_rate,
                "phases": [
                    {
                        **asdict(p),
                        "events_per_s": p.events_per_s,
                        "requests_per_s": p.requests_per_s,
                    }
                    for p in phases
                ],
                "worker_events_per_s": worker_rate,
            },
            indent=2,
        )
    )
    console.print(f"written to {RESULTS.relative_to(ROOT)}; logs in {work}")


if __name__ == "__main__":
    main()
