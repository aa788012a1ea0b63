"""Prometheus metrics. Labels stay bounded: journey, stage, channel, outcome, reason.

Labelled children are cached in dicts so the per-batch path does not pay for
``.labels()`` lookups on every event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, float("inf"))


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


class Metrics:
    def __init__(
        self,
        stages: Callable[[], Iterator[tuple[str, str]]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "journey_events", "Events by channel and outcome", ["channel", "outcome"], registry=r
        )
        self.rejected = Counter(
            "journey_rejected_events", "Rejected events by reason code", ["reason"], registry=r
        )
        self.entries = Counter(
            "journey_stage_entries",
            "Entries into a stage",
            ["journey", "stage", "channel"],
            registry=r,
        )
        self.exits = Counter(
            "journey_stage_exits",
            "Exits from a stage",
            ["journey", "stage", "channel", "outcome"],
            registry=r,
        )
        self.transitions = Counter(
            "journey_transitions",
            "Transitions by journey and kind",
            ["journey", "kind"],
            registry=r,
        )
        self.lag = Histogram(
            "journey_event_lag_seconds", "Event time to processed", buckets=LAG_BUCKETS, registry=r
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
        self.stage_customers = StageCustomersCollector(stages)
        r.register(self.stage_customers)
        self._events: dict[tuple[str, str], Counter] = {}
        self._entries: dict[tuple[str, str, str], Counter] = {}
        self._exits: dict[tuple[str, str, str, str], Counter] = {}

    def event(self, channel: str, outcome: str, n: int = 1) -> None:
        key = (channel, outcome)
        child = self._events.get(key)
        if child is None:
            child = self._events[key] = self.events.labels(channel, outcome)
        child.inc(n)

    def entry(self, journey: str, stage: str, channel: str) -> None:
        key = (journey, stage, channel)
        child = self._entries.get(key)
        if child is None:
            child = self._entries[key] = self.entries.labels(*key)
        child.inc()

    def exit(self, journey: str, stage: str, channel: str, outcome: str) -> None:
        key = (journey, stage, channel, outcome)
        child = self._exits.get(key)
        if child is None:
            child = self._exits[key] = self.exits.labels(*key)
        child.inc()
