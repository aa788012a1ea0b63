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
        self.dropoffs = Counter(
            "journey_dropoffs",
            "Customers dropped at a stage, by the channel of their last event there",
            ["journey", "stage", "channel"],
            registry=r,
        )
        self.handoffs = Counter(
            "journey_channel_handoffs",
            "Consecutive events of one customer on different channels",
            ["journey", "from_channel", "to_channel"],
            registry=r,
        )
        self.handoff_outcomes = Counter(
            "journey_handoff_outcomes",
            "How the stage exit after a hand-off went (advanced or dropped)",
            ["journey", "from_channel", "to_channel", "outcome"],
            registry=r,
        )
        self.merges = Counter(
            "journey_identity_merges",
            "Events carrying both ids, by what the link did (merged, linked, "
            "already_linked) or why it was refused (claimed, placeholder)",
            ["result"],
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
