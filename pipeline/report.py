"""`journey report`: funnel, drop-off, time in stage, hand-offs, consistency and
survey scores from ClickHouse, as terminal tables or one JSON document.

Every query is parameterised (never formatted from data) and reads with
``FINAL``, so a batch replayed after a crash is not counted twice. Definitions:

- funnel: per stage, the distinct customers who entered it and those who got
  at least that far (entered it or any later stage, so skips count), and the
  conversion between consecutive stages on the latter;
- an *exit* from stage S is an ``advanced`` or ``dropped`` transition with
  ``from_stage`` S, on the channel of the customer's last event in S, counted
  in the period by its ``occurred_at`` (a drop's is its deadline);
  drop-off = dropped / exits;
- time in stage: ``seconds_in_previous`` of ``advanced``, ``dropped`` and
  ``regressed`` transitions, exact percentiles (linear interpolation, as
  numpy's default);
- hand-offs from ``journey.handoffs`` by their own time; the outcome columns
  count exits whose ``handoff_from``/``handoff_to`` name the pair;
- consistency per stage: ``pipeline.consistency`` over each channel's
  (advanced, exits), and ``CONSISTENCY_SQL``, the same index in SQL alone;
- CSAT: the mean answer; NPS: % promoters (9–10) − % detractors (0–6) of the
  NPS answers, from -100 to 100.

Stages the journey file no longer has are left out, as in the funnel.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.consistency import MIN_EXITS, consistency_index, progression_ratios
from pipeline.journeys import Journey
from pipeline.stages import ENTRY_KINDS

# "All of history": the bounds of ClickHouse's DateTime64.
REPORT_START = datetime(1970, 1, 1, tzinfo=UTC)
REPORT_END = datetime(2299, 12, 31, tzinfo=UTC)


# What a table shows where there is no number: nobody there, no answers, no index.
MISSING = "–"

ENTRIES_BY_CHANNEL = """
SELECT to_stage, channel, uniqExact(customer)
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN {kinds:Array(String)}
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY to_stage, channel
"""

ENTERED = """
SELECT to_stage, uniqExact(customer)
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN {kinds:Array(String)}
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY to_stage
"""

FURTHEST = """
SELECT furthest, count() FROM (
  SELECT customer, max(indexOf({stages:Array(String)}, to_stage)) AS furthest
  FROM journey.transitions FINAL
  WHERE journey = {journey:String} AND kind IN {kinds:Array(String)}
    AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  GROUP BY customer
) GROUP BY furthest
"""

# {channel:String} = '' means every channel.
EXITS_BY_CHANNEL = """
SELECT from_stage, channel, countIf(kind = 'advanced'), countIf(kind = 'dropped')
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped')
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  AND ({channel:String} = '' OR channel = {channel:String})
GROUP BY from_stage, channel
"""

# Percentiles do not add up, so the per-stage row is its own grouping set (kind = '').
TIME_IN_STAGE = """
SELECT from_stage, kind, count(),
       quantilesExactInclusive(0.5, 0.9, 0.99)(seconds_in_previous)
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped', 'regressed')
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  AND ({channel:String} = '' OR channel = {channel:String})
GROUP BY GROUPING SETS ((from_stage, kind), (from_stage))
"""

HANDOFF_COUNTS = """
SELECT from_channel, to_channel, count()
FROM journey.handoffs FINAL
WHERE journey = {journey:String}
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  AND ({channel:String} = '' OR from_channel = {channel:String} OR to_channel = {channel:String})
GROUP BY from_channel, to_channel
"""

HANDOFF_OUTCOMES = """
SELECT handoff_from, handoff_to, countIf(kind = 'advanced'), countIf(kind = 'dropped')
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped') AND handoff_from != ''
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  AND ({channel:String} = '' OR handoff_from = {channel:String} OR handoff_to = {channel:String})
GROUP BY handoff_from, handoff_to
"""

# The consistency index in SQL alone, for a dashboard (Grafana's ClickHouse
# source) to run: the same definition as pipeline.consistency, tested to agree.
# One row per stage with at least one channel of >= min_exits exits; consistency
# is NULL with fewer than two such channels. stddevPopStable, not stddevPop:
# the fast one can cancel to a tiny negative variance and return NaN.
CONSISTENCY_SQL = """
SELECT stage, channels,
       if(channels < 2, NULL,
          if(mean = 0, 1., greatest(0., least(1., 1. - sigma / mean)))) AS consistency
FROM (
  SELECT stage, count() AS channels, avg(ratio) AS mean, stddevPopStable(ratio) AS sigma
  FROM (
    SELECT from_stage AS stage, channel, countIf(kind = 'advanced') / count() AS ratio
    FROM journey.transitions FINAL
    WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped')
      AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
    GROUP BY from_stage, channel
    HAVING count() >= {min_exits:UInt32}
  )
  GROUP BY stage
)
ORDER BY stage
"""

FEEDBACK = """
SELECT stage, channel, count(csat), sum(csat), count(nps), countIf(nps >= 9), countIf(nps <= 6)
FROM journey.feedback FINAL
WHERE journey = {journey:String}
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
  AND ({channel:String} = '' OR channel = {channel:String})
GROUP BY stage, channel
"""


def _rows(client: Any, sql: str, parameters: dict[str, Any]) -> list[Any]:
    return list(client.query(sql, parameters=parameters).result_rows)


def _params(
    journey: Journey, since: datetime, until: datetime, channel: str | None = None
) -> dict[str, Any]:
    return {"journey": journey.name, "since": since, "until": until, "channel": channel or ""}


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# ---------------------------------------------------------------- funnel


@dataclass
class StageRow:
    stage: str
    entered: int = 0
    reached: int = 0
    conversion: float | None = None
    by_channel: dict[str, int] = field(default_factory=dict)


@dataclass
class Funnel:
    journey: str
    stages: list[StageRow]

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            "stages": [
                {
                    "stage": s.stage,
                    "entered": s.entered,
                    "reached": s.reached,
                    "conversion": s.conversion,
                    "by_channel": s.by_channel,
                }
                for s in self.stages
            ],
        }


def funnel(client: Any, journey: Journey, since: datetime, until: datetime) -> Funnel:
    params: dict[str, Any] = {
        "journey": journey.name,
        "kinds": list(ENTRY_KINDS),
        "since": since,
        "until": until,
    }
    names = list(journey.stage_names)
    rows = {name: StageRow(name) for name in names}
    for stage, count in _rows(client, ENTERED, params):
        if stage in rows:
            rows[stage].entered = int(count)
    for stage, channel, count in _rows(client, ENTRIES_BY_CHANNEL, params):
        if stage in rows:
            rows[stage].by_channel[channel] = int(count)
    furthest_counts = {
        int(i): int(n) for i, n in _rows(client, FURTHEST, {**params, "stages": names})
    }
    for position, name in enumerate(names, start=1):
        rows[name].reached = sum(n for i, n in furthest_counts.items() if i >= position)
    ordered = [rows[n] for n in names]
    for previous, current in itertools.pairwise(ordered):
        current.conversion = current.reached / previous.reached if previous.reached else None
    return Funnel(journey.name, ordered)


# ---------------------------------------------------------------- drop-off


@dataclass
class Exits:
    """Exits from one stage (on one channel, or all): advanced + dropped."""

    advanced: int = 0
    dropped: int = 0

    @property
    def exits(self) -> int:
        return self.advanced + self.dropped

    @property
    def dropoff(self) -> float | None:
        return _ratio(self.dropped, self.exits)

    def __add__(self, other: Exits) -> Exits:
        return Exits(self.advanced + other.advanced, self.dropped + other.dropped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "exits": self.exits,
            "advanced": self.advanced,
            "dropped": self.dropped,
            "dropoff": self.dropoff,
        }


@dataclass
class StageDropoff:
    stage: str
    total: Exits
    by_channel: dict[str, Exits]


@dataclass
class Dropoff:
    journey: str
    stages: list[StageDropoff]

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            "stages": [
                {
                    "stage": s.stage,
                    **s.total.to_dict(),
                    "by_channel": {c: e.to_dict() for c, e in s.by_channel.items()},
                }
                for s in self.stages
            ],
        }


def _exits(
    client: Any, journey: Journey, since: datetime, until: datetime, channel: str | None
) -> dict[str, dict[str, Exits]]:
    """Exits per stage and channel; every stage of the journey is there, maybe empty."""
    exits: dict[str, dict[str, Exits]] = {name: {} for name in journey.stage_names}
    params = _params(journey, since, until, channel)
    for stage, ch, advanced, dropped in _rows(client, EXITS_BY_CHANNEL, params):
        if stage in exits:
            exits[stage][ch] = Exits(int(advanced), int(dropped))
    return exits


def dropoff(
    client: Any, journey: Journey, since: datetime, until: datetime, channel: str | None = None
) -> Dropoff:
    """Exits, drops and drop-off ratio per stage, overall and per channel."""
    stages = [
        StageDropoff(stage, sum(by_channel.values(), Exits()), dict(sorted(by_channel.items())))
        for stage, by_channel in _exits(client, journey, since, until, channel).items()
    ]
    return Dropoff(journey.name, stages)


# ---------------------------------------------------------------- time in stage


@dataclass
class Dwell:
    """How long exits spent in the stage, in seconds; percentiles None without exits."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass
class StageDwell:
    stage: str
    overall: Dwell
    by_outcome: dict[str, Dwell]  # advanced and dropped always; regressed when there were any


@dataclass
class TimeInStage:
    journey: str
    stages: list[StageDwell]

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            "stages": [
                {
                    "stage": s.stage,
                    **s.overall.to_dict(),
                    "by_outcome": {k: d.to_dict() for k, d in s.by_outcome.items()},
                }
                for s in self.stages
            ],
        }


def time_in_stage(
    client: Any, journey: Journey, since: datetime, until: datetime, channel: str | None = None
) -> TimeInStage:
    """p50/p90/p99 of time spent in each stage by its leavers, overall and by outcome."""
    stages = {
        name: StageDwell(name, Dwell(), {"advanced": Dwell(), "dropped": Dwell()})
        for name in journey.stage_names
    }
    params = _params(journey, since, until, channel)
    for stage, kind, count, quantiles in _rows(client, TIME_IN_STAGE, params):
        if stage not in stages:
            continue
        p50, p90, p99 = (float(q) for q in quantiles)
        dwell = Dwell(int(count), p50, p90, p99)
        if kind == "":
            stages[stage].overall = dwell
        else:
            stages[stage].by_outcome[kind] = dwell
    return TimeInStage(journey.name, list(stages.values()))


# ---------------------------------------------------------------- hand-offs


@dataclass
class HandoffPair:
    """Hand-offs from one channel to another, and how the exits after them went."""

    from_channel: str
    to_channel: str
    handoffs: int = 0
    advanced: int = 0
    dropped: int = 0

    @property
    def progression(self) -> float | None:
        return _ratio(self.advanced, self.advanced + self.dropped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_channel": self.from_channel,
            "to_channel": self.to_channel,
            "handoffs": self.handoffs,
            "advanced": self.advanced,
            "dropped": self.dropped,
            "progression": self.progression,
        }


@dataclass
class HandoffMatrix:
    journey: str
    pairs: list[HandoffPair]  # busiest first

    def to_dict(self) -> dict[str, Any]:
        return {"journey": self.journey, "pairs": [p.to_dict() for p in self.pairs]}


def handoffs(
    client: Any, journey: Journey, since: datetime, until: datetime, channel: str | None = None
) -> HandoffMatrix:
    """Hand-offs per (from, to) channel pair; with ``channel``, the pairs it is part of."""
    params = _params(journey, since, until, channel)
    pairs: dict[tuple[str, str], HandoffPair] = {}
    for source, target, count in _rows(client, HANDOFF_COUNTS, params):
        pairs[(source, target)] = HandoffPair(source, target, handoffs=int(count))
    for source, target, advanced, dropped in _rows(client, HANDOFF_OUTCOMES, params):
        pair = pairs.setdefault((source, target), HandoffPair(source, target))
        pair.advanced, pair.dropped = int(advanced), int(dropped)
    ordered = sorted(
        pairs.values(),
        key=lambda p: (-p.handoffs, -(p.advanced + p.dropped), p.from_channel, p.to_channel),
    )
    return HandoffMatrix(journey.name, ordered)


# ---------------------------------------------------------------- consistency


@dataclass
class StageConsistency:
    stage: str
    index: float | None
    counts: dict[str, tuple[int, int]]  # channel → (advanced, exits)
    ratios: dict[str, float]  # the channels with enough exits to count

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "index": self.index,
            "by_channel": {
                c: {"advanced": a, "exits": e, "ratio": self.ratios.get(c)}
                for c, (a, e) in self.counts.items()
            },
        }


@dataclass
class Consistency:
    journey: str
    min_exits: int
    stages: list[StageConsistency]

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            "min_exits": self.min_exits,
            "stages": [s.to_dict() for s in self.stages],
        }


def consistency(
    client: Any, journey: Journey, since: datetime, until: datetime, min_exits: int = MIN_EXITS
) -> Consistency:
    """The cross-channel consistency index of every stage over the period.

    No channel filter: the index compares channels with each other.
    """
    stages = []
    for stage, by_channel in _exits(client, journey, since, until, None).items():
        counts = {c: (e.advanced, e.exits) for c, e in sorted(by_channel.items())}
        stages.append(
            StageConsistency(
                stage,
                consistency_index(counts, min_exits),
                counts,
                progression_ratios(counts, min_exits),
            )
        )
    return Consistency(journey.name, min_exits, stages)


def consistency_sql(
    client: Any, journey: Journey, since: datetime, until: datetime, min_exits: int = MIN_EXITS
) -> dict[str, float | None]:
    """The index per stage as ``CONSISTENCY_SQL`` computes it (None: no index)."""
    params = {**_params(journey, since, until), "min_exits": min_exits}
    index: dict[str, float | None] = dict.fromkeys(journey.stage_names)
    for stage, _channels, value in _rows(client, CONSISTENCY_SQL, params):
        if stage in index:
            index[stage] = None if value is None else float(value)
    return index


# ---------------------------------------------------------------- CSAT and NPS


@dataclass
class Scores:
    """Survey answers summed so that stages and channels add up exactly."""

    csat_responses: int = 0
    csat_sum: float = 0.0
    nps_responses: int = 0
    promoters: int = 0
    detractors: int = 0

    @property
    def csat(self) -> float | None:
        return _ratio(self.csat_sum, self.csat_responses)

    @property
    def nps(self) -> float | None:
        if not self.nps_responses:
            return None
        return 100.0 * (self.promoters - self.detractors) / self.nps_responses

    def __add__(self, other: Scores) -> Scores:
        return Scores(
            self.csat_responses + other.csat_responses,
            self.csat_sum + other.csat_sum,
            self.nps_responses + other.nps_responses,
            self.promoters + other.promoters,
            self.detractors + other.detractors,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "csat": self.csat,
            "csat_responses": self.csat_responses,
            "nps": self.nps,
            "nps_responses": self.nps_responses,
            "promoters": self.promoters,
            "detractors": self.detractors,
        }


@dataclass
class StageScores:
    stage: str | None  # None: answers given while in no stage of the journey
    total: Scores
    by_channel: dict[str, Scores]


@dataclass
class FeedbackReport:
    journey: str
    stages: list[StageScores]  # the journey's stages in order, then None if anyone answered there
    by_channel: dict[str, Scores]
    total: Scores

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            **self.total.to_dict(),
            "by_channel": {c: s.to_dict() for c, s in self.by_channel.items()},
            "stages": [
                {
                    "stage": s.stage,
                    **s.total.to_dict(),
                    "by_channel": {c: x.to_dict() for c, x in s.by_channel.items()},
                }
                for s in self.stages
            ],
        }


def feedback(
    client: Any, journey: Journey, since: datetime, until: datetime, channel: str | None = None
) -> FeedbackReport:
    """CSAT (mean) and NPS per stage and channel, per channel, and overall."""
    cells: dict[str, dict[str, Scores]] = {name: {} for name in journey.stage_names}
    cells[""] = {}
    for stage, ch, csat_n, csat_sum, nps_n, promoters, detractors in _rows(
        client, FEEDBACK, _params(journey, since, until, channel)
    ):
        if stage in cells:
            cells[stage][ch] = Scores(
                int(csat_n), float(csat_sum or 0.0), int(nps_n), int(promoters), int(detractors)
            )
    stages = [
        StageScores(
            stage or None, sum(by_channel.values(), Scores()), dict(sorted(by_channel.items()))
        )
        for stage, by_channel in cells.items()
        if stage or by_channel
    ]
    by_channel: dict[str, Scores] = {}
    for s in stages:
        for ch, scores in s.by_channel.items():
            by_channel[ch] = by_channel.get(ch, Scores()) + scores
    total = sum((s.total for s in stages), Scores())
    return FeedbackReport(journey.name, stages, dict(sorted(by_channel.items())), total)


# ---------------------------------------------------------------- everything


def journey_report(
    client: Any, journey: Journey, since: datetime, until: datetime, min_exits: int = MIN_EXITS
) -> dict[str, Any]:
    """The whole report of one journey as one JSON-ready dict, for the CLI and the worker.

    The funnel's keys (``journey``, ``stages``) stay at the top level, so
    readers of the funnel-only report keep working.
    """
    return {
        **funnel(client, journey, since, until).to_dict(),
        "since": since.isoformat(),
        "until": until.isoformat(),
        "dropoff": dropoff(client, journey, since, until).to_dict(),
        "time_in_stage": time_in_stage(client, journey, since, until).to_dict(),
        "handoffs": handoffs(client, journey, since, until).to_dict(),
        "consistency": consistency(client, journey, since, until, min_exits).to_dict(),
        "feedback": feedback(client, journey, since, until).to_dict(),
    }


# ---------------------------------------------------------------- rendering


def human_duration(seconds: float | None) -> str:
    """``3h 12m``: the two largest units, to the second; ``–`` for no value."""
    if seconds is None:
        return MISSING
    total = round(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1%}"


def _number(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _ordered_channels(channels: Sequence[str], seen: set[str]) -> list[str]:
    """Configured channels first in their order, then any others the data has."""
    return [c for c in channels if c in seen] + sorted(seen - set(channels))


def render(reports: Sequence[Mapping[str, Any]], channels: Sequence[str], console: Console) -> None:
    """Print each journey's report; sections a worker did not send are skipped."""
    for report in reports:
        _render_funnel(report, channels, console)
        if not any(s["reached"] for s in report["stages"]):
            console.print("[dim]No transitions in this period yet.[/dim]")
        if "dropoff" in report:
            _render_dropoff(report["dropoff"], channels, console)
        if "time_in_stage" in report:
            _render_time_in_stage(report["time_in_stage"], console)
        if "handoffs" in report:
            _render_handoffs(report["handoffs"], console)
        if "consistency" in report:
            _render_consistency(report["consistency"], channels, console)
        if "feedback" in report:
            _render_feedback(report["feedback"], channels, console)


def _render_funnel(report: Mapping[str, Any], channels: Sequence[str], console: Console) -> None:
    stages = report["stages"]
    seen = _ordered_channels(channels, {c for s in stages for c in s["by_channel"]})
    table = Table(title=f"Funnel — journey {report['journey']}", title_justify="left")
    table.add_column("stage")
    table.add_column("entered", justify="right")
    table.add_column("reached (or beyond)", justify="right")
    table.add_column("conversion", justify="right")
    for c in seen:
        table.add_column(f"via {c}", justify="right")
    for s in stages:
        table.add_row(
            s["stage"],
            str(s["entered"]),
            str(s["reached"]),
            _percent(s["conversion"]),
            *(str(s["by_channel"].get(c, 0)) for c in seen),
        )
    console.print(table)


def _render_dropoff(section: Mapping[str, Any], channels: Sequence[str], console: Console) -> None:
    stages = section["stages"]
    seen = _ordered_channels(channels, {c for s in stages for c in s["by_channel"]})
    table = Table(
        title=f"Drop-off by stage and channel — journey {section['journey']}",
        title_justify="left",
    )
    table.add_column("stage")
    table.add_column("exits", justify="right")
    table.add_column("dropped", justify="right")
    table.add_column("drop-off", justify="right")
    for c in seen:
        table.add_column(c, justify="right")
    for s in stages:
        cells = []
        for c in seen:
            cell = s["by_channel"].get(c)
            cells.append(
                MISSING if cell is None else f"{_percent(cell['dropoff'])} ({cell['exits']})"
            )
        table.add_row(
            s["stage"], str(s["exits"]), str(s["dropped"]), _percent(s["dropoff"]), *cells
        )
    console.print(table)
    if seen:
        console.print("[dim]per channel: drop-off (exits)[/dim]")


def _render_time_in_stage(section: Mapping[str, Any], console: Console) -> None:
    table = Table(title=f"Time in stage — journey {section['journey']}", title_justify="left")
    for name in ("stage", "leavers"):
        table.add_column(name)
    for name in ("count", "p50", "p90", "p99"):
        table.add_column(name, justify="right")
    for s in section["stages"]:
        # A stage nobody left gets one line of dashes, not one per outcome.
        rows = [("all", s), *s["by_outcome"].items()] if s["count"] else [("all", s)]
        for i, (outcome, d) in enumerate(rows):
            table.add_row(
                s["stage"] if i == 0 else "",
                outcome,
                str(d["count"]),
                *(human_duration(d[p]) for p in ("p50", "p90", "p99")),
            )
    console.print(table)


def _render_handoffs(section: Mapping[str, Any], console: Console) -> None:
    title = f"Channel hand-offs — journey {section['journey']}"
    if not section["pairs"]:
        console.print(f"{title}: [dim]no hand-offs in this period.[/dim]")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("from → to")
    for name in ("hand-offs", "exits after", "advanced", "dropped", "progression"):
        table.add_column(name, justify="right")
    for p in section["pairs"]:
        table.add_row(
            f"{p['from_channel']} → {p['to_channel']}",
            str(p["handoffs"]),
            str(p["advanced"] + p["dropped"]),
            str(p["advanced"]),
            str(p["dropped"]),
            _percent(p["progression"]),
        )
    console.print(table)
    console.print("[dim]exits after: exits whose last hand-off in the stage was this pair[/dim]")


def _render_consistency(
    section: Mapping[str, Any], channels: Sequence[str], console: Console
) -> None:
    stages = section["stages"]
    seen = _ordered_channels(channels, {c for s in stages for c in s["by_channel"]})
    table = Table(
        title=f"Cross-channel consistency — journey {section['journey']}", title_justify="left"
    )
    table.add_column("stage")
    table.add_column("index", justify="right")
    for c in seen:
        table.add_column(c, justify="right")
    for s in stages:
        cells = []
        for c in seen:
            cell = s["by_channel"].get(c)
            if cell is None:
                cells.append(MISSING)
            elif cell["ratio"] is None:
                cells.append(f"[dim]{cell['advanced']}/{cell['exits']}[/dim]")
            else:
                cells.append(f"{_percent(cell['ratio'])} ({cell['exits']})")
        table.add_row(s["stage"], _number(s["index"], ".2f"), *cells)
    console.print(table)
    console.print(
        f"[dim]per channel: advanced / exits (exits); channels under {section['min_exits']} "
        "exits, dimmed, are left out; a stage needs two channels for an index[/dim]"
    )


def _render_feedback(section: Mapping[str, Any], channels: Sequence[str], console: Console) -> None:
    title = f"Satisfaction (CSAT, NPS) — journey {section['journey']}"
    if not (section["csat_responses"] or section["nps_responses"]):
        console.print(f"{title}: [dim]no survey answers in this period.[/dim]")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("channel")
    for name in ("CSAT", "answers", "NPS", "answers"):
        table.add_column(name, justify="right")

    def row(stage: str, channel: str, s: Mapping[str, Any]) -> None:
        table.add_row(
            stage,
            channel,
            _number(s["csat"], ".2f"),
            str(s["csat_responses"]),
            MISSING if s["nps"] is None else f"{s['nps']:+.0f}" if round(s["nps"]) else "0",
            str(s["nps_responses"]),
        )

    for s in section["stages"]:
        row(s["stage"] or "(no stage)", "all", s)
        for c in _ordered_channels(channels, set(s["by_channel"])):
            row("", c, s["by_channel"][c])
    for c in _ordered_channels(channels, set(section["by_channel"])):
        row("all stages", c, section["by_channel"][c])
    row("all stages", "all", section)
    console.print(table)
    console.print(
        "[dim]CSAT: mean answer (1–5); NPS: % promoters (9–10) − % detractors (0–6)[/dim]"
    )


# ---------------------------------------------------------------- for `journey report --html`

# Exits per (from, to) stage pair and channel; a drop has an empty to_stage.
STAGE_FLOWS = """
SELECT from_stage, to_stage, channel, kind, count()
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped')
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY from_stage, to_stage, channel, kind
"""

# The first and last exit in the period, in Unix seconds: the time buckets cover
# the data, not "all of history", which is the default period.
EXITS_SPAN = """
SELECT count(), toUnixTimestamp(min(occurred_at)), toUnixTimestamp(max(occurred_at))
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped')
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
"""

# Buckets start at multiples of {bucket} seconds since the epoch, so a day is a UTC day.
EXITS_PER_BUCKET = """
SELECT intDiv(toUnixTimestamp(occurred_at), {bucket:UInt32}) * {bucket:UInt32} AS start,
       from_stage, channel, countIf(kind = 'advanced'), count()
FROM journey.transitions FINAL
WHERE journey = {journey:String} AND kind IN ('advanced', 'dropped')
  AND occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY start, from_stage, channel
"""

# Candidate bucket sizes in seconds (minute … week); the smallest that keeps a
# chart under MAX_BUCKETS points wins. Smaller buckets hold fewer exits, and a
# channel under min_exits in a bucket has no ratio there.
BUCKET_SECONDS = (60, 300, 900, 3_600, 6 * 3_600, 86_400, 7 * 86_400)
MAX_BUCKETS = 48


def time_bucket(span_seconds: float) -> int:
    """The bucket size for data spanning ``span_seconds``: at most MAX_BUCKETS buckets if it can."""
    for size in BUCKET_SECONDS:
        if span_seconds / size < MAX_BUCKETS:
            return size
    return BUCKET_SECONDS[-1]


def stage_flows(client: Any, journey: Journey, since: datetime, until: datetime) -> dict[str, Any]:
    """Exits per channel as flows: ``{"from", "to", "exits"}``, ``to`` None for a drop.

    Skips are kept (an advance may jump stages), stages the journey no longer has left out.
    """
    names = set(journey.stage_names)
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for source, target, channel, kind, count in _rows(
        client, STAGE_FLOWS, _params(journey, since, until)
    ):
        if source not in names or (kind == "advanced" and target not in names):
            continue
        by_channel.setdefault(channel, []).append(
            {"from": source, "to": target if kind == "advanced" else None, "exits": int(count)}
        )
    return {"journey": journey.name, "by_channel": dict(sorted(by_channel.items()))}


def consistency_over_time(
    client: Any, journey: Journey, since: datetime, until: datetime, min_exits: int = MIN_EXITS
) -> dict[str, Any]:
    """The consistency index per stage and time bucket, by ``consistency_index``.

    ``buckets`` are the bucket starts (ISO, UTC) from the first exit's to the
    last's, without gaps; each stage has one index (None: no index) per bucket.
    """
    params = _params(journey, since, until)
    result: dict[str, Any] = {
        "journey": journey.name,
        "min_exits": min_exits,
        "bucket_seconds": None,
        "buckets": [],
        "stages": [],
    }
    ((count, first, last),) = _rows(client, EXITS_SPAN, params)
    if not count:
        return result
    size = time_bucket(int(last) - int(first))
    starts = list(range(int(first) // size * size, int(last) + 1, size))
    position = {start: i for i, start in enumerate(starts)}
    counts: dict[str, list[dict[str, tuple[int, int]]]] = {
        name: [{} for _ in starts] for name in journey.stage_names
    }
    for start, stage, channel, advanced, exits in _rows(
        client, EXITS_PER_BUCKET, {**params, "bucket": size}
    ):
        if stage in counts and int(start) in position:
            counts[stage][position[int(start)]][channel] = (int(advanced), int(exits))
    result["bucket_seconds"] = size
    result["buckets"] = [datetime.fromtimestamp(s, UTC).isoformat() for s in starts]
    result["stages"] = [
        {
            "stage": stage,
            "index": [consistency_index(c, min_exits) for c in per_bucket],
            "exits": [sum(e for _, e in c.values()) for c in per_bucket],
        }
        for stage, per_bucket in counts.items()
    ]
    return result


def html_extras(
    client: Any, journey: Journey, since: datetime, until: datetime, min_exits: int = MIN_EXITS
) -> dict[str, Any]:
    """The page's extra sections beyond ``journey_report``: flows and consistency over time."""
    return {
        "flows": stage_flows(client, journey, since, until),
        "consistency_over_time": consistency_over_time(client, journey, since, until, min_exits),
    }
