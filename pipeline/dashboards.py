"""The Grafana dashboards, generated from the journeys and the alert rules' windows.

Pure, like :mod:`pipeline.alerting`: journeys and windows in, dashboard JSON
out. The committed files in ``grafana/dashboards/`` are this module's output
for the built-in journey and the default windows (a test fails if they
differ); regenerate them after changing either::

    python -m pipeline.dashboards [--journeys FILE] [-o grafana/dashboards]

Why generated rather than hand-kept JSON: the panels read the recording rules
whose names carry their window (``journey:stage_dropoff_ratio:5m``), and the
funnel panels list the journeys' stages in order. Generating both from the
same :class:`RuleWindows` and journey file is what keeps them from drifting,
and lets the query test run every panel against rules scaled down to seconds.
Plain dicts rather than grafana-foundation-sdk: the SDK has no builder for the
ClickHouse datasource, whose panels are half of these, and the JSON model used
here is small; ``tests/deploy/test_dashboards.py`` checks what Grafana itself
would reject.

Query conventions every panel keeps (the query test expands exactly these):

- Prometheus: ``$journey`` (one value), ``$channel`` / ``$instance`` (several,
  matched with ``=~``; "All" is ``.*``), ``$__rate_interval`` and ``$__range``.
- ClickHouse (the official ``grafana-clickhouse-datasource`` plugin):
  ``'${journey}'``, ``$__conditionalAll(channel IN (${channel:singlequote}), $channel)``,
  ``$__timeFilter(col)``, ``$__fromTime`` and ``$__timeInterval(col)``. Tables
  are read with ``FINAL``, as ``journey report`` does, so a replayed batch is
  counted once.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.alerting import (
    CONSISTENCY_GAUGE,
    DROPOFF_THRESHOLD,
    WORKER_JOB,
    RuleWindows,
    consistency,
    dead_letter_ratio,
    dropoff_ratio,
    progression_ratio_qualified,
    stage_exits,
)
from pipeline.consistency import MIN_EXITS
from pipeline.journeys import SCORE_COMPONENTS, Journey, load_journeys
from pipeline.report import CONSISTENCY_SQL
from pipeline.scorecard import (
    DURATION_PROPERTY,
    PERIOD,
    REVENUE_PROPERTY,
    MeasureQuery,
    measure_queries,
)
from pipeline.stages import ENTRY_KINDS

JSON = dict[str, Any]

DASHBOARDS_DIR = "grafana/dashboards"
# Fixed uids: grafana/provisioning/datasources defines them, panels refer to them.
PROMETHEUS: JSON = {"type": "prometheus", "uid": "prometheus"}
CLICKHOUSE: JSON = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
# Grafana's grid is 24 columns wide.
GRID_WIDTH = 24
TAGS = ["journey"]
# The windows of the committed rules file (journey rules' defaults).
DEFAULT_WINDOWS = RuleWindows()

JOURNEY = 'journey="$journey"'
JOURNEY_CHANNEL = 'journey="$journey", channel=~"$channel"'
INSTANCE = 'instance=~"$instance"'
CH_JOURNEY = "journey = '${journey}'"
CH_CHANNEL = "$__conditionalAll(channel IN (${channel:singlequote}), $channel)"
CH_PERIOD = "$__timeFilter(occurred_at)"
CH_ENTRY_KINDS = "(" + ", ".join(f"'{k}'" for k in ENTRY_KINDS) + ")"


# --------------------------------------------------------------------------- queries


def prom(
    expr: str,
    legend: str = "",
    *,
    ref: str = "A",
    instant: bool = False,
    table: bool = False,
) -> JSON:
    """A Prometheus target: a range query for graphs, instant for bars, stats and tables."""
    target: JSON = {
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if table:
        target["format"] = "table"
    return target


def sql(raw: str, *, ref: str = "A", timeseries: bool = False) -> JSON:
    """A ClickHouse target in the SQL editor; ``timeseries`` turns long rows into series."""
    return {
        "datasource": CLICKHOUSE,
        "editorType": "sql",
        # The plugin's (sqlds') formats: 0 time series (long to wide), 1 table.
        "format": 0 if timeseries else 1,
        "queryType": "timeseries" if timeseries else "table",
        "rawSql": raw.strip(),
        "refId": ref,
    }


def _sql_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stages_sql(journeys: Sequence[Journey]) -> str:
    """The selected journey's stages in order, as a ClickHouse array expression.

    ClickHouse does not know the journey file; the order comes from it at
    generation time (stages a journey file no longer has sort last, at 0).
    """
    cases = "".join(
        f"'${{journey}}' = {_sql_str(j.name)}, [{', '.join(_sql_str(s) for s in j.stage_names)}], "
        for j in journeys
    )
    return f"multiIf({cases}[])"


def consistency_sql() -> str:
    """report.CONSISTENCY_SQL with Grafana's variables and macros for its parameters.

    Derived, not copied, so the dashboard's index is the one ``journey report``
    and its tests compute.
    """
    period = (
        "occurred_at >= {since:DateTime64(3, 'UTC')} AND occurred_at < {until:DateTime64(3, 'UTC')}"
    )
    text = CONSISTENCY_SQL
    for old, new in (
        (period, CH_PERIOD),
        ("{journey:String}", "'${journey}'"),
        ("{min_exits:UInt32}", str(MIN_EXITS)),
    ):
        if old not in text:
            raise ValueError(f"report.CONSISTENCY_SQL no longer contains {old!r}: update this")
        text = text.replace(old, new)
    return text


def _literal(value: Any) -> str:
    """A bound parameter's value as a SQL literal: a string, or an array of strings."""
    if isinstance(value, str):
        return _sql_str(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_sql_str(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} into a panel query")


def inline_parameters(text: str, params: Mapping[str, Any]) -> str:
    """A report query's ``{name:Type}`` parameters written in as literals, for a panel.

    Only ever given names from the validated journey file (event types, stage
    and property names), never event data. The period becomes Grafana's time
    filter; a parameter without a value is an error rather than a broken panel.
    """
    text = text.replace(PERIOD, CH_PERIOD)

    def replace(m: re.Match[str]) -> str:
        if m.group(1) not in params:
            raise ValueError(f"no value for the query parameter {m.group(0)}")
        return _literal(params[m.group(1)])

    return re.sub(r"\{(\w+):[^{}]+\}", replace, text)


def _measure_subquery(q: MeasureQuery) -> str:
    """One measured KPI as a scalar subquery over the period and the selected channels."""
    value = inline_parameters(q.value, q.params)
    where = inline_parameters(q.where(), q.params)
    return (
        f"(SELECT toNullable(toFloat64({value})) FROM {q.table} FINAL "
        f"WHERE {where} AND {CH_CHANNEL})"
    )


def kpi_sql(journeys: Sequence[Journey]) -> str:
    """Every stage KPI of the selected journey over the period, as pipeline.scorecard defines them.

    Built from ``scorecard.measure_queries`` (the report's own SQL parts) so the
    panel and ``journey report --scorecard`` cannot drift: one row per KPI in
    file order, a ratio dividing its two measures' subqueries.
    """
    rows: list[str] = []
    for journey in journeys:
        measured = {(q.stage, q.kpi): _measure_subquery(q) for q in measure_queries(journey)}
        for stage in journey.stages:
            for k in stage.kpis:
                if k.operands is None:
                    value = measured[(stage.name, k.name)]
                else:
                    numerator, denominator = (measured[(stage.name, o)] for o in k.operands)
                    value = f"{numerator} / nullIf({denominator}, 0)"
                rows.append(
                    f"SELECT {len(rows)} AS position, {_sql_str(stage.name)} AS stage, "
                    f"{_sql_str(k.name)} AS kpi, {value} AS value\n"
                    f"WHERE '${{journey}}' = {_sql_str(journey.name)}"
                )
    if not rows:
        return "SELECT 0 AS position, '' AS stage, '' AS kpi, NULL AS value WHERE 0"
    return (
        "SELECT stage, kpi, value FROM (\n" + "\nUNION ALL\n".join(rows) + "\n)\nORDER BY position"
    )


def stage_of_type_sql(journeys: Sequence[Journey]) -> str:
    """The stage an event type belongs to in the selected journey (the furthest listing it)."""
    cases = []
    for journey in journeys:
        for stage in reversed(journey.stages):
            types = sorted({r.event_type for r in stage.rules})
            cases.append(
                f"'${{journey}}' = {_sql_str(journey.name)} AND event_type IN "
                f"({', '.join(_sql_str(x) for x in types)}), {_sql_str(stage.name)}"
            )
    return "multiIf(" + ", ".join(cases) + ", '')" if cases else "''"


def _either_channel(build: Callable[[str], str]) -> str:
    """Hand-off series that involve a selected channel, on either side of the pair."""
    return f"(\n  {build('from_channel')}\n  or\n  {build('to_channel')}\n)"


# --------------------------------------------------------------------------- panels


def _field_config(
    unit: str | None = None,
    *,
    min_: float | None = None,
    max_: float | None = None,
    decimals: int | None = None,
    custom: JSON | None = None,
    overrides: Sequence[JSON] = (),
    display_name: str | None = None,
    no_value: str | None = None,
) -> JSON:
    defaults: JSON = {}
    if unit is not None:
        defaults["unit"] = unit
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if decimals is not None:
        defaults["decimals"] = decimals
    if display_name is not None:
        defaults["displayName"] = display_name
    if no_value is not None:
        defaults["noValue"] = no_value
    if custom:
        defaults["custom"] = custom
    return {"defaults": defaults, "overrides": list(overrides)}


def override(matcher: str, value: str, **properties: Any) -> JSON:
    """Field properties for the fields a matcher selects (byName, byRegexp, byFrameRefID)."""
    return {
        "matcher": {"id": matcher, "options": value},
        "properties": [{"id": k.replace("__", "."), "value": v} for k, v in properties.items()],
    }


DASHED = {"dash": [10, 10], "fill": "dash"}


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: Sequence[JSON],
    field_config: JSON,
    options: JSON,
    transformations: Sequence[JSON] = (),
) -> JSON:
    datasource = targets[0]["datasource"]
    panel: JSON = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource,
        "targets": list(targets),
        "fieldConfig": field_config,
        "options": options,
    }
    if transformations:
        panel["transformations"] = list(transformations)
    return panel


def timeseries(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str = "short",
    min_: float | None = 0,
    max_: float | None = None,
    bars: bool = False,
    overrides: Sequence[JSON] = (),
    display_name: str | None = None,
    no_value: str | None = None,
) -> JSON:
    custom: JSON = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars else 10}
    if not bars:
        custom["showPoints"] = "never"
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        _field_config(
            unit,
            min_=min_,
            max_=max_,
            custom=custom,
            overrides=overrides,
            display_name=display_name,
            no_value=no_value,
        ),
        {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def bargauge(title: str, description: str, targets: Sequence[JSON], *, unit: str) -> JSON:
    """Horizontal bars, one per target in target order: how stages keep the journey's order."""
    return _panel(
        "bargauge",
        title,
        description,
        targets,
        _field_config(unit, min_=0),
        {
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )


def table(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    unit: str | None = None,
    decimals: int | None = None,
    overrides: Sequence[JSON] = (),
    transformations: Sequence[JSON] = (),
) -> JSON:
    return _panel(
        "table",
        title,
        description,
        targets,
        _field_config(unit, decimals=decimals, overrides=overrides),
        {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        transformations,
    )


def barchart(
    title: str,
    description: str,
    targets: Sequence[JSON],
    *,
    x_field: str,
    unit: str,
    transformations: Sequence[JSON] = (),
) -> JSON:
    return _panel(
        "barchart",
        title,
        description,
        targets,
        _field_config(unit, min_=0),
        {
            "orientation": "horizontal",
            "xField": x_field,
            "showValue": "always",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        },
        transformations,
    )


def stat(title: str, description: str, targets: Sequence[JSON], *, unit: str) -> JSON:
    return _panel(
        "stat",
        title,
        description,
        targets,
        _field_config(unit),
        {
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value_and_name",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )


def matrix(row: str, column: str, value: str) -> JSON:
    """Long rows (row, column, value) into a grid: a table panel transformation."""
    return {
        "id": "groupingToMatrix",
        "options": {"rowField": row, "columnField": column, "valueField": value},
    }


def hide_columns(*names: str) -> JSON:
    return {
        "id": "organize",
        "options": {"excludeByName": dict.fromkeys(names, True), "renameByName": {}},
    }


# --------------------------------------------------------------------------- layout


class Board:
    """Panels laid out left to right in rows of 24 columns, with ids in order.

    ``row()`` starts a titled section; a panel that does not fit in what is
    left of a line starts the next one.
    """

    def __init__(self) -> None:
        self.panels: list[JSON] = []
        self._x = 0
        self._y = 0
        self._line_height = 0

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def row(self, title: str) -> None:
        if self._x:
            self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "id": len(self.panels) + 1,
                "gridPos": {"x": 0, "y": self._y, "w": GRID_WIDTH, "h": 1},
            }
        )
        self._y += 1

    def add(self, panel: JSON, w: int, h: int = 8) -> None:
        if not 0 < w <= GRID_WIDTH:
            raise ValueError(f"panel {panel['title']!r}: width {w} not in 1..{GRID_WIDTH}")
        if self._x + w > GRID_WIDTH:
            self._newline()
        panel = {"id": len(self.panels) + 1, **panel}
        panel["gridPos"] = {"x": self._x, "y": self._y, "w": w, "h": h}
        self.panels.append(panel)
        self._x += w
        self._line_height = max(self._line_height, h)


# --------------------------------------------------------------------------- variables


def prom_variable(
    name: str, label: str, query: str, *, multi: bool = False, description: str = ""
) -> JSON:
    """A variable from Prometheus labels; with ``multi`` also "All", matched as ``.*``."""
    var: JSON = {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": PROMETHEUS,
        "definition": query,
        "query": query,
        "refresh": 2,  # on time range change: new journeys and channels appear
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
    }
    if multi:
        var["allValue"] = ".*"
    return var


def clickhouse_variable(
    name: str, label: str, query: str, *, multi: bool = False, description: str = ""
) -> JSON:
    """A variable from a ClickHouse query; "All" is what ``$__conditionalAll`` drops."""
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": CLICKHOUSE,
        "definition": query,
        "query": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
    }


def journey_variables() -> list[JSON]:
    return [
        prom_variable(
            "journey",
            "Journey",
            "label_values(journey_stage_customers, journey)",
            description="A journey of the journey file",
        ),
        prom_variable(
            "channel",
            "Channel",
            'label_values(journey_stage_entries_total{journey="$journey"}, channel)',
            multi=True,
            description="Channels to include (entries, exits and drop-offs are per channel)",
        ),
    ]


def dashboard(
    uid: str,
    title: str,
    description: str,
    board: Board,
    variables: Sequence[JSON],
    *,
    time_from: str,
    refresh: str,
) -> JSON:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": refresh,
        "time": {"from": time_from, "to": "now"},
        "timezone": "browser",
        "links": [
            {
                "title": "Journey dashboards",
                "type": "dashboards",
                "tags": TAGS,
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": list(variables)},
        "panels": board.panels,
    }


# --------------------------------------------------------------------------- dashboards


def journey_live(journeys: Sequence[Journey], w: RuleWindows) -> JSON:
    stages = _stage_union(journeys)
    b = Board()
    b.row("Now")
    b.add(
        bargauge(
            "Customers in each stage now",
            "Customers whose current stage this is, summed over the workers (each owns its "
            "partitions' customers). Dropped customers are in no stage until they come back. "
            "Not split by channel: a customer's stage has no single channel.",
            [
                prom(
                    f'sum(journey_stage_customers{{{JOURNEY}, stage="{s}"}})',
                    s,
                    ref=_ref(i),
                    instant=True,
                )
                for i, s in enumerate(stages)
            ],
            unit="short",
        ),
        w=12,
        h=9,
    )
    b.add(
        bargauge(
            "Live funnel: entries into each stage over the time range",
            "Entries (entered, advanced, regressed, re-engaged) into each stage on the selected "
            "channels during the dashboard's time range, in the journey's order. Exact "
            "distinct customers and conversions for any period: Funnels and time in stage.",
            [
                prom(
                    f"sum(increase(journey_stage_entries_total{{{JOURNEY_CHANNEL}, "
                    f'stage="{s}"}}[$__range]))',
                    s,
                    ref=_ref(i),
                    instant=True,
                )
                for i, s in enumerate(stages)
            ],
            unit="short",
        ),
        w=12,
        h=9,
    )
    b.row("Flow")
    b.add(
        timeseries(
            "Entries per minute by stage",
            "Customers entering each stage per minute, on the selected channels (the channel "
            "of the event that moved them).",
            [
                prom(
                    "sum by (stage) (rate(journey_stage_entries_total"
                    f"{{{JOURNEY_CHANNEL}}}[$__rate_interval])) * 60",
                    "{{stage}}",
                )
            ],
            unit="suffix:/min",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Drop-offs per minute by stage",
            "Customers dropped per minute at each stage (their deadline passed without an "
            "event moving them on), by the channel of their last event in the stage.",
            [
                prom(
                    "sum by (stage) (rate(journey_dropoffs_total"
                    f"{{{JOURNEY_CHANNEL}}}[$__rate_interval])) * 60",
                    "{{stage}}",
                )
            ],
            unit="suffix:/min",
        ),
        w=12,
    )
    b.row("Drop-off against the alert thresholds")
    b.add(
        timeseries(
            f"Drop-off ratio per stage (worst channel, {w.short}) and its alert threshold",
            f"Per stage, the highest share of exits that were drop-offs over {w.short} among "
            f"the selected channels with at least {w.min_exits} exits: what "
            "JourneyStageDropoffHigh compares with the stage's dropoff_alert_ratio (dashed).",
            [
                prom(
                    "max by (stage) (\n"
                    f"  {dropoff_ratio(w.short)}{{{JOURNEY_CHANNEL}}}\n"
                    "  and on (journey, stage, channel)\n"
                    f"  {stage_exits(w.short)} >= {w.min_exits}\n"
                    ")",
                    "{{stage}}",
                ),
                prom(
                    f"max by (stage) ({DROPOFF_THRESHOLD}{{{JOURNEY}}})",
                    "{{stage}} threshold",
                    ref="B",
                ),
            ],
            unit="percentunit",
            max_=1,
            overrides=[override("byFrameRefID", "B", custom__lineStyle=DASHED)],
        ),
        w=16,
        h=9,
    )
    b.add(
        table(
            "Firing alerts",
            "Alerts firing now in Prometheus: this journey's customer alerts and every "
            "pipeline alert (while a pipeline alert fires, Alertmanager holds customer "
            "alerts back). Empty is good.",
            [
                prom(
                    'ALERTS{alertstate="firing", journey=~"$journey|"}',
                    instant=True,
                    table=True,
                )
            ],
            transformations=[hide_columns("Time", "Value", "__name__", "alertstate")],
        ),
        w=8,
        h=9,
    )
    return dashboard(
        "journey-live",
        "Journey live",
        "Where customers are now, how they move and where they drop off (Prometheus).",
        b,
        journey_variables(),
        time_from="now-1h",
        refresh="10s",
    )


def channels_and_consistency(journeys: Sequence[Journey], w: RuleWindows) -> JSON:
    stage_order = stages_sql(journeys)
    b = Board()
    b.row("Live (Prometheus)")
    b.add(
        table(
            "Progression ratio now: stage × channel",
            "Advanced exits / all exits per stage and channel over the workers' consistency "
            "window (JOURNEY_CONSISTENCY_WINDOW_SECONDS of event time); only channels with "
            "enough exits to count (JOURNEY_CONSISTENCY_MIN_EXITS).",
            [
                prom(
                    "max by (stage, channel) (journey_stage_progression_ratio"
                    f"{{{JOURNEY_CHANNEL}}})",
                    instant=True,
                    table=True,
                )
            ],
            unit="percentunit",
            decimals=1,
            transformations=[matrix("stage", "channel", "Value")],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Cross-channel consistency index",
            "1 − σ/μ of the channels' progression ratios per stage: 1 when every channel "
            "carries customers forward equally well, lower when one is failing them. Solid: "
            "the workers' gauge over the consistency window; dashed: the same index from the "
            f"exit counters over {w.short}. No line while fewer than two channels qualify.",
            [
                prom(f"{CONSISTENCY_GAUGE}{{{JOURNEY}}}", "{{stage}}"),
                prom(f"{consistency(w.short)}{{{JOURNEY}}}", f"{{{{stage}}}} ({w.short})", ref="B"),
            ],
            unit="none",
            max_=1,
            overrides=[override("byFrameRefID", "B", custom__lineStyle=DASHED)],
        ),
        w=12,
    )
    b.add(
        timeseries(
            f"Progression ratio per stage and channel ({w.short})",
            f"Advanced exits / all exits over {w.short}, channels with at least {w.min_exits} "
            "exits (those JourneyChannelDiverging judges).",
            [
                prom(
                    f"{progression_ratio_qualified(w.short)}{{{JOURNEY_CHANNEL}}}",
                    "{{stage}} · {{channel}}",
                )
            ],
            unit="percentunit",
            max_=1,
        ),
        w=24,
    )

    def handoffs(side: str) -> str:
        return (
            "sum by (from_channel, to_channel) (increase(journey_channel_handoffs_total"
            f'{{{JOURNEY}, {side}=~"$channel"}}[$__range]))'
        )

    def outcomes(side: str, outcome: str = "") -> str:
        extra = f', outcome="{outcome}"' if outcome else ""
        return (
            "sum by (from_channel, to_channel) (increase(journey_handoff_outcomes_total"
            f'{{{JOURNEY}, {side}=~"$channel"{extra}}}[$__range]))'
        )

    b.add(
        table(
            "Hand-off matrix over the time range: from (rows) → to (columns)",
            "Consecutive events of one customer on different channels, per pair, involving a "
            "selected channel.",
            [prom(_either_channel(handoffs), instant=True, table=True)],
            decimals=0,
            transformations=[matrix("from_channel", "to_channel", "Value")],
        ),
        w=12,
    )
    b.add(
        table(
            "Progression after a hand-off over the time range",
            "Of the stage exits whose last hand-off in the stage was this pair, the share that "
            "advanced (the rest dropped off).",
            [
                prom(
                    _either_channel(lambda side: outcomes(side, "advanced"))
                    + "\n/\n"
                    + _either_channel(outcomes)
                    + " > 0",
                    instant=True,
                    table=True,
                )
            ],
            unit="percentunit",
            decimals=1,
            transformations=[matrix("from_channel", "to_channel", "Value")],
        ),
        w=12,
    )
    b.row("Any period (ClickHouse)")
    b.add(
        table(
            "Progression ratio per stage and channel (period)",
            "Advanced exits / all exits from each stage per channel in the dashboard's period "
            "(exits by their time; a drop's time is its deadline).",
            [
                sql(
                    f"""
SELECT from_stage AS stage, channel, countIf(kind = 'advanced') / count() AS progression
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped')
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY stage, channel
ORDER BY indexOf({stage_order}, stage), channel
"""
                )
            ],
            unit="percentunit",
            decimals=1,
            transformations=[matrix("stage", "channel", "progression")],
        ),
        w=12,
    )
    b.add(
        table(
            "Consistency index per stage (period)",
            f"1 − σ/μ of the progression ratios of the channels with at least {MIN_EXITS} exits "
            "in the period; empty with fewer than two such channels. The same SQL as "
            "journey report's consistency (all channels).",
            [sql(consistency_sql())],
            decimals=2,
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Consistency index over time (period)",
            f"The index per time bucket (channels with at least {MIN_EXITS} exits in the "
            "bucket); zoom out for buckets big enough to judge.",
            [
                sql(
                    f"""
SELECT time, stage,
       if(mean = 0, 1., greatest(0., least(1., 1. - sigma / mean))) AS consistency
FROM (
  SELECT time, stage, count() AS channels, avg(ratio) AS mean, stddevPopStable(ratio) AS sigma
  FROM (
    SELECT $__timeInterval(occurred_at) AS time, from_stage AS stage, channel,
           countIf(kind = 'advanced') / count() AS ratio
    FROM journey.transitions FINAL
    WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped')
      AND {CH_PERIOD}
    GROUP BY time, stage, channel
    HAVING count() >= {MIN_EXITS}
  )
  GROUP BY time, stage
)
WHERE channels >= 2
ORDER BY time, stage
""",
                    timeseries=True,
                )
            ],
            unit="none",
            max_=1,
            display_name="${__field.labels.stage}",
        ),
        w=24,
    )
    b.add(
        table(
            "Hand-offs and what followed (period)",
            "Per channel pair: hand-offs in the period, and the stage exits whose last hand-off "
            "in the stage was that pair — how many advanced, how many dropped off.",
            [
                sql(
                    f"""
SELECT h.from_channel AS from_channel, h.to_channel AS to_channel, h.handoffs AS handoffs,
       o.advanced AS advanced, o.dropped AS dropped,
       if(o.advanced + o.dropped = 0, NULL, o.advanced / (o.advanced + o.dropped)) AS progression
FROM (
  SELECT from_channel, to_channel, count() AS handoffs
  FROM journey.handoffs FINAL
  WHERE {CH_JOURNEY} AND {CH_PERIOD}
    AND ($__conditionalAll(from_channel IN (${{channel:singlequote}}), $channel)
      OR $__conditionalAll(to_channel IN (${{channel:singlequote}}), $channel))
  GROUP BY from_channel, to_channel
) AS h
LEFT JOIN (
  SELECT handoff_from AS from_channel, handoff_to AS to_channel,
         countIf(kind = 'advanced') AS advanced, countIf(kind = 'dropped') AS dropped
  FROM journey.transitions FINAL
  WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped') AND handoff_from != ''
    AND {CH_PERIOD}
  GROUP BY from_channel, to_channel
) AS o ON h.from_channel = o.from_channel AND h.to_channel = o.to_channel
ORDER BY handoffs DESC, from_channel, to_channel
"""
                )
            ],
            overrides=[override("byName", "progression", unit="percentunit", decimals=1)],
        ),
        w=12,
        h=9,
    )
    b.add(
        table(
            "CSAT and NPS per channel (period)",
            "CSAT: mean answer (1–5). NPS: % promoters (9–10) − % detractors (0–6), from −100 "
            "to 100. Answers from properties.csat / properties.nps of any accepted event.",
            [
                sql(
                    f"""
SELECT channel,
       if(count(csat) = 0, NULL, avg(csat)) AS mean_csat,
       count(csat) AS csat_answers,
       if(count(nps) = 0, NULL,
          100 * (countIf(nps >= 9) - countIf(nps <= 6)) / count(nps)) AS nps_score,
       count(nps) AS nps_answers
FROM journey.feedback FINAL
WHERE {CH_JOURNEY} AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY channel
ORDER BY channel
"""
                )
            ],
            decimals=1,
            overrides=[
                override("byRegexp", "/_answers$/", decimals=0),
            ],
        ),
        w=12,
        h=9,
    )
    return dashboard(
        "journey-channels",
        "Channels and consistency",
        "How consistently each channel carries customers forward, live (Prometheus) and "
        "over any period (ClickHouse).",
        b,
        journey_variables(),
        time_from="now-24h",
        refresh="1m",
    )


def funnels_and_time_in_stage(journeys: Sequence[Journey]) -> JSON:
    stage_order = stages_sql(journeys)
    entries = (
        f"{CH_JOURNEY} AND kind IN {CH_ENTRY_KINDS}\n      AND {CH_PERIOD}\n      AND {CH_CHANNEL}"
    )
    funnel_sql = f"""
SELECT stage, entered, reached,
       if(previous = 0, NULL, reached / previous) AS conversion,
       if(first = 0, NULL, reached / first) AS of_first_stage
FROM (
  SELECT position, stage, entered, reached,
         lagInFrame(reached, 1, toUInt64(0)) OVER w AS previous,
         first_value(reached) OVER w AS first
  FROM (
    SELECT position, ({stage_order})[position] AS stage,
           countIf(furthest >= position) AS reached,
           countIf(has(visited, stage)) AS entered
    FROM (
      SELECT customer, max(indexOf({stage_order}, to_stage)) AS furthest,
             groupUniqArray(to_stage) AS visited
      FROM journey.transitions FINAL
      WHERE {entries}
      GROUP BY customer
    )
    ARRAY JOIN arrayEnumerate({stage_order}) AS position
    GROUP BY position
  )
  WINDOW w AS (ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
ORDER BY position
"""
    funnel_about = (
        "Distinct customers who entered each stage in the period on the selected channels, "
        "and those who got at least that far (entered it or a later stage, so skips count); "
        "conversion is reached / reached at the previous stage — the funnel of journey report."
    )
    b = Board()
    b.row("Funnel")
    b.add(
        barchart(
            "Funnel: customers reaching each stage (period)",
            funnel_about,
            [sql(funnel_sql)],
            x_field="stage",
            unit="short",
            transformations=[hide_columns("conversion", "of_first_stage")],
        ),
        w=12,
        h=9,
    )
    b.add(
        table(
            "Funnel with conversion between stages (period)",
            funnel_about,
            [sql(funnel_sql)],
            decimals=0,
            overrides=[
                override("byName", "conversion", unit="percentunit", decimals=1),
                override("byName", "of_first_stage", unit="percentunit", decimals=1),
            ],
        ),
        w=12,
        h=9,
    )
    b.row("Time in stage")
    b.add(
        table(
            "Time in stage: p50, p90, p99 of those who left (period)",
            "Time spent in each stage by the customers who left it in the period (advanced, "
            "dropped or regressed), exact percentiles — as journey report.",
            [
                sql(
                    f"""
SELECT from_stage AS stage, count() AS leavers,
       quantileExactInclusive(0.5)(seconds_in_previous) AS p50,
       quantileExactInclusive(0.9)(seconds_in_previous) AS p90,
       quantileExactInclusive(0.99)(seconds_in_previous) AS p99,
       countIf(kind = 'dropped') / count() AS dropped_share
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped', 'regressed')
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY stage
ORDER BY indexOf({stage_order}, stage)
"""
                )
            ],
            overrides=[
                override("byRegexp", "/^p\\d+$/", unit="s", decimals=1),
                override("byName", "dropped_share", unit="percentunit", decimals=1),
            ],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Time in stage p90 over time (period)",
            "90th percentile of the time spent in each stage by those who advanced from it, "
            "per time bucket.",
            [
                sql(
                    f"""
SELECT $__timeInterval(occurred_at) AS time, from_stage AS stage,
       quantileExactInclusive(0.9)(seconds_in_previous) AS p90
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind = 'advanced'
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY time, stage
ORDER BY time, stage
""",
                    timeseries=True,
                )
            ],
            unit="s",
            display_name="${__field.labels.stage}",
        ),
        w=12,
    )
    b.row("Drop-off and cohorts")
    b.add(
        table(
            "Top drop-off stages and channels (period)",
            "Where customers were lost: drop-offs per stage and channel (of their last event "
            "in the stage), with the share of that stage's exits on that channel.",
            [
                sql(
                    f"""
SELECT from_stage AS stage, channel, countIf(kind = 'dropped') AS dropped, count() AS exits,
       dropped / exits AS dropoff
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped')
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY stage, channel
HAVING dropped > 0
ORDER BY dropped DESC, dropoff DESC, stage, channel
LIMIT 10
"""
                )
            ],
            overrides=[override("byName", "dropoff", unit="percentunit", decimals=1)],
        ),
        w=12,
        h=9,
    )
    b.add(
        timeseries(
            "Customers entering the journey per day (period)",
            "Customers whose first entry into the journey falls on each day (UTC).",
            [
                sql(
                    f"""
SELECT toStartOfDay(first_entered) AS time, count() AS customers
FROM (
  SELECT customer, min(occurred_at) AS first_entered
  FROM journey.transitions FINAL
  WHERE {CH_JOURNEY} AND kind = 'entered'
    AND {CH_PERIOD}
    AND {CH_CHANNEL}
  GROUP BY customer
)
GROUP BY time
ORDER BY time
""",
                    timeseries=True,
                )
            ],
            bars=True,
        ),
        w=12,
        h=9,
    )
    b.add(
        table(
            "Cohorts: customers entering per day and how far they got",
            "Rows: the day (UTC) a customer first entered the journey, in the period, on the "
            "selected channels. Columns: how many of that day's customers reached each stage "
            "since, at any time up to now.",
            [
                sql(
                    f"""
SELECT toString(toDate(first_entered)) AS cohort, ({stage_order})[position] AS stage,
       countIf(furthest >= position) AS customers
FROM (
  SELECT customer, minIf(occurred_at, kind = 'entered') AS first_entered,
         max(indexOf({stage_order}, to_stage)) AS furthest
  FROM journey.transitions FINAL
  WHERE {CH_JOURNEY} AND kind IN {CH_ENTRY_KINDS}
    AND occurred_at >= $__fromTime
    AND {CH_CHANNEL}
  GROUP BY customer
  HAVING countIf(kind = 'entered') > 0 AND $__timeFilter(first_entered)
)
ARRAY JOIN arrayEnumerate({stage_order}) AS position
GROUP BY cohort, position, stage
ORDER BY cohort, position
"""
                )
            ],
            decimals=0,
            transformations=[matrix("cohort", "stage", "customers")],
        ),
        w=24,
        h=9,
    )
    return dashboard(
        "journey-funnels",
        "Funnels and time in stage",
        "Funnels, conversion, time in stage, drop-off and cohorts over any period (ClickHouse).",
        b,
        [
            clickhouse_variable(
                "journey",
                "Journey",
                "SELECT DISTINCT journey FROM journey.transitions ORDER BY journey",
            ),
            clickhouse_variable(
                "channel",
                "Channel",
                "SELECT DISTINCT channel FROM journey.transitions "
                f"WHERE {CH_JOURNEY} AND {CH_PERIOD} ORDER BY channel",
                multi=True,
                description="The channel of the event that moved the customer",
            ),
        ],
        time_from="now-30d",
        refresh="",
    )


def pipeline_health(w: RuleWindows) -> JSON:
    def rate(metric: str, by: str = "", extra: str = "") -> str:
        selector = f"{{{INSTANCE}{', ' + extra if extra else ''}}}"
        grouping = f" by ({by})" if by else ""
        return f"sum{grouping} (rate({metric}{selector}[$__rate_interval]))"

    def quantile(q: float, metric: str, by: str = "", extra: str = "") -> str:
        buckets = rate(f"{metric}_bucket", f"le, {by}" if by else "le", extra)
        return f"histogram_quantile({q}, {buckets})"

    b = Board()
    b.row("Throughput and lag")
    b.add(
        timeseries(
            "Events per second by outcome",
            "accepted, rejected (dead letters) and duplicate events consumed per second.",
            [prom(rate("journey_events_total", "outcome"), "{{outcome}}")],
            unit="suffix:/s",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Event lag: event time → processed, → in ClickHouse",
            "How long after they happened events reach the journey state (p50, p95, p99), "
            "and their rows reach ClickHouse (p99 written: rows go out in large inserts "
            "about once a second). A replay of old events raises both.",
            [
                *(
                    prom(
                        quantile(q, "journey_event_lag_seconds"), f"p{round(q * 100)}", ref=_ref(i)
                    )
                    for i, q in enumerate((0.5, 0.95, 0.99))
                ),
                prom(quantile(0.99, "journey_written_lag_seconds"), "p99 written", ref=_ref(3)),
            ],
            unit="s",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Consumer lag per worker (messages waiting)",
            "Messages on each worker's partitions of journey.events not consumed yet.",
            [
                prom(
                    f"sum by (instance) (journey_consumer_lag_messages{{{INSTANCE}}})",
                    "{{instance}}",
                )
            ],
        ),
        w=12,
    )
    b.add(
        stat(
            "Since the last batch, per worker",
            "Seconds since each worker processed a batch: grows while a worker is idle or "
            "stuck (see consumer lag and sink errors).",
            [
                prom(
                    "time() - max by (instance) "
                    f"(journey_last_batch_timestamp_seconds{{{INSTANCE}}})",
                    "{{instance}}",
                    instant=True,
                )
            ],
            unit="s",
        ),
        w=12,
    )
    b.row("Batches and services")
    b.add(
        timeseries(
            "Batch size (events per batch)",
            "Events per processed batch: p50, p95 and the mean.",
            [
                prom(quantile(0.5, "journey_batch_size"), "p50"),
                prom(quantile(0.95, "journey_batch_size"), "p95", ref="B"),
                prom(
                    f"{rate('journey_batch_size_sum')}\n/\n{rate('journey_batch_size_count')}",
                    "mean",
                    ref="C",
                ),
            ],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Batch duration p95: decode and total",
            "Wall time per batch: decoding and validation, and the whole batch.",
            [
                prom(
                    quantile(
                        0.95, "journey_batch_duration_seconds", "step", 'step=~"decode|total"'
                    ),
                    "{{step}}",
                )
            ],
            unit="s",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Redis and ClickHouse latency per batch",
            "Time per batch in the Redis state update (one script call) and the ClickHouse "
            "insert: p50 and p95.",
            [
                prom(
                    quantile(
                        q, "journey_batch_duration_seconds", "step", 'step=~"redis|clickhouse"'
                    ),
                    f"{{{{step}}}} p{round(q * 100)}",
                    ref=_ref(i),
                )
                for i, q in enumerate((0.5, 0.95))
            ],
            unit="s",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Sink errors per second (retried)",
            "Failed calls to Redis, ClickHouse or Kafka, retried with back-off while "
            "consumption waits. No data means no errors.",
            [prom(rate("journey_sink_errors_total", "sink, operation"), "{{sink}} {{operation}}")],
            unit="suffix:/s",
            no_value="0",
        ),
        w=12,
    )
    b.row("Dead letters and state")
    b.add(
        timeseries(
            "Dead letters per second by reason",
            "Events rejected to journey.events.rejected (and ClickHouse journey.rejected_events) "
            f"per reason; dashed: the rejected share of all events over {w.short} (right axis).",
            [
                prom(rate("journey_rejected_events_total", "reason"), "{{reason}}"),
                prom(dead_letter_ratio(w.short), f"rejected share ({w.short})", ref="B"),
            ],
            unit="suffix:/s",
            overrides=[
                override(
                    "byFrameRefID",
                    "B",
                    unit="percentunit",
                    custom__axisPlacement="right",
                    custom__lineStyle=DASHED,
                )
            ],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Workers: up and partitions owned",
            "Whether Prometheus can scrape each worker, and how many journey.events partitions "
            "it owns (Kafka's consumer group decides).",
            [
                prom(f'up{{job="{WORKER_JOB}", {INSTANCE}}}', "{{instance}} up"),
                prom(
                    f"journey_assigned_partitions{{{INSTANCE}}}",
                    "{{instance}} partitions",
                    ref="B",
                ),
            ],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Drop-off sweep: customers with a deadline, sweep p95",
            "Customers with a pending drop-off deadline on each worker's partitions, and how "
            "long one sweep takes (right axis).",
            [
                prom(
                    f"sum by (instance) (journey_pending_deadlines{{{INSTANCE}}})",
                    "{{instance}} pending",
                ),
                prom(quantile(0.95, "journey_sweep_duration_seconds"), "sweep p95", ref="B"),
            ],
            overrides=[override("byFrameRefID", "B", unit="s", custom__axisPlacement="right")],
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Late events, state conflicts and identity merges per second",
            "Events behind their partition's watermark (by channel), customers recomputed after "
            "a concurrent Redis update, and identity links by result.",
            [
                prom(rate("journey_late_events_total", "channel"), "late {{channel}}"),
                prom(rate("journey_state_conflicts_total"), "state conflicts", ref="B"),
                prom(rate("journey_identity_merges_total", "result"), "merge {{result}}", ref="C"),
            ],
            unit="suffix:/s",
        ),
        w=12,
    )
    return dashboard(
        "journey-pipeline",
        "Pipeline health",
        "Throughput, lag, batches, sinks and dead letters of the journey workers (Prometheus).",
        b,
        [
            prom_variable(
                "instance",
                "Worker",
                f'label_values(up{{job="{WORKER_JOB}"}}, instance)',
                multi=True,
            )
        ],
        time_from="now-1h",
        refresh="10s",
    )


def scorecards(journeys: Sequence[Journey]) -> JSON:
    stage_order = stages_sql(journeys)
    b = Board()
    b.row("Live (Prometheus)")
    b.add(
        stat(
            "Journey score now",
            "0–100: the weighted mean of the components below over the workers' consistency "
            "window (JOURNEY_CONSISTENCY_WINDOW_SECONDS of event time). No value while no "
            "component can be judged.",
            [prom(f"max(journey_score{{{JOURNEY}}})", "score", instant=True)],
            unit="none",
        ),
        w=6,
    )
    b.add(
        bargauge(
            "Score components now (0–1, 1 best)",
            "conversion: reached the goal / reached the first stage; dropoff: 1 − dropped / "
            "exits; time_to_goal: 1 − median time to goal / the journey's time limit; "
            "satisfaction: CSAT and NPS scaled to 0–1. A component without data has no bar.",
            [
                prom(
                    f'max(journey_score_component{{{JOURNEY}, component="{c}"}})',
                    c,
                    ref=_ref(i),
                    instant=True,
                )
                for i, c in enumerate(SCORE_COMPONENTS)
            ],
            unit="percentunit",
        ),
        w=9,
    )
    b.add(
        bargauge(
            "Channel scores now",
            "The score of the customers each channel carried: its progression through the "
            "stages before the goal, its drop-off, time to goal and satisfaction.",
            [
                prom(
                    f"max by (channel) (journey_channel_score{{{JOURNEY_CHANNEL}}})",
                    "{{channel}}",
                    instant=True,
                )
            ],
            unit="none",
        ),
        w=9,
    )
    b.add(
        timeseries(
            "Journey score over time",
            "The live score (left axis) and its components (right axis, 0–1).",
            [
                prom(f"max(journey_score{{{JOURNEY}}})", "score"),
                prom(
                    f"max by (component) (journey_score_component{{{JOURNEY}}})",
                    "{{component}}",
                    ref="B",
                ),
            ],
            unit="none",
            overrides=[
                override(
                    "byFrameRefID", "B", unit="percentunit", max=1, custom__axisPlacement="right"
                )
            ],
        ),
        w=24,
    )
    b.row("Any period (ClickHouse)")
    b.add(
        table(
            "Stage KPIs (period)",
            "The KPIs the journey file declares per stage, on the selected channels, exactly "
            "as journey report --scorecard computes them (empty: no value, e.g. a ratio with "
            "nothing to divide by).",
            [sql(kpi_sql(journeys))],
            decimals=2,
        ),
        w=12,
        h=12,
    )
    b.add(
        table(
            "Worst channel per stage (period)",
            f"Per stage, the channel with the lowest progression ratio (advanced / exits) among "
            f"those with at least {MIN_EXITS} exits, and how far below the other channels' mean "
            "it is.",
            [
                sql(
                    f"""
SELECT stage, argMin(channel, ratio) AS worst_channel, min(ratio) AS progression,
       (sum(ratio) - min(ratio)) / (count() - 1) AS others, others - progression AS gap
FROM (
  SELECT from_stage AS stage, channel, countIf(kind = 'advanced') / count() AS ratio
  FROM journey.transitions FINAL
  WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped')
    AND {CH_PERIOD}
  GROUP BY stage, channel
  HAVING count() >= {MIN_EXITS}
)
GROUP BY stage
HAVING count() >= 2
ORDER BY indexOf({stage_order}, stage)
"""
                )
            ],
            unit="percentunit",
            decimals=1,
        ),
        w=12,
        h=6,
    )
    b.add(
        table(
            "Where customers are lost (period)",
            "Drop-offs per stage, most first: the stage losing most customers on top.",
            [
                sql(
                    f"""
SELECT from_stage AS stage, countIf(kind = 'dropped') AS dropped, count() AS exits,
       dropped / exits AS dropoff
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped')
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY stage
ORDER BY dropped DESC, indexOf({stage_order}, stage)
"""
                )
            ],
            overrides=[override("byName", "dropoff", unit="percentunit", decimals=1)],
        ),
        w=12,
        h=6,
    )
    b.add(
        table(
            "Channel performance per stage (period)",
            "Progression and drop-off of each channel's exits, and the mean and p90 time in "
            "stage of those who left (advanced, dropped or regressed).",
            [
                sql(
                    f"""
SELECT from_stage AS stage, channel,
       countIf(kind IN ('advanced', 'dropped')) AS exits,
       if(exits = 0, NULL, countIf(kind = 'advanced') / exits) AS progression,
       if(exits = 0, NULL, countIf(kind = 'dropped') / exits) AS dropoff,
       avg(seconds_in_previous) AS avg_time,
       quantileExactInclusive(0.9)(seconds_in_previous) AS p90_time
FROM journey.transitions FINAL
WHERE {CH_JOURNEY} AND kind IN ('advanced', 'dropped', 'regressed')
  AND {CH_PERIOD}
  AND {CH_CHANNEL}
GROUP BY stage, channel
ORDER BY indexOf({stage_order}, stage), channel
"""
                )
            ],
            overrides=[
                override("byRegexp", "/progression|dropoff/", unit="percentunit", decimals=1),
                override("byRegexp", "/_time$/", unit="s", decimals=0),
            ],
        ),
        w=12,
        h=9,
    )
    b.add(
        table(
            "Satisfaction, handling time and revenue per stage and channel (period)",
            "CSAT (mean, 1–5) and NPS (% promoters 9–10 − % detractors 0–6) of the answers "
            f"given in the stage; handling time: mean `{DURATION_PROPERTY}` (seconds) of the "
            f"channel's events of the stage; revenue: sum of `{REVENUE_PROPERTY}`.",
            [
                sql(
                    f"""
SELECT stage, channel,
       anyIf(csat, source = 'feedback') AS mean_csat,
       anyIf(nps, source = 'feedback') AS nps_score,
       anyIf(handling, source = 'events') AS handling_time,
       anyIf(revenue, source = 'events') AS revenue
FROM (
  SELECT 'feedback' AS source, stage, channel,
         if(count(csat) = 0, NULL, avg(csat)) AS csat,
         if(count(nps) = 0, NULL,
            100 * (countIf(nps >= 9) - countIf(nps <= 6)) / count(nps)) AS nps,
         CAST(NULL AS Nullable(Float64)) AS handling, CAST(NULL AS Nullable(Float64)) AS revenue
  FROM journey.feedback FINAL
  WHERE {CH_JOURNEY} AND stage != '' AND {CH_PERIOD} AND {CH_CHANNEL}
  GROUP BY stage, channel
  UNION ALL
  SELECT 'events', stage, channel, NULL, NULL,
         if(count(duration) = 0, NULL, avg(duration)),
         if(count(value) = 0, NULL, sum(value))
  FROM (
    SELECT channel, {stage_of_type_sql(journeys)} AS stage,
           if(JSONType(properties, {_sql_str(DURATION_PROPERTY)}) IN ('Int64', 'UInt64', 'Double')
              AND JSONExtractFloat(properties, {_sql_str(DURATION_PROPERTY)}) >= 0,
              JSONExtractFloat(properties, {_sql_str(DURATION_PROPERTY)}), NULL) AS duration,
           if(JSONType(properties, {_sql_str(REVENUE_PROPERTY)}) IN ('Int64', 'UInt64', 'Double'),
              JSONExtractFloat(properties, {_sql_str(REVENUE_PROPERTY)}), NULL) AS value
    FROM journey.events FINAL
    WHERE {CH_PERIOD} AND {CH_CHANNEL}
  )
  WHERE stage != '' AND (duration IS NOT NULL OR value IS NOT NULL)
  GROUP BY stage, channel
)
GROUP BY stage, channel
ORDER BY indexOf({stage_order}, stage), channel
"""
                )
            ],
            decimals=2,
            overrides=[override("byName", "handling_time", unit="s", decimals=0)],
        ),
        w=12,
        h=9,
    )
    return dashboard(
        "journey-scorecard",
        "Journey scorecard",
        "The journey score and its components live (Prometheus), and each stage's KPIs, the "
        "worst channels and where customers are lost over any period (ClickHouse).",
        b,
        journey_variables(),
        time_from="now-7d",
        refresh="1m",
    )


def _ref(i: int) -> str:
    return chr(ord("A") + i)


def _stage_union(journeys: Sequence[Journey]) -> list[str]:
    """Every journey's stages, in order of first appearance; a target per stage keeps order."""
    return list(dict.fromkeys(s for j in journeys for s in j.stage_names))


def generate_dashboards(
    journeys: Sequence[Journey], windows: RuleWindows = DEFAULT_WINDOWS
) -> dict[str, JSON]:
    """Every dashboard by file name (``<uid>.json``)."""
    boards = [
        journey_live(journeys, windows),
        channels_and_consistency(journeys, windows),
        funnels_and_time_in_stage(journeys),
        scorecards(journeys),
        pipeline_health(windows),
    ]
    return {f"{b['uid']}.json": b for b in boards}


def render(board: JSON) -> str:
    """A dashboard file's text: stable key order and indentation, so diffs stay readable."""
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(
    directory: Path, journeys: Sequence[Journey], windows: RuleWindows = DEFAULT_WINDOWS
) -> list[Path]:
    """Write every dashboard into ``directory``; stale ones are the caller's to delete."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, board in generate_dashboards(journeys, windows).items():
        path = directory / name
        path.write_text(render(board), encoding="utf-8")
        written.append(path)
    return written


def iter_targets(board: JSON) -> Iterable[tuple[JSON, JSON]]:
    """(panel, target) for every query of a dashboard, rows' nested panels included."""
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target


# --------------------------------------------------------------------------- interpolation
#
# What Grafana does to a panel's query before a datasource runs it, for the
# syntax these dashboards use: so a test (or a person at a terminal) can run
# exactly what a panel would. Variables are the frontend's (templateSrv);
# ``$__conditionalAll`` is the ClickHouse plugin's frontend; the ``$__time…``
# macros are the plugin's backend (pkg/macros).

# Grafana's own variable pattern: $name, [[name]] or [[name:fmt]], ${name} or ${name:fmt}.
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}"
)
# The value of a multi-value variable set to "All" (what $__conditionalAll looks for).
ALL = "$__all"

Value = str | Sequence[str]


def _format(value: Value, fmt: str | None, default: Callable[[Sequence[str]], str]) -> str:
    if isinstance(value, str):
        values: Sequence[str] = [value]
        if fmt in (None, "raw", "text", "regex"):
            return value
    else:
        values = value
    if fmt is None:
        return default(values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "regex":
        return "(" + "|".join(re.escape(v) for v in values) + ")"
    raise ValueError(f"variable format {fmt!r} is not one these dashboards use")


def interpolate(
    text: str,
    values: Mapping[str, Value],
    multi: Callable[[Sequence[str]], str] = lambda vs: "{" + ",".join(vs) + "}",
) -> str:
    """Replace Grafana variables by ``values``; names it does not know stay as they are.

    ``multi`` formats a list of values without an explicit format (each
    datasource has its own: a regex group for Prometheus, quoted for SQL).
    Like Grafana, ``$__macro`` names that are not variables are left for the
    datasource.
    """

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name not in values:
            return m.group(0)
        return _format(values[name], fmt, multi)

    return _VARIABLE.sub(replace, text)


def prometheus_query(expr: str, values: Mapping[str, Value]) -> str:
    """A panel's PromQL as Grafana sends it: variables and $__range & co. replaced.

    ``values`` holds the dashboard variables (a multi-value "All" as its
    allValue, ``.*``) and Grafana's ``__interval``, ``__rate_interval`` and
    ``__range``. Raises ValueError if anything is left unexpanded.
    """
    out = interpolate(expr, values, lambda vs: "(" + "|".join(re.escape(v) for v in vs) + ")")
    if "$" in out:
        raise ValueError(f"unexpanded variable in {out!r}")
    return out


def _macro_args(text: str, open_paren: int) -> tuple[list[str], int]:
    """Arguments of the macro call whose "(" is at ``open_paren``, and the index after ")"."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(text[start:i])
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    raise ValueError(f"unbalanced parentheses after {text[:open_paren]!r}")


def _conditional_all(text: str, values: Mapping[str, Value]) -> str:
    """The plugin's ``$__conditionalAll(condition, $var)``: ``1=1`` when var is All."""
    macro = "$__conditionalAll"
    while (at := text.rfind(macro + "(")) != -1:
        args, end = _macro_args(text, at + len(macro))
        if len(args) != 2:
            raise ValueError(f"$__conditionalAll takes 2 arguments, got {args!r}")
        name = args[1].strip().lstrip("$").strip("{}")
        value = values.get(name)
        is_all = value is not None and (
            value in (ALL, "") or (not isinstance(value, str) and ALL in value)
        )
        text = text[:at] + ("1=1" if is_all else args[0]) + text[end:]
    return text


def clickhouse_query(
    raw_sql: str,
    values: Mapping[str, Value],
    start: datetime,
    end: datetime,
    interval_seconds: int,
) -> str:
    """A panel's SQL as the ClickHouse plugin runs it over [start, end].

    ``values`` holds the dashboard variables (``ALL`` for "All"). The time
    macros expand as the plugin's backend does (seconds, UTC). Raises
    ValueError for a macro it does not know or anything left unexpanded.
    """
    text = _conditional_all(raw_sql, values)
    text = interpolate(text, values, lambda vs: ",".join("'" + v + "'" for v in vs))
    t0, t1 = int(start.timestamp()), int(end.timestamp())
    interval = max(interval_seconds, 1)

    def macro(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in ("fromTime", "toTime"):
            return f"toDateTime({t0 if name == 'fromTime' else t1})"
        if name == "interval_s":
            return str(interval)
        raise ValueError(f"macro $__{name} is not one these dashboards use")

    out = []
    pos = 0
    for m in re.finditer(r"\$__(timeFilter|timeInterval)\(", text):
        if m.start() < pos:
            continue
        args, end_at = _macro_args(text, m.end() - 1)
        if len(args) != 1:
            raise ValueError(f"$__{m.group(1)} takes one column, got {args!r}")
        col = args[0].strip()
        out.append(text[pos : m.start()])
        if m.group(1) == "timeFilter":
            out.append(f"{col} >= toDateTime({t0}) AND {col} <= toDateTime({t1})")
        else:
            out.append(f"toStartOfInterval(toDateTime({col}), INTERVAL {interval} second)")
        pos = end_at
    out.append(text[pos:])
    text = re.sub(r"\$__(\w+)", macro, "".join(out))
    if "$" in text:
        raise ValueError(f"unexpanded variable in {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dashboards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--journeys", type=Path, default=None, help="journey file (default: built-in)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path(DASHBOARDS_DIR), help="directory to write into"
    )
    args = parser.parse_args(argv)
    for path in write_dashboards(args.output, load_journeys(args.journeys)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()


__all__ = [
    "ALL",
    "CLICKHOUSE",
    "DASHBOARDS_DIR",
    "PROMETHEUS",
    "Board",
    "clickhouse_query",
    "consistency_sql",
    "generate_dashboards",
    "inline_parameters",
    "interpolate",
    "iter_targets",
    "kpi_sql",
    "prometheus_query",
    "render",
    "stages_sql",
    "write_dashboards",
]
