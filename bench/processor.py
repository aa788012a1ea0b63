"""The batch processor alone, with no Kafka: the worker's per-event CPU, from a profile.

Reproduce (from the project root):

    .venv/bin/python bench/processor.py                    # 100,000 events
    .venv/bin/python bench/processor.py --profile out.prof # + cProfile, sorted by own time
    .venv/bin/python bench/processor.py --discard-rows     # rows encoded, not inserted
    .venv/bin/python bench/processor.py --clickhouse http  # chDB over HTTP, its own process

It starts redis-server (AOF on, as in production) and a chDB directory of its
own, packs simulator events into envelopes as `journey send` does, and hands
them to ``BatchProcessor.process`` a take batch at a time, as the Faust agent
does; transitions and dead letters go nowhere. What it prints is the split the
worker cannot show under Faust: events/s, the process's CPU per event, and
redis-server's. bench/throughput.py is the end-to-end measure; this one is for
finding where the time goes between two runs of it. ``--discard-rows`` encodes
each insert's body as for ClickHouse and drops it: the difference is what the
embedded chDB engine costs inside the worker's process, work that a ClickHouse
server does on its own machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clickhouse_http
from bench.throughput import cpu_seconds
from pipeline.embedded import start_redis
from pipeline.envelope import Outgoing, Packer
from pipeline.events import Validator
from pipeline.journeys import default_journeys
from pipeline.metrics import Metrics
from pipeline.processor import BatchProcessor, RawMessage
from pipeline.settings import EVENTS_TOPIC
from pipeline.simulate import generate, key_of
from pipeline.sinks.clickhouse import ClickHouseSink, encode_rows
from pipeline.state.redis_store import RedisStore

COMMAND = ".venv/bin/python bench/processor.py"


def messages(count: int, partitions: int, envelope: int, seed: int) -> list[RawMessage]:
    """Simulator events over the hour before now, packed per partition in Kafka order."""
    rng = random.Random(seed)
    packer = Packer(partitions, envelope)
    offsets = [0] * partitions
    out: list[RawMessage] = []
    start = time.time() - 3600

    def take(batch: list[Outgoing]) -> None:
        for o in batch:
            partition = o.partition if o.partition is not None else 0
            out.append(
                RawMessage(EVENTS_TOPIC, partition, offsets[partition], o.value, time.time())
            )
            offsets[partition] += 1

    for n, event in enumerate(generate(rng, start, rate=max(1.0, count / 3600), duration=None)):
        if n == count:
            break
        take(packer.add(key_of(event).encode(), orjson.dumps(event)))
    take(packer.flush())
    return out


class DiscardingSink(ClickHouseSink):
    """Encodes every insert's body as the real sink does, then drops it."""

    def _insert_all(self, batches: list[tuple[str, Sequence[str], list[list[Any]]]]) -> None:
        for _, _, rows in batches:
            encode_rows(rows)


async def run(args: argparse.Namespace, work: Path) -> None:
    data = messages(args.events, args.partitions, args.envelope, args.seed)
    redis_service = start_redis(data_dir=work / "redis", appendonly=True)
    journeys = default_journeys()
    metrics = Metrics(lambda: iter(()))
    store = RedisStore(redis_service.url, 7 * 24 * 3600)
    clickhouse = None
    if args.clickhouse == "http":
        clickhouse = clickhouse_http.start(work / "chdb", work)
    dsn = clickhouse.url if clickhouse is not None else f"chdb://{work / 'chdb'}"
    sink = (DiscardingSink if args.discard_rows else ClickHouseSink)(dsn)
    await sink.start()
    processor = BatchProcessor(Validator(), journeys, store, sink, metrics)
    # As the agent takes them: up to 1,000 messages a batch, partitions interleaved.
    by_partition: dict[int, list[RawMessage]] = {}
    for m in data:
        by_partition.setdefault(m.partition, []).append(m)
    batches: list[list[RawMessage]] = []
    step = max(1, args.take // args.partitions)
    longest = max(len(v) for v in by_partition.values())
    for i in range(0, longest, step):
        batch = [m for p in sorted(by_partition) for m in by_partition[p][i : i + step]]
        batches.append(batch)
    # Baseline, same process and data: decoding and validating alone, the floor
    # of what any processor of these messages pays.
    validator = Validator()
    began = time.perf_counter()
    decoded = sum(len(validator.decode_message(m.value)) for m in data)
    decode_rate = decoded / (time.perf_counter() - began)
    profiler = cProfile.Profile() if args.profile else None
    redis_cpu = cpu_seconds(redis_service.process.pid)
    own_cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    accepted = 0
    for batch in batches:
        result = await processor.process(batch)
        accepted += result.accepted + result.duplicates + len(result.rejected)
    await processor.drain()  # the end: every row in ClickHouse
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - own_cpu.ru_utime) + (after.ru_stime - own_cpu.ru_stime)
    redis_used = cpu_seconds(redis_service.process.pid) - redis_cpu
    await sink.close()
    await store.close()
    redis_service.stop()
    if clickhouse is not None:
        clickhouse.stop()
    print(f"{accepted:,} events in {len(data):,} messages, {len(batches)} take batches")
    rate = accepted / seconds
    print(
        f"{rate:,.0f} events/s in {seconds:.1f}s; baseline (decode and validate only) "
        f"{decode_rate:,.0f} events/s; processor/baseline {rate / decode_rate:.3f}"
    )
    rows = "chDB included" if clickhouse is None else "chDB in its own process"
    if args.discard_rows:
        rows = "rows dropped"
    print(
        f"CPU per event: this process {cpu / accepted * 1e6:.0f} µs (all threads, {rows}), "
        f"redis-server {redis_used / accepted * 1e6:.0f} µs"
    )
    if profiler is not None:
        profiler.dump_stats(args.profile)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(40)
    discard = " --discard-rows" if args.discard_rows else ""
    print(f"reproduce: {COMMAND} --events {args.events} --clickhouse {args.clickhouse}{discard}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--envelope", type=int, default=100)
    parser.add_argument("--take", type=int, default=1000, help="messages per take batch")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--profile", help="write a cProfile here and print its top")
    parser.add_argument(
        "--clickhouse",
        choices=("chdb", "http"),
        default="chdb",
        help="chdb: in this process, as in `journey up`; http: bench/clickhouse_http.py",
    )
    parser.add_argument(
        "--discard-rows",
        action="store_true",
        help="encode ClickHouse inserts and drop them (what chDB costs in-process)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-processor-") as work:
        asyncio.run(run(args, Path(work)))


if __name__ == "__main__":
    main()
