"""`journey worker`, with the consumer's fetch wait lowered for Tansu. Benchmarks only.

Faust builds its consumer with ``fetch_max_wait_ms=1500``. Kafka answers a
fetch as soon as a byte is there (``fetch_min_bytes=1``), so that wait costs
nothing on Kafka; Tansu holds the fetch for much of it even when records
arrive meanwhile. A plain aiokafka consumer on Tansu, one record every 5 ms,
sees p50/p99 of 389/755 ms at a 1500 ms wait and 35/63 ms at 100 ms. Measuring
the worker's latency on Tansu as is would measure that quirk, so the
benchmarks run the worker through this wrapper, and bench/throughput.py
prints the quirk's size measured in the same run.

Usage: python bench/tansu_worker.py [--fetch-max-wait-ms N] [journey worker options]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import faust.transport.drivers.aiokafka as faust_aiokafka

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli

# What the plain consumer needed on Tansu to see tens of milliseconds.
FETCH_MAX_WAIT_MS = 100

_create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
_fetch_max_wait_ms = FETCH_MAX_WAIT_MS


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    consumer = _create(self, transport)
    # Read once by AIOKafkaConsumer.start() to build its fetcher. Private to aiokafka:
    # tests/bench/test_tansu_worker.py checks that start() still reads it.
    if not hasattr(consumer, "_fetch_max_wait_ms"):
        raise RuntimeError("aiokafka's consumer has no _fetch_max_wait_ms: update this wrapper")
    consumer._fetch_max_wait_ms = _fetch_max_wait_ms
    return consumer


def main() -> None:
    global _fetch_max_wait_ms
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=FETCH_MAX_WAIT_MS)
    ours, rest = parser.parse_known_args()
    _fetch_max_wait_ms = ours.fetch_max_wait_ms
    thread = faust_aiokafka.AIOKafkaConsumerThread
    thread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    sys.argv = ["journey", "worker", *rest]
    cli.main()


if __name__ == "__main__":
    main()
