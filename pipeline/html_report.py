"""`journey report --html`: the report as one self-contained page, for people without Grafana.

Pure rendering: it takes the dicts ``pipeline.report.journey_report`` returns,
plus ``flows`` and ``consistency_over_time`` from ``pipeline.report.html_extras``
when ClickHouse was read directly (a worker's ``/report`` does not send them; the
page then says what it left out), and ``scorecard`` from ``pipeline.scorecard``
when there is one (journeys ranked at the top, a scorecard per journey).
Everything is inline (CSS, SVG drawn here), so the page works offline. Every
name from the data goes through ``html.escape``; the output is also
well-formed XML, so tests can parse it whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

from pipeline.journeys import SCORE_COMPONENTS
from pipeline.report import REPORT_END, REPORT_START, human_duration
from pipeline.scorecard import format_value

MISSING = "–"

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
.meta, .note { color: #555; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
.nodata { color: #777; font-style: italic; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.better { color: #1a7f37; } .worse { color: #c62828; }
.score { font-size: 1.6em; font-weight: bold; }
svg { display: block; margin: 0.5em 0; font-size: 12px; }
svg text { fill: #333; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
"""

ADVANCE_COLOUR = "#4e79a7"
DROP_COLOUR = "#e15759"
NODE_COLOUR = "#555"


def _e(value: object) -> str:
    return escape(str(value))


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1%}"


def _ordered(channels: Sequence[str], seen: Iterable[str]) -> list[str]:
    """Configured channels first in their order, then any others the data has."""
    rest = set(seen)
    return [c for c in channels if c in rest] + sorted(rest - set(channels))


def _num(x: float) -> str:
    return f"{x:.1f}"


# ---------------------------------------------------------------- the page


def _period(since: str | None, until: str | None) -> str:
    """The period in words; the report's default bounds mean all history."""
    if since == REPORT_START.isoformat() and until == REPORT_END.isoformat():
        return "all history"
    return f"{_e(since or '?')} to {_e(until or '?')}"


def render_html(
    reports: Sequence[Mapping[str, Any]],
    channels: Sequence[str],
    notes: Sequence[str] = (),
    period: tuple[datetime, datetime] | None = None,
    generated_at: datetime | None = None,
) -> str:
    """The whole page as a string; ``notes`` are shown at the top (e.g. what a worker lacked).

    Without ``period``, the first report's ``since`` and ``until`` name the period.
    """
    first: Mapping[str, Any] = reports[0] if reports else {}
    since, until = (
        (period[0].isoformat(), period[1].isoformat())
        if period
        else (first.get("since"), first.get("until"))
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        "<title>Journey report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Journey report</h1>",
        f'<p class="meta">Period (event time, UTC): {_period(since, until)}'
        + (f"; generated {_e(generated_at.isoformat(timespec='seconds'))}" if generated_at else "")
        + "</p>",
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    if not reports:
        parts.append('<p class="nodata">No journeys to report.</p>')
    cards = [r["scorecard"] for r in reports if "scorecard" in r]
    if cards:
        parts.append(_ranking(cards))
    for report in reports:
        parts.append(_journey(report, channels))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _journey(report: Mapping[str, Any], channels: Sequence[str]) -> str:
    out = [f"<section><h2>Journey {_e(report['journey'])}</h2>"]
    if "scorecard" in report:
        out.append("<h3>Scorecard</h3>")
        out.append(_scorecard(report["scorecard"], channels))
    if not any(s["reached"] for s in report["stages"]):
        out.append('<p class="nodata">No data: no transitions in this period.</p></section>')
        return "\n".join(out)
    out.append("<h3>Funnel</h3>")
    out.append(_funnel(report["stages"]))
    out.append("<h3>Stage flow per channel</h3>")
    out.append(_flows_section(report, channels))
    out.append("<h3>Drop-off by stage and channel</h3>")
    out.append(_dropoff_section(report.get("dropoff"), channels))
    out.append("<h3>Cross-channel consistency over time</h3>")
    out.append(_consistency_section(report))
    out.append("</section>")
    return "\n".join(out)


# ---------------------------------------------------------------- funnel


def _funnel(stages: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars of "reached (or beyond)", with entered and conversion beside them."""
    label_w, bar_w, row_h = 160, 420, 28
    top = max((s["reached"] for s in stages), default=0) or 1
    height = row_h * len(stages) + 10
    rows = []
    for i, s in enumerate(stages):
        y = 5 + i * row_h
        w = bar_w * s["reached"] / top
        conversion = "" if i == 0 else f" · {_percent(s['conversion'])} of previous"
        text = f"{s['reached']} reached · {s['entered']} entered{conversion}"
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{_e(s["stage"])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{_num(max(w, 1))}" height="{row_h - 6}" '
            f'fill="{ADVANCE_COLOUR}"><title>{_e(s["stage"])}: {_e(text)}</title></rect>'
            f'<text x="{_num(label_w + max(w, 1) + 6)}" y="{y + 16}">{_e(text)}</text>'
        )
    svg = (
        f'<svg width="{label_w + bar_w + 260}" height="{height}" role="img" '
        f'aria-label="funnel">{"".join(rows)}</svg>'
    )
    return svg + (
        '<p class="meta">reached: got at least this far (entered it or a later stage); '
        "conversion: reached / reached of the previous stage.</p>"
    )


# ---------------------------------------------------------------- stage flows


def _flows_section(report: Mapping[str, Any], channels: Sequence[str]) -> str:
    stage_names = [s["stage"] for s in report["stages"]]
    if "flows" in report:
        flows: Mapping[str, Sequence[Mapping[str, Any]]] = report["flows"]["by_channel"]
        note = ""
    elif "dropoff" in report:
        flows = _flows_from_dropoff(report["dropoff"], stage_names)
        note = (
            '<p class="note">Stage-to-stage flows were not available (report from a '
            "worker), so every advance is drawn to the next stage; skips are not shown.</p>"
        )
    else:
        return '<p class="note">Not available: the report has no exits per channel.</p>'
    seen = [c for c in _ordered(channels, flows) if flows[c]]
    if not seen:
        return '<p class="nodata">No data: nobody left a stage in this period.</p>'
    parts = [note] if note else []
    for channel in seen:
        parts.append(f"<h4>{_e(channel)}</h4>")
        parts.append(_sankey(stage_names, flows[channel], channel))
    parts.append(
        '<p class="meta">Columns are stages; blue bands are exits that advanced (to the '
        "stage they reached), red bands exits that dropped, on the channel of the exit. "
        "Band width is proportional to exits.</p>"
    )
    return "\n".join(parts)


def _flows_from_dropoff(
    dropoff: Mapping[str, Any], stage_names: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """A worker's report has advanced/dropped per stage and channel but not where advances went."""
    flows: dict[str, list[dict[str, Any]]] = {}
    for i, s in enumerate(dropoff["stages"]):
        following = stage_names[i + 1] if i + 1 < len(stage_names) else None
        for channel, cell in s["by_channel"].items():
            out = flows.setdefault(channel, [])
            if cell["advanced"] and following:
                out.append({"from": s["stage"], "to": following, "exits": cell["advanced"]})
            if cell["dropped"]:
                out.append({"from": s["stage"], "to": None, "exits": cell["dropped"]})
    return flows


def _band(x0: float, y0: float, x1: float, y1: float, thick: float) -> str:
    """A band of constant thickness from (x0, y0) to (x1, y1), top edges given."""
    xm = (x0 + x1) / 2
    return (
        f"M{_num(x0)},{_num(y0)} C{_num(xm)},{_num(y0)} {_num(xm)},{_num(y1)} "
        f"{_num(x1)},{_num(y1)} L{_num(x1)},{_num(y1 + thick)} "
        f"C{_num(xm)},{_num(y1 + thick)} {_num(xm)},{_num(y0 + thick)} "
        f"{_num(x0)},{_num(y0 + thick)} Z"
    )


def _sankey(stage_names: Sequence[str], flows: Sequence[Mapping[str, Any]], channel: str) -> str:
    """Stages as columns, node height = max(exits in, exits out); drops fall to red sinks below."""
    col_gap, node_w, top, area = 190, 12, 34, 200
    index = {name: i for i, name in enumerate(stage_names)}
    # A stage the report does not list (an edited journey file) has no column.
    flows = [f for f in flows if f["from"] in index and (f["to"] is None or f["to"] in index)]
    inflow = [0] * len(stage_names)
    outflow = [0] * len(stage_names)
    for f in flows:
        outflow[index[f["from"]]] += f["exits"]
        if f["to"] is not None:
            inflow[index[f["to"]]] += f["exits"]
    sizes = [max(a, b) for a, b in zip(inflow, outflow, strict=True)]
    scale = area / (max(sizes) or 1)
    x = [20 + i * col_gap for i in range(len(stage_names))]
    out_y = [float(top)] * len(stage_names)
    in_y = [float(top)] * len(stage_names)
    bands, labels = [], []
    ordered = sorted(
        flows,
        key=lambda f: (index[f["from"]], f["to"] is None, index.get(f["to"] or "", 0)),
    )
    bottom = top + area
    for f in ordered:
        i, thick = index[f["from"]], max(f["exits"] * scale, 1.0)
        x0, y0 = x[i] + node_w, out_y[i]
        out_y[i] += thick
        if f["to"] is None:
            x1, y1, colour = x[i] + col_gap * 0.55, top + area + 30.0, DROP_COLOUR
            share = _percent(f["exits"] / outflow[i]) if outflow[i] else MISSING
            what = f"{f['from']} → dropped: {f['exits']} exits ({share} of exits)"
            bands.append(
                f'<rect x="{_num(x1)}" y="{_num(y1)}" width="{node_w}" height="{_num(thick)}" '
                f'fill="{DROP_COLOUR}"/>'
            )
            labels.append(
                f'<text x="{_num(x1 + node_w + 4)}" y="{_num(y1 + 12)}">'
                f"dropped {f['exits']} ({share})</text>"
            )
            bottom = max(bottom, int(y1 + thick))
        else:
            j = index[f["to"]]
            x1, y1, colour = x[j], in_y[j], ADVANCE_COLOUR
            in_y[j] += thick
            what = f"{f['from']} → {f['to']}: {f['exits']} exits"
            if thick >= 12:
                labels.append(
                    f'<text x="{_num((x0 + x1) / 2)}" y="{_num((y0 + y1) / 2 + thick / 2 + 4)}" '
                    f'text-anchor="middle">{f["exits"]}</text>'
                )
        bands.insert(
            0,
            f'<path d="{_band(x0, y0, x1, y1, thick)}" fill="{colour}" fill-opacity="0.45">'
            f"<title>{_e(channel)}: {_e(what)}</title></path>",
        )
    nodes = []
    for i, name in enumerate(stage_names):
        node_h = _num(max(sizes[i] * scale, 1))
        nodes.append(
            f'<rect x="{x[i]}" y="{top}" width="{node_w}" height="{node_h}" '
            f'fill="{NODE_COLOUR}"><title>{_e(name)}: {inflow[i]} in, {outflow[i]} out '
            f"(exits)</title></rect>"
            f'<text x="{x[i]}" y="{top - 18}">{_e(name)}</text>'
            f'<text x="{x[i]}" y="{top - 5}" class="meta">{outflow[i]} exits</text>'
        )
    width = x[-1] + col_gap + 60 if stage_names else 100
    return (
        f'<svg width="{width}" height="{bottom + 30}" role="img" '
        f'aria-label="stage flow, channel {_e(channel)}">'
        f"{''.join(bands)}{''.join(nodes)}{''.join(labels)}</svg>"
    )


# ---------------------------------------------------------------- drop-off table


def _heat(ratio: float) -> str:
    """Green (no drop-off) through yellow to red (all dropped)."""
    hue = 120 * (1 - min(max(ratio, 0.0), 1.0))
    return f"hsl({hue:.0f}, 70%, 80%)"


def _dropoff_cell(cell: Mapping[str, Any] | None) -> str:
    if cell is None or not cell["exits"]:
        return f"<td>{MISSING}</td>"
    return (
        f'<td style="background: {_heat(cell["dropoff"])}">'
        f"{_percent(cell['dropoff'])} <small>({cell['dropped']}/{cell['exits']})</small></td>"
    )


def _dropoff_section(section: Mapping[str, Any] | None, channels: Sequence[str]) -> str:
    if section is None:
        return '<p class="note">Not available: the report has no drop-off section.</p>'
    stages = section["stages"]
    if not any(s["exits"] for s in stages):
        return '<p class="nodata">No data: nobody left a stage in this period.</p>'
    seen = _ordered(channels, {c for s in stages for c in s["by_channel"]})
    head = "".join(f"<th>{_e(c)}</th>" for c in seen)
    rows = [
        "<tr>"
        f"<td>{_e(s['stage'])}</td>"
        f"<td>{s['exits']}</td><td>{s['dropped']}</td>{_dropoff_cell(s)}"
        + "".join(_dropoff_cell(s["by_channel"].get(c)) for c in seen)
        + "</tr>"
        for s in stages
    ]
    return (
        f"<table><thead><tr><th>stage</th><th>exits</th><th>dropped</th><th>drop-off</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="meta">drop-off = dropped / exits, on the channel of the exit; cells show '
        "drop-off (dropped/exits), coloured from green (0%) to red (100%).</p>"
    )


# ---------------------------------------------------------------- consistency over time


def _consistency_section(report: Mapping[str, Any]) -> str:
    series = report.get("consistency_over_time")
    if series is None:
        return _consistency_overall(report.get("consistency"))
    if not series["buckets"]:
        return '<p class="nodata">No data: nobody left a stage in this period.</p>'
    size = series["bucket_seconds"]
    charts = "".join(_line_chart(s, series["buckets"], size) for s in series["stages"])
    return (
        f'<div class="charts">{charts}</div>'
        f'<p class="meta">Index 1 − σ/μ of the channels\' progression ratios (advanced / exits) '
        f"per {_e(_bucket_name(size))}; a point needs two channels with at least "
        f"{series['min_exits']} exits in that bucket, so gaps mean too few exits.</p>"
    )


def _bucket_name(seconds: int) -> str:
    names = {60: "minute", 3_600: "hour", 86_400: "day", 7 * 86_400: "week"}
    return names.get(seconds, f"{seconds // 60} minutes")


def _label(iso: str, size: int) -> str:
    stamp = datetime.fromisoformat(iso)
    return stamp.strftime("%Y-%m-%d" if size >= 86_400 else "%Y-%m-%d %H:%M")


def _line_chart(stage: Mapping[str, Any], buckets: Sequence[str], size: int) -> str:
    left, top, w, h = 40, 24, 420, 120
    values: Sequence[float | None] = stage["index"]
    n = len(buckets)

    def px(i: int) -> float:
        return left + (w / 2 if n == 1 else w * i / (n - 1))

    def py(v: float) -> float:
        return top + h * (1 - v)

    grid = "".join(
        f'<line x1="{left}" y1="{_num(py(v))}" x2="{left + w}" y2="{_num(py(v))}" '
        f'stroke="#ddd"/><text x="{left - 6}" y="{_num(py(v) + 4)}" text-anchor="end">'
        f"{v:.1f}</text>"
        for v in (0.0, 0.5, 1.0)
    )
    lines = []
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    for _, run in itertools.groupby(enumerate(values), key=lambda p: p[1] is not None):
        segment = [(i, v) for i, v in run if v is not None]
        if len(segment) > 1:
            coords = " ".join(f"{_num(px(i))},{_num(py(v))}" for i, v in segment)
            lines.append(
                f'<polyline points="{coords}" fill="none" stroke="{ADVANCE_COLOUR}" '
                f'stroke-width="2"/>'
            )
    dots = "".join(
        f'<circle cx="{_num(px(i))}" cy="{_num(py(v))}" r="3" fill="{ADVANCE_COLOUR}">'
        f"<title>{_e(_label(buckets[i], size))}: {v:.2f} ({stage['exits'][i]} exits)</title>"
        f"</circle>"
        for i, v in points
    )
    axis = (
        f'<text x="{left}" y="{top + h + 18}">{_e(_label(buckets[0], size))}</text>'
        f'<text x="{left + w}" y="{top + h + 18}" text-anchor="end">'
        f"{_e(_label(buckets[-1], size))}</text>"
    )
    empty = (
        ""
        if points
        else f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" '
        'class="nodata">no index in any bucket</text>'
    )
    return (
        f'<svg width="{left + w + 20}" height="{top + h + 28}" role="img" '
        f'aria-label="consistency over time, stage {_e(stage["stage"])}">'
        f'<text x="{left}" y="14" font-weight="bold">{_e(stage["stage"])}</text>'
        f"{grid}{''.join(lines)}{dots}{axis}{empty}</svg>"
    )


def _consistency_overall(section: Mapping[str, Any] | None) -> str:
    """What a worker's report allows: the index over the whole period, per stage."""
    if section is None:
        return '<p class="note">Not available: the report has no consistency section.</p>'
    note = (
        '<p class="note">Consistency over time was not available (report from a worker); '
        "shown instead: the index over the whole period.</p>"
    )
    rows = "".join(
        f"<tr><td>{_e(s['stage'])}</td>"
        f"<td>{MISSING if s['index'] is None else format(s['index'], '.2f')}</td></tr>"
        for s in section["stages"]
    )
    return f"{note}<table><thead><tr><th>stage</th><th>index</th></tr></thead>{rows}</table>"


# ---------------------------------------------------------------- scorecard


def _score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _change(change: Mapping[str, Any]) -> str:
    """An arrow and the relative change, green when better, red when worse."""
    direction = change.get("direction")
    if direction is None:
        return MISSING
    if direction == "same":
        return "="
    arrow = "↑" if direction == "up" else "↓"
    relative = change.get("relative")
    text = arrow if relative is None else f"{arrow} {abs(relative):.1%}"
    return f'<span class="{"better" if change.get("improved") else "worse"}">{text}</span>'


def _component(name: str, c: Mapping[str, Any]) -> str:
    """A component's raw figure, as a person would quote it."""
    if name == "conversion":
        if "reached_first" in c:
            return f"{_percent(c['value'])} ({c['reached_goal']}/{c['reached_first']})"
        return _percent(c["value"])
    if name == "dropoff":
        return f"{_percent(c['dropoff'])} of {c['exits']} exits"
    if name == "time_to_goal":
        return f"{human_duration(c['median_seconds'])} median ({c['customers']} customers)"
    nps = c["nps"]
    return (
        f"CSAT {format_value(c['csat'])}, NPS {MISSING if nps is None else f'{nps:+.0f}'}"
        if c["csat"] is not None or nps is not None
        else MISSING
    )


def _ranking(cards: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in SCORE_COMPONENTS)
    rows = "".join(
        f"<tr><td>{_e(card.get('rank', ''))}</td><td>{_e(card['journey'])}</td>"
        f"<td>{_score(card['score'])}</td><td>{_change(card['score_change'])}</td>"
        + "".join(f"<td>{_e(_component(c, card['components'][c]))}</td>" for c in SCORE_COMPONENTS)
        + "</tr>"
        for card in sorted(cards, key=lambda c: c.get("rank", 0))
    )
    return (
        "<h2>Journeys ranked by score</h2>"
        f"<table><thead><tr><th>rank</th><th>journey</th><th>score</th><th>vs previous</th>"
        f"{head}</tr></thead><tbody>{rows}</tbody></table>"
        '<p class="meta">Score 0–100: the weighted mean of the components that have data '
        "(each 0–1, 1 best); the components are shown so nobody has to trust one number.</p>"
    )


def _scorecard(card: Mapping[str, Any], channels: Sequence[str]) -> str:
    weights = ", ".join(f"{_e(c)} {card['components'][c]['weight']:g}" for c in SCORE_COMPONENTS)
    parts = [
        f'<p><span class="score">{_score(card["score"])}</span> / 100 '
        f"(goal: {_e(card['goal'])}; weights: {weights})</p>"
    ]
    ranked = "".join(
        f"<tr><td>{ch['rank']}</td><td>{_e(ch['channel'])}</td><td>{_score(ch['score'])}</td>"
        + "".join(f"<td>{_e(_component(c, ch['components'][c]))}</td>" for c in SCORE_COMPONENTS)
        + "</tr>"
        for ch in card["channels"]
    )
    head = "".join(f"<th>{_e(c)}</th>" for c in SCORE_COMPONENTS)
    parts.append(
        "<h4>Channels ranked</h4>"
        + (
            f"<table><thead><tr><th>rank</th><th>channel</th><th>score</th>{head}</tr></thead>"
            f"<tbody>{ranked}</tbody></table>"
            if ranked
            else '<p class="nodata">No data: no channel carried anyone in this period.</p>'
        )
    )
    period = card["previous_period"]
    against = (
        f"the previous period ({_e(period['since'])} to {_e(period['until'])})"
        if period
        else "nothing: all of history has no previous period"
    )
    kpi_rows = "".join(
        f"<tr><td>{_e(s['stage']) if i == 0 else ''}</td><td>{_e(k['name'])}</td>"
        f"<td>{_e(format_value(k['value'], k['unit']))}</td>"
        f"<td>{_e(format_value(k['previous'], k['unit']))}</td><td>{_change(k)}</td></tr>"
        for s in card["stages"]
        for i, k in enumerate(s["kpis"])
    )
    parts.append(
        f"<h4>Stage KPIs against {against}</h4>"
        + (
            "<table><thead><tr><th>stage</th><th>KPI</th><th>value</th><th>previous</th>"
            f"<th>change</th></tr></thead><tbody>{kpi_rows}</tbody></table>"
            if kpi_rows
            else '<p class="nodata">The journey file declares no KPIs for this journey.</p>'
        )
    )
    perf_rows = []
    for s in card["stages"]:
        for i, ch in enumerate(_ordered(channels, s["channels"])):
            c = s["channels"][ch]
            effect = c["consistency_effect"]
            nps = c["nps"]
            cells = [
                str(c["exits"]),
                _percent(c["progression"]),
                _percent(c["dropoff"]),
                human_duration(c["time_in_stage"]["avg"]),
                human_duration(c["time_in_stage"]["p90"]),
                format_value(c["csat"]),
                MISSING if nps is None else f"{nps:+.0f}",
                human_duration(c["handling_time"]),
                format_value(c["revenue"]),
                MISSING if effect is None else f"{effect:+.2f}",
            ]
            perf_rows.append(
                f"<tr><td>{_e(s['stage']) if i == 0 else ''}</td><td>{_e(ch)}</td>"
                + "".join(f"<td>{_e(x)}</td>" for x in cells)
                + "</tr>"
            )
    columns = ["exits", "progression", "drop-off", "avg time", "p90 time", "CSAT", "NPS"]
    columns += ["handling", "revenue", "consistency ±"]
    parts.append(
        "<h4>Channel performance by stage</h4>"
        "<table><thead><tr><th>stage</th><th>channel</th>"
        + "".join(f"<th>{c}</th>" for c in columns)
        + f"</tr></thead><tbody>{''.join(perf_rows)}</tbody></table>"
        '<p class="meta">handling: mean <code>duration</code> of the channel\'s events of the '
        "stage; revenue: sum of <code>order_value</code>; consistency ±: the stage's index "
        "with the channel minus without it.</p>"
    )
    look = []
    lost = card["most_lost"]
    if lost is not None:
        look.append(
            f"<li>Most customers are lost at <b>{_e(lost['stage'])}</b>: {lost['dropped']} "
            f"dropped ({_percent(lost['dropoff'])} of {lost['exits']} exits).</li>"
        )
    for s in card["stages"]:
        w = s["worst_channel"]
        if w is not None:
            note = " (few exits: every channel compared)" if w["low_volume"] else ""
            look.append(
                f"<li>{_e(s['stage'])}: <b>{_e(w['channel'])}</b> carries "
                f"{_percent(w['progression'])} forward, {w['gap'] * 100:.1f} points below the "
                f"other channels ({_percent(w['others'])}), over {w['exits']} exits{_e(note)}.</li>"
            )
    parts.append(
        "<h4>Where to look</h4>"
        + (f"<ul>{''.join(look)}</ul>" if look else '<p class="nodata">Nothing stands out.</p>')
    )
    return "\n".join(parts)
