"""The pure helpers of bench/throughput.py: quantiles, profile parts, metric parsing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "throughput.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_throughput", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


throughput = _load()
INF = float("inf")


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 0.5),  # rank 50 is half-way through the (0, 1] bucket, which holds 100
        (0.25, 0.25),
        (1.0, 1.0),
    ],
)
def test_histogram_quantile_interpolates_inside_the_bucket(q: float, expected: float) -> None:
    """Linear inside the bucket holding the rank, as Prometheus's histogram_quantile."""
    buckets = [(1.0, 100.0), (2.5, 100.0), (INF, 100.0)]
    assert throughput.histogram_quantile(buckets, q) == pytest.approx(expected)


def test_histogram_quantile_in_a_later_bucket_starts_at_its_lower_bound() -> None:
    """Rank 75 of 100 with 50 below 1 s and 50 in (1, 2.5] lands half-way: 1.75 s."""
    buckets = [(1.0, 50.0), (2.5, 100.0), (INF, 100.0)]
    assert throughput.histogram_quantile(buckets, 0.75) == pytest.approx(1.75)


def test_histogram_quantile_in_the_inf_bucket_is_the_largest_bound() -> None:
    """Observations past the last finite bound report that bound, not infinity."""
    buckets = [(1.0, 10.0), (5.0, 10.0), (INF, 100.0)]
    assert throughput.histogram_quantile(buckets, 0.99) == 5.0


def test_histogram_quantile_of_nothing_is_zero() -> None:
    """An empty phase gives 0 rather than dividing by zero."""
    assert throughput.histogram_quantile([(1.0, 0.0), (INF, 0.0)], 0.5) == 0.0
    assert throughput.histogram_quantile([], 0.5) == 0.0


def test_quantile_is_nearest_rank() -> None:
    """p50 of 1..100 is 50 and p99 is 99; none gives 0."""
    values = [float(v) for v in range(100, 0, -1)]
    assert throughput.quantile(values, 0.5) == 50.0
    assert throughput.quantile(values, 0.99) == 99.0
    assert throughput.quantile([], 0.5) == 0.0


@pytest.mark.parametrize(
    ("stack", "part"),
    [
        (
            [
                "run (faust/agents/agent.py:10)",
                "process (pipeline/processor.py:200)",
                "decode (pipeline/events.py:300)",
            ],
            "validation (orjson + fastjsonschema + Event)",
        ),
        (
            [
                "process (pipeline/processor.py:200)",
                "load (pipeline/state/redis_store.py:90)",
                "execute (redis/asyncio/client.py:1)",
                "write (asyncio/streams.py:5)",
            ],
            "Redis client (redis-py)",
        ),
        (
            [
                "_bootstrap (threading.py:1)",
                "_insert_all (pipeline/sinks/clickhouse.py:276)",
                "insert (clickhouse_connect/driver/client.py:1)",
            ],
            "ClickHouse insert (clickhouse-connect + chDB)",
        ),
        (
            [
                "execute_from_commandline (mode/worker.py:264)",
                "run_worker (pipeline/worker.py:352)",
                "run_forever (asyncio/base_events.py:1)",
                "select (selectors.py:1)",
            ],
            None,
        ),
    ],
)
def test_profile_part_is_the_innermost_known_frame(stack: list[str], part: str | None) -> None:
    """The deepest frame of a known package decides; generic frames are skipped over."""
    assert throughput.profile_part(stack) == (part or throughput.OTHER_PART)


def test_summarise_profile_adds_counts_per_part() -> None:
    """py-spy's collapsed lines ``a;b;c N`` are summed by part; malformed lines are ignored."""
    raw = (
        "thread (0x1);run (faust/streams.py:1);getone (aiokafka/consumer.py:2) 7\n"
        "thread (0x1);run (faust/streams.py:1) 3\n"
        "thread (0x1);x (pipeline/stages.py:9) 2\n"
        "garbage\n"
    )
    parts = throughput.summarise_profile(raw)
    assert parts == {
        "aiokafka consumer (fetch, records)": 7,
        "Faust / mode (stream, take_events, acks)": 3,
        "stage engine + identity (pure)": 2,
    }


def test_metric_samples_and_total_match_labels() -> None:
    """Counters are read by name, summed over the samples whose labels match."""
    text = (
        "# TYPE journey_events_total counter\n"
        'journey_events_total{channel="web",outcome="accepted"} 5.0\n'
        'journey_events_total{channel="app",outcome="accepted"} 2.0\n'
        'journey_events_total{channel="web",outcome="duplicate"} 1.0\n'
    )
    samples = throughput.metric_samples(text)
    assert throughput.total(samples, "journey_events_total") == 8.0
    assert throughput.total(samples, "journey_events_total", outcome="accepted") == 7.0
    assert throughput.total(samples, "journey_missing") == 0.0
