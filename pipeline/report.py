"""`journey report`: the funnel from ClickHouse, as a terminal table.

The queries are parameterised (never formatted from data). The funnel counts,
per stage, the distinct customers who entered it and those who got at least
that far (entered it or any later stage, so skips count), and the conversion
between consecutive stages on the latter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.journeys import Journey

# "All of history": the bounds of ClickHouse's DateTime64.
REPORT_START = datetime(1970, 1, 1, tzinfo=UTC)
REPORT_END = datetime(2299, 12, 31, tzinfo=UTC)

ENTRY_KINDS = ["entered", "advanced", "regressed", "reengaged"]

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


def _rows(client: Any, sql: str, parameters: dict[str, Any]) -> list[Any]:
    return list(client.query(sql, parameters=parameters).result_rows)


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
        "kinds": ENTRY_KINDS,
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


def render(funnels: Sequence[Funnel], channels: Sequence[str], console: Console) -> None:
    for f in funnels:
        seen_channels = [c for c in channels if any(c in s.by_channel for s in f.stages)]
        table = Table(title=f"Funnel — journey {f.journey}", title_justify="left")
        table.add_column("stage")
        table.add_column("entered", justify="right")
        table.add_column("reached (or beyond)", justify="right")
        table.add_column("conversion", justify="right")
        for c in seen_channels:
            table.add_column(f"via {c}", justify="right")
        for s in f.stages:
            conversion = "—" if s.conversion is None else f"{s.conversion:.1%}"
            table.add_row(
                s.stage,
                str(s.entered),
                str(s.reached),
                conversion,
                *(str(s.by_channel.get(c, 0)) for c in seen_channels),
            )
        console.print(table)
        if not any(s.reached for s in f.stages):
            console.print("[dim]No transitions in this period yet.[/dim]")
