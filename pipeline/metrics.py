"""Prometheus metrics. Labels stay bounded: journey, stage, channel, outcome, reason.

The business counters (events, entries, exits, drop-offs, transitions,
hand-offs, merges, rejections) are not counted here: they are tallied in Redis
with the state (pipeline/ledger.py) and exported by :class:`LedgerCollector`,
so a crashed worker neither loses nor doubles them. What stays here describes
this process's own work: latencies, batch sizes, sink errors.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline import ledger
from pipeline.health import SERVICES, Health

# Finer around a second: the latency objective (p99 under 1 s) is read from these.
LAG_BUCKETS = (
    *(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 5),
    *(10, 30, 60, 300, 900, 3600, float("inf")),
)
BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, float("inf"))
# From seconds (journeys scaled down for rehearsals) to a quarter (retention).
_M, _H, _D = 60.0, 3600.0, 86400.0
TIME_IN_STAGE_BUCKETS = (
    *(1.0, 5.0, 15.0, 30.0),
    *(_M, 5 * _M, 15 * _M, 30 * _M),
    *(_H, 3 * _H, 6 * _H, 12 * _H),
    *(_D, 2 * _D, 3 * _D, 7 * _D, 14 * _D, 30 * _D, 60 * _D, 90 * _D, 180 * _D),
    float("inf"),
)
LATENESS_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600, 6 * _H, _D, float("inf"))


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, with one increment per bucket touched.

    A batch observes thousands of values; observe() takes a lock and a loop per
    value, and was 5% of the worker's time. This uses the histogram's bucket
    bounds and values, which prometheus_client keeps private:
    tests/test_metrics.py checks that it matches observe() exactly. Call it on
    a histogram without labels or on a labelled child; the values are finite
    (ages and durations).
    """
    if not values:
        return
    bounds: Sequence[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class StageCustomersCollector(Collector):
    """``journey_stage_customers`` from the counts of the partitions this worker owns.

    The counts live in Redis per partition; the worker refreshes ``snapshot``
    on a timer (every couple of seconds), off the batch path. Each partition
    is owned by one worker, so summing the series over workers gives every
    customer exactly once.
    """

    def __init__(self, stages: Callable[[], Iterator[tuple[str, str]]]) -> None:
        self._stages = stages
        self.snapshot: Mapping[tuple[str, str], int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "journey_stage_customers",
            "Customers now in each stage (this worker's partitions; sum over workers)",
            labels=["journey", "stage"],
        )
        for journey, stage in self._stages():
            family.add_metric([journey, stage], float(self.snapshot.get((journey, stage), 0)))
        yield family


class ConsistencyCollector(Collector):
    """``journey_cross_channel_consistency`` and the per-channel progression ratios.

    Computed from ClickHouse over the sliding event-time window, so every
    worker exports the same global value; a stage without an index (fewer
    than two channels with enough exits) has no sample rather than a made-up one.
    """

    def __init__(self) -> None:
        self.index: Mapping[tuple[str, str], float] = {}
        self.ratios: Mapping[tuple[str, str, str], float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        index = GaugeMetricFamily(
            "journey_cross_channel_consistency",
            "1 - stddev/mean of the channels' progression ratios at a stage (1 = all equal)",
            labels=["journey", "stage"],
        )
        for (journey, stage), value in sorted(self.index.items()):
            index.add_metric([journey, stage], value)
        yield index
        ratios = GaugeMetricFamily(
            "journey_stage_progression_ratio",
            "Advanced exits / all exits per channel over the consistency window",
            labels=["journey", "stage", "channel"],
        )
        for (journey, stage, channel), value in sorted(self.ratios.items()):
            ratios.add_metric([journey, stage, channel], value)
        yield ratios


class DependencyCollector(Collector):
    """``journey_dependency_up{service}``: read from the worker's Health at scrape time."""

    def __init__(self) -> None:
        self.health = Health()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "journey_dependency_up",
            "0 while calls to a service (kafka, redis, clickhouse) fail and are being retried",
            labels=["service"],
        )
        for service in SERVICES:
            gauge.add_metric([service], 1.0 if self.health.up(service) else 0.0)
        yield gauge


class LedgerCollector(Collector):
    """The business counters, from the ledger totals in Redis (pipeline/ledger.py).

    Only the worker that owns partition 0 exports them (``exporting``), so
    summing a counter over workers counts every event once; when partition 0
    moves, the series moves to its new owner, which `rate()` takes in its stride.
    The worker refreshes ``totals`` on its gauge timer.
    """

    def __init__(self) -> None:
        self.exporting = False
        self.totals: Mapping[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = {
            family: CounterMetricFamily(name, doc, labels=list(labels))
            for family, (name, labels, doc) in ledger.FAMILIES.items()
        }
        if self.exporting:
            for name, value in sorted(self.totals.items()):
                parsed = ledger.parse(name)
                if parsed is not None:
                    families[parsed[0]].add_metric(list(parsed[1]), value)
        yield from families.values()


class ScoreCollector(Collector):
    """``journey_score``, ``journey_score_component`` and ``journey_channel_score``.

    Computed from ClickHouse on the consistency timer over the same event-time
    window (pipeline/scorecard.py defines them), so every worker exports the
    same value. A score or component that cannot be judged (no customers, no
    survey answers) has no sample rather than a made-up one.
    """

    def __init__(self) -> None:
        self.scores: Mapping[str, float] = {}
        self.components: Mapping[tuple[str, str], float] = {}
        self.channels: Mapping[tuple[str, str], float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        score = GaugeMetricFamily(
            "journey_score",
            "Journey score 0-100: weighted mean of its components over the consistency window",
            labels=["journey"],
        )
        for journey, value in sorted(self.scores.items()):
            score.add_metric([journey], value)
        yield score
        components = GaugeMetricFamily(
            "journey_score_component",
            "A score component, 0-1 (1 best): conversion, dropoff, time_to_goal, satisfaction",
            labels=["journey", "component"],
        )
        for (journey, component), value in sorted(self.components.items()):
            components.add_metric([journey, component], value)
        yield components
        channels = GaugeMetricFamily(
            "journey_channel_score",
            "The journey score of the customers a channel carried, 0-100",
            labels=["journey", "channel"],
        )
        for (journey, channel), value in sorted(self.channels.items()):
            channels.add_metric([journey, channel], value)
        yield channels


class Metrics:
    def __init__(
        self,
        stages: Callable[[], Iterator[tuple[str, str]]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lag = Histogram(
            "journey_event_lag_seconds",
            "Event time to processed (its state committed to Redis, counted in the metrics)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.written_lag = Histogram(
            "journey_written_lag_seconds",
            "Event time to its rows in ClickHouse and its transitions on Kafka",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "journey_batch_size",
            "Events per processed batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "journey_batch_duration_seconds",
            "Wall time to process one batch",
            ["step"],
            registry=r,
        )
        self.sink_errors = Counter(
            "journey_sink_errors",
            "Failed calls to a sink (retried)",
            ["sink", "operation"],
            registry=r,
        )
        self.cas_conflicts = Counter(
            "journey_state_conflicts",
            "Customers whose Redis state changed under us and were recomputed",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "journey_assigned_partitions",
            "Partitions of journey.events this worker owns now",
            registry=r,
        )
        self.time_in_stage = Histogram(
            "journey_time_in_stage_seconds",
            "Time spent in a stage by everyone who left it, converters and drop-offs alike",
            ["journey", "stage", "outcome"],
            buckets=TIME_IN_STAGE_BUCKETS,
            registry=r,
        )
        self.lateness = Histogram(
            "journey_event_lateness_seconds",
            "Received (Kafka record time) minus occurred, per channel",
            ["channel"],
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.late_events = Counter(
            "journey_late_events",
            "Events older than the partition watermark (beyond the allowed lateness)",
            ["channel"],
            registry=r,
        )
        self.sweep_seconds = Histogram(
            "journey_sweep_duration_seconds", "Wall time of one drop-off sweep", registry=r
        )
        self.pending_deadlines = Gauge(
            "journey_pending_deadlines",
            "Customers with a drop-off deadline on this worker's partitions",
            registry=r,
        )
        self.event_clock = Gauge(
            "journey_event_clock_seconds",
            "The newest partition event-time clock this worker sees (runs on while idle)",
            registry=r,
        )
        self.outbox_recovered = Counter(
            "journey_outbox_recovered",
            "Batches whose rows and messages a stopped worker left owing, written out here",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "journey_consumer_lag_messages",
            "Messages on this worker's partitions not consumed yet",
            registry=r,
        )
        self.last_batch = Gauge(
            "journey_last_batch_timestamp_seconds",
            "Unix time of the last processed batch",
            registry=r,
        )
        self.stage_customers = StageCustomersCollector(stages)
        r.register(self.stage_customers)
        self.consistency = ConsistencyCollector()
        r.register(self.consistency)
        self.scores = ScoreCollector()
        r.register(self.scores)
        self.ledger = LedgerCollector()
        r.register(self.ledger)
        self.dependencies = DependencyCollector()
        r.register(self.dependencies)
