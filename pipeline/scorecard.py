"""Journey and channel scorecards: stage KPIs, channel performance and the 0–100 journey score.

Three layers, in this order in the file:

1. Pure math (no I/O): KPI ratios, period comparison, the score components
   and their weighted combination, a channel's effect on the consistency
   index, the worst channel of a stage. Tests pin these down exhaustively.
2. Queries: every figure comes from ClickHouse with bound parameters, read
   with ``FINAL``. Event types, stage and property names come from the
   validated journey file and are bound as parameters too; only measure
   numbers the code itself generates are written into the SQL text.
3. Assembly and rendering: ``scorecard()`` (one JSON-ready dict per journey,
   for ``journey report --scorecard``, ``--json``, ``--html`` and the worker's
   ``/report``), ``rank()``, and terminal tables.

Definitions (the README's "Scorecards" section says the same for users):

- KPIs (``kpis:`` of a stage in the journey file), over a period ``[since, until)``
  of event time, per channel and over all channels:
  ``count`` events of the given types; ``customers`` distinct customers (the
  event's customer id, else its device id) with such an event; ``sum``/``avg`` of
  a numeric property (JSON numbers only; other values are skipped; none at
  all gives no value); ``flow`` distinct customers who ``entered`` the stage
  (entered, advanced, regressed or re-engaged into it), ``reached`` it or a later
  stage, ``advanced`` out of it or were ``dropped`` at it (journey.transitions,
  on the channel of the transition); ``survey`` CSAT mean, NPS (% promoters
  9–10 − % detractors 0–6) or the number of answers, given while in the stage
  (or in any stage with ``any_stage``); ``ratio`` of two of these, none when the
  denominator is 0 or missing. Events belong to no journey: an event KPI reads
  the same events for every journey that names them.
- Channel performance per stage: progression (advanced / exits) and drop-off
  (dropped / exits) on the channel of the exit; average and p90 of the time in
  stage of those who left (advanced, dropped, regressed); CSAT and NPS of the
  answers given in the stage; average handling time: the mean numeric
  ``duration`` property (seconds, ≥ 0) of the channel's events; revenue: the
  sum of numeric ``order_value``; both attributed to the stage whose event list
  names the event type (the furthest, as stage matching does, ignoring
  conditions); the consistency effect: the stage's consistency index with every
  qualifying channel minus the index without this one (negative: the channel
  pulls the stage's consistency down; none when the channel is not one of
  the index's channels or either index does not exist).
- The score (``score:`` of the journey): four components, each 0–1 where 1 is
  best: ``conversion`` customers who reached the goal stage / customers who
  reached the first stage; ``dropoff`` 1 − dropped / exits over every stage;
  ``time_to_goal`` 1 − median time to goal / time limit, clamped to [0, 1]
  (time to goal: from a customer's first entry into the journey to their first
  entry into the goal or a later stage, for customers who first got there in
  the period); ``satisfaction`` the mean of CSAT scaled (CSAT − 1) / 4 and NPS
  scaled (NPS + 100) / 200, whichever have answers. Score = 100 × Σ wᵢcᵢ / Σ wᵢ
  over the components that have a value; none if none has. Per journey ×
  channel, the same with conversion the product of the channel's progression
  ratios at the stages before the goal (the chance the channel carries a
  customer through each), drop-off and satisfaction on the channel, and time
  to goal by the channel of the goal entry.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from pipeline.consistency import MIN_EXITS, consistency_index, progression_ratios
from pipeline.journeys import SCORE_COMPONENTS, Journey, Kpi, Weights
from pipeline.report import (
    MISSING,
    REPORT_START,
    Dropoff,
    FeedbackReport,
    Funnel,
    Scores,
    dropoff,
    feedback,
    funnel,
    human_duration,
)
from pipeline.stages import ENTRY_KINDS

# Event properties the channel table reads; the event schema's own examples name them.
DURATION_PROPERTY = "duration"
REVENUE_PROPERTY = "order_value"

# JSONType() of a property that is a JSON number; booleans and numeric strings are not.
_NUMERIC = "('Int64', 'UInt64', 'Double')"

Direction = Literal["up", "down", "same"]


# =========================================================================== pure math


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def evaluate_kpis(kpis: Sequence[Kpi], base: Mapping[str, float | None]) -> dict[str, float | None]:
    """Every KPI's value in file order: measured ones from ``base``, ratios computed from them.

    A measured KPI missing from ``base`` has no value (None).
    """
    values = {k.name: base.get(k.name) for k in kpis if k.kind != "ratio"}
    out: dict[str, float | None] = {}
    for k in kpis:
        if k.operands is not None:
            numerator, denominator = k.operands
            out[k.name] = ratio(values.get(numerator), values.get(denominator))
        else:
            out[k.name] = values[k.name]
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """A value against the previous period's: which way it moved and whether that is better."""

    direction: Direction | None  # None: one of the two has no value
    relative: float | None  # (now − before) / |before|; None when before is 0 or missing
    improved: bool | None  # None: no direction, or no change

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "relative": self.relative, "improved": self.improved}


def compare(current: float | None, previous: float | None, better: str = "higher") -> Change:
    """How ``current`` moved from ``previous``; ``better`` says which way is good."""
    if current is None or previous is None:
        return Change(None, None, None)
    relative = (current - previous) / abs(previous) if previous else None
    if math.isclose(current, previous, rel_tol=1e-12, abs_tol=1e-12):
        return Change("same", 0.0 if previous else None, None)
    direction: Direction = "up" if current > previous else "down"
    return Change(direction, relative, (direction == "up") == (better == "higher"))


def previous_period(
    since: datetime, until: datetime, now: datetime
) -> tuple[datetime, datetime] | None:
    """The period of the same length just before ``[since, until)``; None for all of history.

    An open end (``until`` in the future, as with ``--days``) counts up to ``now``,
    so the last 7 days compare with the 7 days before.
    """
    if since <= REPORT_START:
        return None
    end = min(until, now)
    if end <= since:
        return None
    return since - (end - since), since


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def conversion_value(reached_goal: int, reached_first: int) -> float | None:
    """Share of the journey's customers who got to the goal; None without customers."""
    value = ratio(reached_goal, reached_first)
    return None if value is None else _clamp01(value)


def dropoff_value(dropped: int, exits: int) -> float | None:
    """1 − drop-off ratio: 1 when nobody who left a stage dropped; None without exits."""
    value = ratio(dropped, exits)
    return None if value is None else _clamp01(1.0 - value)


def time_value(median_seconds: float | None, limit_seconds: float | None) -> float | None:
    """1 at no time, 0 at the limit or beyond, linear between; None without both figures."""
    if median_seconds is None or limit_seconds is None or limit_seconds <= 0:
        return None
    return _clamp01(1.0 - median_seconds / limit_seconds)


def satisfaction_value(csat: float | None, nps: float | None) -> float | None:
    """Mean of CSAT (1–5) and NPS (−100–100) each scaled to 0–1; whichever has answers."""
    parts = []
    if csat is not None:
        parts.append(_clamp01((csat - 1.0) / 4.0))
    if nps is not None:
        parts.append(_clamp01((nps + 100.0) / 200.0))
    return statistics.fmean(parts) if parts else None


def chained_conversion(progressions: Iterable[float | None]) -> float | None:
    """Product of per-stage progression ratios, skipping stages without exits; None if all are."""
    known = [p for p in progressions if p is not None]
    return math.prod(known) if known else None


def combine(values: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """The score: 100 × weighted mean of the components (each 0–1) that have a value.

    A component without a value (no survey answers, nobody reached the goal)
    drops out and its weight goes to the others in proportion; None when no
    weighted component has a value.
    """
    total_weight = 0.0
    total = 0.0
    for name, value in values.items():
        weight = weights.get(name, 0.0)
        if value is None or weight <= 0:
            continue
        total_weight += weight
        total += weight * _clamp01(value)
    if total_weight == 0:
        return None
    return 100.0 * _clamp01(total / total_weight)


def consistency_effects(
    counts: Mapping[str, tuple[int, int]], min_exits: int = MIN_EXITS
) -> dict[str, float | None]:
    """Per channel: the stage's consistency index minus the index without that channel.

    Negative means the channel pulls the stage's consistency down. None for a
    channel the index leaves out (too few exits) or when either index does not
    exist (fewer than two channels).
    """
    qualifying = progression_ratios(counts, min_exits)
    whole = consistency_index(counts, min_exits)
    effects: dict[str, float | None] = {}
    for channel in counts:
        if channel not in qualifying or whole is None:
            effects[channel] = None
            continue
        rest = {c: v for c, v in counts.items() if c != channel}
        without = consistency_index(rest, min_exits)
        effects[channel] = None if without is None else whole - without
    return effects


@dataclass(frozen=True, slots=True)
class WorstChannel:
    """The channel carrying fewest customers forward at a stage, against the others' mean."""

    channel: str
    progression: float
    others: float  # unweighted mean progression of the other compared channels
    exits: int
    low_volume: bool  # True: fewer than two channels had min_exits exits, so all were compared

    @property
    def gap(self) -> float:
        """How far below the others, in ratio points (0.25 = 25 percentage points)."""
        return self.others - self.progression

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "progression": self.progression,
            "others": self.others,
            "gap": self.gap,
            "exits": self.exits,
            "low_volume": self.low_volume,
        }


def worst_channel(
    counts: Mapping[str, tuple[int, int]], min_exits: int = MIN_EXITS
) -> WorstChannel | None:
    """The lowest progression ratio among channels with ``min_exits`` exits (ties: by name).

    With fewer than two such channels, every channel with exits is compared
    and the result says so (``low_volume``); None with fewer than two channels.
    """
    ratios = progression_ratios(counts, min_exits)
    low_volume = len(ratios) < 2
    if low_volume:
        ratios = progression_ratios(counts, 1)
    if len(ratios) < 2:
        return None
    channel = min(ratios, key=lambda c: (ratios[c], c))
    others = statistics.fmean(r for c, r in ratios.items() if c != channel)
    return WorstChannel(channel, ratios[channel], others, counts[channel][1], low_volume)


@dataclass(frozen=True, slots=True)
class Component:
    """One part of a score: its 0–1 value (None: cannot be judged), weight and raw figures."""

    name: str
    value: float | None
    weight: float
    detail: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "weight": self.weight, **self.detail}


@dataclass(frozen=True, slots=True)
class Score:
    """A score with the components it was made of, so nobody has to trust the single number."""

    score: float | None
    components: tuple[Component, ...]

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "components": {c.name: c.to_dict() for c in self.components}}


@dataclass(frozen=True, slots=True)
class GoalTimes:
    """Customers who first reached the goal in the period, and their median time to it."""

    customers: int = 0
    median: float | None = None


def make_score(
    weights: Weights,
    conversion: tuple[float | None, Mapping[str, Any]],
    exits: tuple[int, int],
    goal_times: GoalTimes,
    time_limit: float | None,
    scores: Scores,
) -> Score:
    """Build a Score from the raw figures; pure, shared by the journey and the channel scores."""
    dropped, total = exits
    w = weights.as_dict()
    values = {
        "conversion": (conversion[0], dict(conversion[1])),
        "dropoff": (
            dropoff_value(dropped, total),
            {"dropped": dropped, "exits": total, "dropoff": ratio(dropped, total)},
        ),
        "time_to_goal": (
            time_value(goal_times.median, time_limit),
            {
                "median_seconds": goal_times.median,
                "customers": goal_times.customers,
                "limit_seconds": time_limit,
            },
        ),
        "satisfaction": (
            satisfaction_value(scores.csat, scores.nps),
            {
                "csat": scores.csat,
                "csat_responses": scores.csat_responses,
                "nps": scores.nps,
                "nps_responses": scores.nps_responses,
            },
        ),
    }
    components = tuple(
        Component(name, values[name][0], w[name], values[name][1]) for name in SCORE_COMPONENTS
    )
    return Score(combine({c.name: c.value for c in components}, w), components)


# =========================================================================== queries

PERIOD = (
    "occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}"
)


def _rows(client: Any, sql: str, parameters: Mapping[str, Any]) -> list[Any]:
    return list(client.query(sql, parameters=dict(parameters)).result_rows)


def _numeric(prop_param: str) -> str:
    """SQL for a property's value if it is a JSON number, else NULL (``prop_param`` is bound)."""
    return (
        f"if(JSONType(properties, {prop_param}) IN {_NUMERIC}, "
        f"JSONExtractFloat(properties, {prop_param}), NULL)"
    )


@dataclass(frozen=True, slots=True)
class MeasureQuery:
    """One measured KPI as SQL parts: ``SELECT value FROM table FINAL WHERE conditions AND period``.

    ``params`` binds every ``{name:Type}`` in ``value`` and ``conditions``; the
    names carry the measure's number so that all of a journey's measures can
    run as one UNION ALL query. The Grafana panel inlines the same parts.
    """

    stage: str
    kpi: str
    table: str
    value: str
    conditions: tuple[str, ...]
    params: Mapping[str, Any]

    def where(self) -> str:
        return " AND ".join([*self.conditions, PERIOD])


def measure_queries(journey: Journey) -> list[MeasureQuery]:
    """The SQL of every measured (non-ratio) KPI of the journey, in file order."""
    out: list[MeasureQuery] = []
    names = journey.stage_names
    for stage in journey.stages:
        for kpi in stage.kpis:
            if kpi.kind == "ratio":
                continue
            n = len(out)
            params: dict[str, Any] = {}
            if kpi.kind in ("count", "customers", "sum", "avg"):
                table = "journey.events"
                conditions: tuple[str, ...] = (f"event_type IN {{types{n}:Array(String)}}",)
                params[f"types{n}"] = list(kpi.event_types)
                if kpi.kind == "count":
                    value = "count()"
                elif kpi.kind == "customers":
                    value = "uniqExact(customer)"
                else:
                    params[f"prop{n}"] = kpi.prop
                    v = _numeric(f"{{prop{n}:String}}")
                    agg = "sum" if kpi.kind == "sum" else "avg"
                    value = f"if(count({v}) = 0, NULL, {agg}({v}))"
            elif kpi.kind == "flow":
                table = "journey.transitions"
                target = kpi.stage or stage.name
                params[f"journey{n}"] = journey.name
                value = "uniqExact(customer)"
                if kpi.measure in ("entered", "reached"):
                    stages = (
                        [target] if kpi.measure == "entered" else list(names[names.index(target) :])
                    )
                    params[f"kinds{n}"] = list(ENTRY_KINDS)
                    params[f"stages{n}"] = stages
                    conditions = (
                        f"journey = {{journey{n}:String}}",
                        f"kind IN {{kinds{n}:Array(String)}}",
                        f"to_stage IN {{stages{n}:Array(String)}}",
                    )
                else:
                    params[f"stage{n}"] = target
                    conditions = (
                        f"journey = {{journey{n}:String}}",
                        f"kind = '{'advanced' if kpi.measure == 'advanced' else 'dropped'}'",
                        f"from_stage = {{stage{n}:String}}",
                    )
            else:  # survey
                table = "journey.feedback"
                params[f"journey{n}"] = journey.name
                conditions = (f"journey = {{journey{n}:String}}",)
                if kpi.stage is not None:
                    params[f"stage{n}"] = kpi.stage
                    conditions += (f"stage = {{stage{n}:String}}",)
                value = {
                    "csat": "if(count(csat) = 0, NULL, avg(csat))",
                    "nps": "if(count(nps) = 0, NULL, "
                    "100 * (countIf(nps >= 9) - countIf(nps <= 6)) / count(nps))",
                    "csat_answers": "count(csat)",
                    "nps_answers": "count(nps)",
                }[kpi.measure or ""]
            out.append(MeasureQuery(stage.name, kpi.name, table, value, conditions, params))
    return out


def kpi_sql(queries: Sequence[MeasureQuery]) -> str:
    """All measures as one query: rows (measure number, channel, value); channel '' = all."""
    parts = [
        f"SELECT {n} AS measure, channel, toNullable(toFloat64({q.value})) AS value\n"
        f"FROM {q.table} FINAL\nWHERE {q.where()}\n"
        "GROUP BY GROUPING SETS ((channel), ())"
        for n, q in enumerate(queries)
    ]
    return "\nUNION ALL\n".join(parts)


# What a measure is when nothing matched: counts are 0, means and sums have no value.
def _empty(kpi: Kpi) -> float | None:
    if kpi.kind in ("count", "customers", "flow"):
        return 0.0
    if kpi.kind == "survey" and kpi.measure in ("csat_answers", "nps_answers"):
        return 0.0
    return None


@dataclass
class StageKpis:
    """One stage's KPI values over a period: overall and per channel, in file order."""

    stage: str
    values: dict[str, float | None]
    by_channel: dict[str, dict[str, float | None]]


def stage_kpis(client: Any, journey: Journey, since: datetime, until: datetime) -> list[StageKpis]:
    """Every stage's KPIs (stages without ``kpis:`` have an empty list), one query in all."""
    queries = measure_queries(journey)
    measured: dict[str, dict[str, dict[str, float | None]]] = {}  # stage → channel → kpi
    if queries:
        params: dict[str, Any] = {"since": since, "until": until}
        for q in queries:
            params.update(q.params)
        for n, channel, value in _rows(client, kpi_sql(queries), params):
            q = queries[int(n)]
            cell = measured.setdefault(q.stage, {}).setdefault(channel, {})
            cell[q.kpi] = None if value is None or math.isnan(value) else float(value)
    out = []
    for stage in journey.stages:
        by_channel_raw = measured.get(stage.name, {})
        defaults = {k.name: _empty(k) for k in stage.kpis if k.kind != "ratio"}
        overall = evaluate_kpis(stage.kpis, {**defaults, **by_channel_raw.get("", {})})
        by_channel = {
            ch: evaluate_kpis(stage.kpis, {**defaults, **cells})
            for ch, cells in sorted(by_channel_raw.items())
            if ch
        }
        out.append(StageKpis(stage.name, overall, by_channel))
    return out


CHANNEL_DWELL = f"""
SELECT from_stage, channel, count(), avg(seconds_in_previous),
       quantileExactInclusive(0.9)(seconds_in_previous)
FROM journey.transitions FINAL
WHERE journey = {{journey:String}} AND kind IN ('advanced', 'dropped', 'regressed')
  AND {PERIOD}
GROUP BY from_stage, channel
"""

# Handling time and revenue per channel and event type; Python puts types into stages.
EVENT_VALUES = f"""
SELECT channel, event_type,
       count(duration), sum(duration), count(revenue), sum(revenue)
FROM (
  SELECT channel, event_type,
         if(d >= 0, d, NULL) AS duration, {_numeric("{revenue:String}")} AS revenue
  FROM (
    SELECT channel, event_type, properties, {_numeric("{duration:String}")} AS d
    FROM journey.events FINAL
    WHERE {PERIOD}
      AND (JSONHas(properties, {{duration:String}}) OR JSONHas(properties, {{revenue:String}}))
  )
)
GROUP BY channel, event_type
"""

# Customers who first reached the goal (or a later stage) in the period, per channel of
# that entry and overall (''): how many, and the median seconds since their first entry.
TIME_TO_GOAL = """
SELECT channel, count(), quantileExactInclusive(0.5)(seconds)
FROM (
  SELECT customer,
         min(occurred_at) AS started,
         minIf(occurred_at, to_stage IN {goal_stages:Array(String)}) AS reached_at,
         argMinIf(channel, occurred_at, to_stage IN {goal_stages:Array(String)}) AS channel,
         countIf(to_stage IN {goal_stages:Array(String)}) AS goal_entries,
         (toUnixTimestamp64Milli(reached_at) - toUnixTimestamp64Milli(started)) / 1000 AS seconds
  FROM journey.transitions FINAL
  WHERE journey = {journey:String} AND kind IN {kinds:Array(String)}
    AND occurred_at < {until:DateTime64(3, 'UTC')}
  GROUP BY customer
  HAVING goal_entries > 0 AND reached_at >= {since:DateTime64(3, 'UTC')}
)
GROUP BY GROUPING SETS ((channel), ())
"""


@dataclass
class Inputs:
    """What the score and the channel table read, fetched once per journey and period."""

    funnel: Funnel
    dropoff: Dropoff
    feedback: FeedbackReport
    goal_times: dict[str, GoalTimes]  # by channel of the goal entry; '' = everyone


def fetch_inputs(client: Any, journey: Journey, since: datetime, until: datetime) -> Inputs:
    """The funnel, exits, survey answers and times to goal of one journey over the period."""
    names = journey.stage_names
    goal = journey.scoring.goal
    params = {
        "journey": journey.name,
        "since": since,
        "until": until,
        "kinds": list(ENTRY_KINDS),
        "goal_stages": list(names[names.index(goal) :]),
    }
    # An empty period still has the overall row of the grouping sets: 0 customers, median NaN.
    goal_times = {
        channel: GoalTimes(int(n), float(median))
        for channel, n, median in _rows(client, TIME_TO_GOAL, params)
        if n
    }
    return Inputs(
        funnel(client, journey, since, until),
        dropoff(client, journey, since, until),
        feedback(client, journey, since, until),
        goal_times,
    )


# =========================================================================== assembly


@dataclass(frozen=True, slots=True)
class JourneyScore:
    """A journey's score and each channel's, over one period."""

    journey: str
    goal: str
    score: Score
    channels: dict[str, Score]

    def to_dict(self) -> dict[str, Any]:
        return {"journey": self.journey, "goal": self.goal, **self.score.to_dict()}


def journey_score(journey: Journey, inputs: Inputs) -> JourneyScore:
    """The journey's score and its channels' from the fetched figures; pure."""
    spec = journey.scoring
    names = list(journey.stage_names)
    reached = {s.stage: s.reached for s in inputs.funnel.stages}
    first, goal = reached[names[0]], reached[spec.goal]
    exits = [s.total for s in inputs.dropoff.stages]
    overall = make_score(
        spec.weights,
        (conversion_value(goal, first), {"reached_goal": goal, "reached_first": first}),
        (sum(e.dropped for e in exits), sum(e.exits for e in exits)),
        inputs.goal_times.get("", GoalTimes()),
        spec.time_limit,
        inputs.feedback.total,
    )
    before_goal = [
        s for s in inputs.dropoff.stages if names.index(s.stage) < names.index(spec.goal)
    ]
    channels = sorted(
        {c for s in inputs.dropoff.stages for c in s.by_channel}
        | set(inputs.feedback.by_channel)
        | {c for c in inputs.goal_times if c}
    )
    by_channel: dict[str, Score] = {}
    for channel in channels:
        cells = [s.by_channel.get(channel) for s in inputs.dropoff.stages]
        progressions = [
            cell.advanced / cell.exits if cell is not None and cell.exits else None
            for cell in (s.by_channel.get(channel) for s in before_goal)
        ]
        by_channel[channel] = make_score(
            spec.weights,
            (
                chained_conversion(progressions),
                {
                    "progression_by_stage": dict(
                        zip((s.stage for s in before_goal), progressions, strict=True)
                    )
                },
            ),
            (
                sum(c.dropped for c in cells if c is not None),
                sum(c.exits for c in cells if c is not None),
            ),
            inputs.goal_times.get(channel, GoalTimes()),
            spec.time_limit,
            inputs.feedback.by_channel.get(channel, Scores()),
        )
    return JourneyScore(journey.name, spec.goal, overall, by_channel)


@dataclass
class ChannelCell:
    """One channel at one stage: how it carries customers, how long, how happy, how much."""

    advanced: int = 0
    dropped: int = 0
    dwell_count: int = 0
    dwell_avg: float | None = None
    dwell_p90: float | None = None
    survey: Scores = field(default_factory=Scores)
    handled: int = 0  # events with a duration
    handling_sum: float = 0.0
    revenue: float | None = None
    consistency_effect: float | None = None

    def to_dict(self) -> dict[str, Any]:
        exits = self.advanced + self.dropped
        return {
            "exits": exits,
            "advanced": self.advanced,
            "dropped": self.dropped,
            "progression": ratio(self.advanced, exits),
            "dropoff": ratio(self.dropped, exits),
            "time_in_stage": {
                "count": self.dwell_count,
                "avg": self.dwell_avg,
                "p90": self.dwell_p90,
            },
            "csat": self.survey.csat,
            "csat_responses": self.survey.csat_responses,
            "nps": self.survey.nps,
            "nps_responses": self.survey.nps_responses,
            "handling_time": ratio(self.handling_sum, self.handled),
            "handled_events": self.handled,
            "revenue": self.revenue,
            "consistency_effect": self.consistency_effect,
        }


def _stage_of_types(journey: Journey) -> dict[str, str]:
    """Event type → the furthest stage whose event list names it (conditions aside)."""
    out: dict[str, str] = {}
    for stage in journey.stages:
        for rule in stage.rules:
            out[rule.event_type] = stage.name
    return out


def channel_performance(
    client: Any,
    journey: Journey,
    since: datetime,
    until: datetime,
    inputs: Inputs,
    min_exits: int = MIN_EXITS,
) -> dict[str, dict[str, ChannelCell]]:
    """Stage → channel → figures; every stage of the journey is there, maybe without channels."""
    cells: dict[str, dict[str, ChannelCell]] = {name: {} for name in journey.stage_names}

    def cell(stage: str, channel: str) -> ChannelCell:
        return cells[stage].setdefault(channel, ChannelCell())

    for s in inputs.dropoff.stages:
        counts = {c: (e.advanced, e.exits) for c, e in s.by_channel.items()}
        effects = consistency_effects(counts, min_exits)
        for channel, e in s.by_channel.items():
            c = cell(s.stage, channel)
            c.advanced, c.dropped = e.advanced, e.dropped
            c.consistency_effect = effects[channel]
    params = {"journey": journey.name, "since": since, "until": until}
    for stage, channel, n, avg, p90 in _rows(client, CHANNEL_DWELL, params):
        if stage in cells:
            c = cell(stage, channel)
            c.dwell_count, c.dwell_avg, c.dwell_p90 = int(n), float(avg), float(p90)
    for st in inputs.feedback.stages:
        if st.stage is not None:
            for channel, scores in st.by_channel.items():
                cell(st.stage, channel).survey = scores
    stage_of = _stage_of_types(journey)
    values = {**params, "duration": DURATION_PROPERTY, "revenue": REVENUE_PROPERTY}
    for channel, event_type, n_d, sum_d, n_r, sum_r in _rows(client, EVENT_VALUES, values):
        stage = stage_of.get(event_type)
        if stage is None:
            continue
        c = cell(stage, channel)
        c.handled += int(n_d)
        c.handling_sum += float(sum_d or 0.0)
        if n_r:
            c.revenue = (c.revenue or 0.0) + float(sum_r)
    return {stage: dict(sorted(by.items())) for stage, by in cells.items()}


def scorecard(
    client: Any,
    journey: Journey,
    since: datetime,
    until: datetime,
    now: datetime,
    min_exits: int = MIN_EXITS,
) -> dict[str, Any]:
    """The scorecard of one journey as one JSON-ready dict (the ``scorecard`` key of a report).

    ``now`` only decides the previous period of an open-ended one (see ``previous_period``).
    """
    inputs = fetch_inputs(client, journey, since, until)
    score = journey_score(journey, inputs)
    before = previous_period(since, until, now)
    previous_kpis: dict[str, StageKpis] = {}
    previous_score: float | None = None
    if before is not None:
        previous_kpis = {s.stage: s for s in stage_kpis(client, journey, *before)}
        previous_score = journey_score(journey, fetch_inputs(client, journey, *before)).score.score
    performance = channel_performance(client, journey, since, until, inputs, min_exits)
    current = stage_kpis(client, journey, since, until)
    stages = []
    for stage, values in zip(journey.stages, current, strict=True):
        cells = performance[stage.name]
        worst = worst_channel(
            {ch: (c.advanced, c.advanced + c.dropped) for ch, c in cells.items()}, min_exits
        )
        stages.append(
            {
                "stage": stage.name,
                "kpis": _kpi_rows(stage.kpis, values, previous_kpis.get(stage.name)),
                "worst_channel": None if worst is None else worst.to_dict(),
                "channels": {ch: c.to_dict() for ch, c in cells.items()},
            }
        )
    channel_rank = sorted(
        score.channels.items(), key=lambda kv: (kv[1].score is None, -(kv[1].score or 0.0), kv[0])
    )
    return {
        "journey": journey.name,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "previous_period": None
        if before is None
        else {"since": before[0].isoformat(), "until": before[1].isoformat()},
        "min_exits": min_exits,
        "goal": score.goal,
        "time_limit": journey.scoring.time_limit,
        **score.score.to_dict(),
        "previous_score": previous_score,
        "score_change": compare(score.score.score, previous_score).to_dict(),
        "channels": [
            {"channel": ch, "rank": i + 1, **s.to_dict()} for i, (ch, s) in enumerate(channel_rank)
        ],
        "stages": stages,
        "most_lost": _most_lost(inputs.dropoff),
    }


def _kpi_rows(
    kpis: Sequence[Kpi], current: StageKpis, previous: StageKpis | None
) -> list[dict[str, Any]]:
    """A stage's KPIs with their previous-period values and how they changed."""
    rows = []
    for k in kpis:
        value = current.values[k.name]
        earlier = previous.values[k.name] if previous is not None else None
        rows.append(
            {
                "name": k.name,
                "kind": k.kind,
                "unit": k.unit,
                "better": k.better,
                "value": value,
                "previous": earlier,
                **compare(value, earlier, k.better).to_dict(),
                "by_channel": {ch: v[k.name] for ch, v in current.by_channel.items()},
            }
        )
    return rows


def _most_lost(exits: Dropoff) -> dict[str, Any] | None:
    """The stage with most drop-offs (the earlier one on a tie); None if nobody dropped."""
    losing = [s for s in exits.stages if s.total.dropped]
    if not losing:
        return None
    worst = max(losing, key=lambda s: s.total.dropped)  # max() keeps the first of equals
    return {"stage": worst.stage, **worst.total.to_dict()}


@dataclass(frozen=True, slots=True)
class LiveValues:
    """What the worker's score gauges export; only figures that exist, keyed by their labels."""

    scores: dict[str, float]
    components: dict[tuple[str, str], float]
    channels: dict[tuple[str, str], float]


def live_values(scores: Iterable[JourneyScore]) -> LiveValues:
    """Journey scores as gauge samples: journey, (journey, component), (journey, channel)."""
    out = LiveValues({}, {}, {})
    for s in scores:
        if s.score.score is not None:
            out.scores[s.journey] = s.score.score
        for c in s.score.components:
            if c.value is not None:
                out.components[(s.journey, c.name)] = c.value
        for channel, score in s.channels.items():
            if score.score is not None:
                out.channels[(s.journey, channel)] = score.score
    return out


def live_scores(
    client: Any, journeys: Sequence[Journey], since: datetime, until: datetime
) -> LiveValues:
    """Every journey's score over the window, ready for the gauges (the worker's timer)."""
    return live_values(journey_score(j, fetch_inputs(client, j, since, until)) for j in journeys)


def rank(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reports with a ``scorecard``, best score first (no score last), each given its ``rank``."""
    ordered = sorted(
        reports,
        key=lambda r: (r["scorecard"]["score"] is None, -(r["scorecard"]["score"] or 0.0)),
    )
    out = []
    for i, report in enumerate(ordered, start=1):
        out.append({**report, "scorecard": {**report["scorecard"], "rank": i}})
    return out


# =========================================================================== rendering


def format_value(value: float | None, unit: str = "number") -> str:
    """A KPI as a table shows it: percent, a duration, or a number (integers without decimals)."""
    if value is None:
        return MISSING
    if unit == "percent":
        return f"{value:.1%}"
    if unit == "seconds":
        return human_duration(value)
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def format_change(change: Mapping[str, Any]) -> str:
    """``↑ 12.5%`` green when better, red when worse; ``=`` unchanged; ``–`` nothing to compare."""
    direction = change.get("direction")
    if direction is None:
        return MISSING
    if direction == "same":
        return "="
    arrow = "↑" if direction == "up" else "↓"
    relative = change.get("relative")
    text = f"{arrow} {abs(relative):.1%}" if relative is not None else arrow
    colour = "green" if change.get("improved") else "red"
    return f"[{colour}]{text}[/{colour}]"


def _score_text(score: float | None) -> str:
    return MISSING if score is None else f"{score:.1f}"


def _component_text(name: str, component: Mapping[str, Any]) -> str:
    """A component's raw figure: what a person would quote, not its 0–1 value."""
    if name == "conversion":
        reached = component.get("reached_first")
        if reached is None:  # a channel: the chained progression
            return format_value(component["value"], "percent")
        return (
            f"{format_value(component['value'], 'percent')} ({component['reached_goal']}/{reached})"
        )
    if name == "dropoff":
        return f"{format_value(component['dropoff'], 'percent')} ({component['exits']} exits)"
    if name == "time_to_goal":
        return f"{human_duration(component['median_seconds'])} ({component['customers']})"
    csat, nps = component["csat"], component["nps"]
    if csat is None and nps is None:
        return MISSING
    return f"CSAT {format_value(csat)} · NPS {MISSING if nps is None else f'{nps:+.0f}'}"


def render_scorecards(
    reports: Sequence[Mapping[str, Any]], channels: Sequence[str], console: Console
) -> None:
    """`journey report --scorecard`: journeys ranked, then each journey's scorecard."""
    ranked = [r["scorecard"] for r in reports if "scorecard" in r]
    table = Table(title="Journeys ranked by score (0–100)", title_justify="left")
    for name in ("rank", "journey", "score", "vs previous", "goal"):
        table.add_column(name, justify="right" if name in ("rank", "score") else "left")
    for name in ("conversion", "drop-off", "time to goal (median)", "satisfaction"):
        table.add_column(name, justify="right")
    for card in ranked:
        table.add_row(
            str(card.get("rank", "")),
            card["journey"],
            _score_text(card["score"]),
            format_change(card["score_change"]),
            card["goal"],
            *(_component_text(c, card["components"][c]) for c in SCORE_COMPONENTS),
        )
    console.print(table)
    console.print(
        "[dim]score = 100 × weighted mean of the components (each 0–1, 1 best) that have data; "
        "time to goal and satisfaction in brackets: customers / answers behind them[/dim]"
    )
    for card in ranked:
        _render_card(card, channels, console)


def _render_card(card: Mapping[str, Any], channels: Sequence[str], console: Console) -> None:
    journey = card["journey"]
    weights = ", ".join(f"{c} {card['components'][c]['weight']:g}" for c in SCORE_COMPONENTS)
    console.print(f"\n[bold]Scorecard — journey {journey}[/bold] (weights: {weights})")

    table = Table(title=f"Channels ranked — journey {journey}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("channel")
    table.add_column("score", justify="right")
    for name in ("conversion to goal", "drop-off", "time to goal", "satisfaction"):
        table.add_column(name, justify="right")
    for ch in card["channels"]:
        table.add_row(
            str(ch["rank"]),
            ch["channel"],
            _score_text(ch["score"]),
            *(_component_text(c, ch["components"][c]) for c in SCORE_COMPONENTS),
        )
    console.print(table)

    period = card["previous_period"]
    against = (
        f"previous period {period['since'][:19]} – {period['until'][:19]}"
        if period
        else "no previous period for all of history; use --days or --since/--until"
    )
    table = Table(title=f"Stage KPIs — journey {journey} (vs {against})", title_justify="left")
    for name in ("stage", "KPI", "value", "previous", "change"):
        table.add_column(name, justify="left" if name in ("stage", "KPI") else "right")
    for stage in card["stages"]:
        for i, k in enumerate(stage["kpis"]):
            table.add_row(
                stage["stage"] if i == 0 else "",
                k["name"],
                format_value(k["value"], k["unit"]),
                format_value(k["previous"], k["unit"]),
                format_change(k),
            )
    if any(s["kpis"] for s in card["stages"]):
        console.print(table)
    else:
        console.print(f"[dim]Journey {journey} declares no stage KPIs (kpis: in the file).[/dim]")

    table = Table(title=f"Channel performance by stage — journey {journey}", title_justify="left")
    for name in ("stage", "channel"):
        table.add_column(name)
    for name in (
        "exits",
        "progression",
        "drop-off",
        "avg time",
        "p90 time",
        "CSAT",
        "NPS",
        "handling",
        "revenue",
        "consistency ±",
    ):
        table.add_column(name, justify="right")
    for stage in card["stages"]:
        ordered = [c for c in channels if c in stage["channels"]]
        ordered += sorted(set(stage["channels"]) - set(channels))
        for i, ch in enumerate(ordered):
            c = stage["channels"][ch]
            nps = c["nps"]
            effect = c["consistency_effect"]
            table.add_row(
                stage["stage"] if i == 0 else "",
                ch,
                str(c["exits"]),
                format_value(c["progression"], "percent"),
                format_value(c["dropoff"], "percent"),
                human_duration(c["time_in_stage"]["avg"]),
                human_duration(c["time_in_stage"]["p90"]),
                format_value(c["csat"]),
                MISSING if nps is None else f"{nps:+.0f}",
                human_duration(c["handling_time"]),
                format_value(c["revenue"]),
                MISSING if effect is None else f"{effect:+.2f}",
            )
    console.print(table)
    console.print(
        "[dim]handling: mean `duration` of the channel's events of the stage; revenue: sum of "
        "`order_value`; consistency ±: the stage's index with the channel minus without it[/dim]"
    )

    console.print(f"[bold]Where to look — journey {journey}[/bold]")
    lost = card["most_lost"]
    if lost is None:
        console.print("  Nobody dropped off in this period.")
    else:
        console.print(
            f"  Most customers are lost at [bold]{lost['stage']}[/bold]: {lost['dropped']} dropped "
            f"({format_value(lost['dropoff'], 'percent')} of {lost['exits']} exits)."
        )
    for stage in card["stages"]:
        w = stage["worst_channel"]
        if w is None:
            continue
        note = " [dim](few exits: every channel compared)[/dim]" if w["low_volume"] else ""
        console.print(
            f"  {stage['stage']}: [bold]{w['channel']}[/bold] carries "
            f"{format_value(w['progression'], 'percent')} forward, {w['gap'] * 100:.1f} points "
            f"below the other channels ({format_value(w['others'], 'percent')}) over "
            f"{w['exits']} exits{note}"
        )


__all__ = [
    "CHANNEL_DWELL",
    "EVENT_VALUES",
    "TIME_TO_GOAL",
    "Change",
    "Component",
    "GoalTimes",
    "Inputs",
    "JourneyScore",
    "LiveValues",
    "MeasureQuery",
    "Score",
    "StageKpis",
    "WorstChannel",
    "chained_conversion",
    "channel_performance",
    "combine",
    "compare",
    "consistency_effects",
    "conversion_value",
    "dropoff_value",
    "evaluate_kpis",
    "fetch_inputs",
    "journey_score",
    "kpi_sql",
    "live_scores",
    "live_values",
    "make_score",
    "measure_queries",
    "previous_period",
    "rank",
    "ratio",
    "render_scorecards",
    "satisfaction_value",
    "scorecard",
    "stage_kpis",
    "time_value",
    "worst_channel",
]
