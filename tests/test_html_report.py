"""`journey report --html`: a well-formed, offline, escaped page from hand-made reports and chDB."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.embedded import free_port
from pipeline.html_report import render_html
from pipeline.report import time_bucket
from pipeline.sinks.clickhouse import ClickHouseSink, transition_row
from pipeline.stages import Transition

STAGES = ["awareness", "consideration", "purchase"]
EVIL = "<script>alert('x')</script>"


def _cell(advanced: int, dropped: int) -> dict[str, Any]:
    exits = advanced + dropped
    return {
        "exits": exits,
        "advanced": advanced,
        "dropped": dropped,
        "dropoff": dropped / exits if exits else None,
    }


def _report(channel: str = "web", journey: str = "retail") -> dict[str, Any]:
    """A full report of three stages with the extra sections the page draws."""
    cells = {"awareness": _cell(6, 4), "consideration": _cell(3, 3), "purchase": _cell(0, 0)}
    return {
        "journey": journey,
        "since": "2026-01-01T00:00:00+00:00",
        "until": "2026-01-02T00:00:00+00:00",
        "stages": [
            {
                "stage": "awareness",
                "entered": 10,
                "reached": 11,
                "conversion": None,
                "by_channel": {channel: 10},
            },
            {
                "stage": "consideration",
                "entered": 6,
                "reached": 7,
                "conversion": 7 / 11,
                "by_channel": {channel: 6},
            },
            {
                "stage": "purchase",
                "entered": 4,
                "reached": 4,
                "conversion": 4 / 7,
                "by_channel": {channel: 4},
            },
        ],
        "dropoff": {
            "journey": journey,
            "stages": [
                {"stage": s, **c, "by_channel": {channel: c} if c["exits"] else {}}
                for s, c in cells.items()
            ],
        },
        "consistency": {
            "journey": journey,
            "min_exits": 20,
            "stages": [{"stage": s, "index": None, "by_channel": {}} for s in STAGES],
        },
        "flows": {
            "journey": journey,
            "by_channel": {
                channel: [
                    {"from": "awareness", "to": "consideration", "exits": 5},
                    {"from": "awareness", "to": "purchase", "exits": 1},
                    {"from": "awareness", "to": None, "exits": 4},
                    {"from": "consideration", "to": "purchase", "exits": 3},
                    {"from": "consideration", "to": None, "exits": 3},
                ]
            },
        },
        "consistency_over_time": {
            "journey": journey,
            "min_exits": 20,
            "bucket_seconds": 3600,
            "buckets": [f"2026-01-01T{h:02}:00:00+00:00" for h in range(3)],
            "stages": [
                {"stage": "awareness", "index": [1.0, None, 0.5], "exits": [40, 3, 44]},
                {"stage": "consideration", "index": [None, None, None], "exits": [0, 0, 0]},
                {"stage": "purchase", "index": [0.9, 0.8, 0.7], "exits": [40, 41, 42]},
            ],
        },
    }


def _worker_report() -> dict[str, Any]:
    """What a worker's /report sends: journey_report without the page's extra sections."""
    report = _report()
    del report["flows"], report["consistency_over_time"]
    return report


def _empty_report() -> dict[str, Any]:
    report = _report()
    for s in report["stages"]:
        s.update(entered=0, reached=0, conversion=None, by_channel={})
    return report


class _Balance(HTMLParser):
    """Checks that every opened element is closed, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        """``<x/>`` opens and closes at once."""

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (self.open[-3:], tag)
        self.open.pop()


def _parse(page: str) -> ET.Element:
    balance = _Balance()
    balance.feed(page)
    balance.close()
    assert balance.open == []
    return ET.fromstring(page.removeprefix("<!DOCTYPE html>"))


@pytest.mark.parametrize(
    "reports",
    [[_report()], [_worker_report()], [_empty_report()], [_report(), _report(journey="b2b")], []],
    ids=["full", "from-a-worker", "empty", "two-journeys", "no-journeys"],
)
def test_page_is_well_formed_and_offline(reports: list[dict[str, Any]]) -> None:
    """Every variant parses as XML, balances as HTML, and refers to nothing outside itself."""
    page = render_html(reports, ["web", "app"])
    root = _parse(page)
    assert root.tag == "html"
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert "@import" not in page and "url(" not in page


def test_full_page_draws_every_section() -> None:
    """Funnel bars, a flow diagram per channel with skip and drops, a coloured table, lines."""
    page = render_html([_report()], ["web"])
    root = _parse(page)
    svgs = root.findall(".//svg")
    labels = [s.get("aria-label") for s in svgs]
    assert labels == [
        "funnel",
        "stage flow, channel web",
        "consistency over time, stage awareness",
        "consistency over time, stage consideration",
        "consistency over time, stage purchase",
    ]
    titles = [t.text for t in root.iter("title")]
    assert "web: awareness → purchase: 1 exits" in titles  # the skip is drawn as such
    assert "web: awareness → dropped: 4 exits (40.0% of exits)" in titles
    assert "2026-01-01 00:00: 1.00 (40 exits)" in titles
    # A gap in the index breaks the line: awareness has two lone points, purchase one line.
    assert len(svgs[2].findall("polyline")) == 0 and len(svgs[2].findall("circle")) == 2
    assert len(svgs[4].findall("polyline")) == 1
    assert "no index in any bucket" in "".join(svgs[3].itertext())
    cells = [td for td in root.iter("td") if td.get("style")]
    assert any("hsl(72, 70%, 80%)" in (td.get("style") or "") for td in cells)  # 40% drop-off
    assert "per hour" in page


def test_names_are_escaped() -> None:
    """A channel, stage or journey named like markup shows as text and never becomes markup."""
    evil = orjson.dumps(EVIL).decode()
    report = orjson.loads(
        orjson.dumps(_report(channel=EVIL, journey=EVIL)).decode().replace('"awareness"', evil)
    )
    page = render_html([report], [], notes=[EVIL])
    root = _parse(page)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert root.find(".//script") is None
    assert f"stage flow, channel {EVIL}" in [s.get("aria-label") for s in root.iter("svg")]
    assert f"Journey {EVIL}" in [h.text for h in root.iter("h2")]
    assert f"{EVIL}: {EVIL} → consideration: 5 exits" in [t.text for t in root.iter("title")]


def test_empty_period_says_no_data() -> None:
    """A period without transitions shows a clear message instead of empty charts."""
    page = render_html([_empty_report()], ["web"])
    root = _parse(page)
    assert "No data: no transitions in this period." in page
    assert root.find(".//svg") is None


def test_worker_report_is_drawn_with_what_it_has_and_says_so() -> None:
    """Without flows and time buckets: advances drawn to the next stage, overall index instead."""
    root = _parse(render_html([_worker_report()], ["web"]))
    text = "".join(root.itertext())
    assert "every advance is drawn to the next stage" in text
    assert "Consistency over time was not available" in text
    titles = [t.text for t in root.iter("title")]
    assert "web: awareness → consideration: 6 exits" in titles
    assert not any("awareness → purchase" in (t or "") for t in titles)


def test_funnel_only_report_from_an_old_worker_renders() -> None:
    """The oldest worker sends the funnel alone; the other sections say they are missing."""
    report = {"journey": "retail", "stages": _report()["stages"]}
    page = render_html([report], ["web"])
    _parse(page)
    assert "Not available: the report has no drop-off section." in page


@pytest.mark.parametrize(
    ("span", "bucket"),
    [(0, 60), (47 * 60, 60), (48 * 60, 300), (3_600, 300), (86_400, 3_600), (30 * 86_400, 86_400),
     (400 * 86_400, 7 * 86_400), (10_000 * 86_400, 7 * 86_400)],
)  # fmt: skip
def test_time_bucket_keeps_charts_under_48_points(span: float, bucket: int) -> None:
    """Minutes for a short run, hours for a day or two, days for a month, weeks beyond."""
    assert time_bucket(span) == bucket


# ---------------------------------------------------------------- through chDB and the CLI

# A bucket boundary for 5-minute buckets (the data spans an hour): a multiple of 300.
B = 1_700_000_100.0


def _tr(customer: str, from_stage: str | None, to_stage: str | None, kind: str, channel: str,
        at: float) -> Transition:  # fmt: skip
    event = "" if kind == "dropped" else f"{customer}-{at}"
    return Transition("retail", customer, from_stage, to_stage, kind, channel, event, at, 60.0)


def _traffic() -> list[Transition]:
    """80 customers on web and app with hand-counted exits out of awareness, plus one skip.

    First bucket: web 10 of 20 advance, app 10 of 20 → index 1.00. An hour later:
    web 20 of 20, app 10 of 20 → ratios 1.0 and 0.5, 1 − 0.25/0.75 = 0.67.
    """
    rows = []
    for channel, advanced in (("web", (10, 20)), ("app", (10, 10))):
        for hour in (0, 1):
            for k in range(20):
                customer = f"{channel}{hour}-{k}"
                at = B + hour * 3_600 + k
                rows.append(_tr(customer, None, "awareness", "entered", channel, at - 100))
                if k < advanced[hour]:
                    rows.append(
                        _tr(customer, "awareness", "consideration", "advanced", channel, at)
                    )
                else:
                    rows.append(_tr(customer, "awareness", None, "dropped", channel, at))
    rows.append(_tr("s", None, "awareness", "entered", "store", B))
    rows.append(_tr("s", "awareness", "purchase", "advanced", "store", B + 50))
    return rows


@pytest.mark.services
async def test_html_command_shows_the_numbers_from_chdb(
    chdb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`journey report --html` reads chDB directly and the page shows the hand-counted figures."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    sink.add_transitions([transition_row(r) for r in _traffic()])
    await sink.flush()
    await sink.close()

    monkeypatch.setenv("JOURNEY_CLICKHOUSE_DSN", f"chdb://{chdb_path}")
    monkeypatch.setenv("JOURNEY_WEB_PORT", str(free_port()))  # no worker there to ask
    monkeypatch.delenv("JOURNEY_JOURNEYS", raising=False)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    root = _parse(page)
    assert "http://" not in page and "https://" not in page

    texts = [t.text for t in root.iter("text")]
    assert "81 reached · 81 entered" in texts  # awareness
    assert "51 reached · 50 entered · 63.0% of previous" in texts  # 51/81, the skip counts
    titles = [t.text for t in root.iter("title")]
    assert "web: awareness → consideration: 30 exits" in titles
    assert "web: awareness → dropped: 10 exits (25.0% of exits)" in titles
    assert "app: awareness → dropped: 20 exits (50.0% of exits)" in titles
    assert "store: awareness → purchase: 1 exits" in titles
    rows = {
        tr[0].text: ["".join(td.itertext()) for td in tr[1:]]
        for tr in root.iter("tr")
        if len(tr) and tr[0].tag == "td"
    }
    # exits, dropped, drop-off, then web, app, store (configured order, then the rest)
    assert rows["awareness"][:3] == ["81", "30", "37.0% (30/81)"]
    assert "25.0% (10/40)" in rows["awareness"] and "50.0% (20/40)" in rows["awareness"]
    # Consistency of awareness in its two 5-minute buckets, an hour apart.
    assert "2023-11-14 22:15: 1.00 (41 exits)" in titles  # the store skip is under 20 exits
    assert "2023-11-14 23:15: 0.67 (40 exits)" in titles
    assert "per 5 minutes" in page


def test_html_command_from_a_worker_renders_what_it_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --worker-url the page is drawn from the worker's answer and says what is missing."""

    class Answer(io.BytesIO):
        def __enter__(self) -> Answer:
            return self

    def urlopen(url: str, timeout: float) -> Answer:
        assert "/report?" in url
        return Answer(orjson.dumps([_worker_report()]))

    monkeypatch.setattr("pipeline.cli.urllib.request.urlopen", urlopen)
    out = tmp_path / "report.html"
    worker = "http" + "://127.0.0.1:9"
    result = CliRunner().invoke(cli, ["report", "--worker-url", worker, "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    _parse(page)
    assert "Read from the worker at 127.0.0.1:9" in page
    assert "http://" not in page
    assert "every advance is drawn to the next stage" in page


def test_default_bounds_read_as_all_history() -> None:
    from pipeline.html_report import render_html
    from pipeline.report import REPORT_END, REPORT_START

    page = render_html(
        [{"journey": "retail", "stages": []}], ["web"], period=(REPORT_START, REPORT_END)
    )
    assert "Period (event time, UTC): all history" in page
    assert "1970-01-01" not in page


def _card(journey: str, score: float | None, channel: str = "web") -> dict[str, Any]:
    """A scorecard as ``pipeline.scorecard.scorecard`` returns it, hand-filled."""
    cell = {
        "exits": 10,
        "advanced": 6,
        "dropped": 4,
        "progression": 0.6,
        "dropoff": 0.4,
        "time_in_stage": {"count": 10, "avg": 3_600.0, "p90": 7_200.0},
        "csat": 4.5,
        "csat_responses": 2,
        "nps": -20.0,
        "nps_responses": 5,
        "handling_time": 240.0,
        "handled_events": 3,
        "revenue": 1_234.5,
        "consistency_effect": -0.12,
    }
    components = {
        "conversion": {"value": 0.5, "weight": 0.4, "reached_goal": 5, "reached_first": 10},
        "dropoff": {"value": 0.6, "weight": 0.2, "dropped": 4, "exits": 10, "dropoff": 0.4},
        "time_to_goal": {
            "value": 0.9,
            "weight": 0.2,
            "median_seconds": 3_600.0,
            "customers": 5,
            "limit_seconds": 36_000.0,
        },
        "satisfaction": {"value": None, "weight": 0.2, "csat": None, "nps": None},
    }
    up = {"direction": "up", "relative": 0.25, "improved": False}
    return {
        "journey": journey,
        "rank": 1,
        "goal": "purchase",
        "score": score,
        "score_change": {"direction": None, "relative": None, "improved": None},
        "previous_period": {
            "since": "2025-12-31T00:00:00+00:00",
            "until": "2026-01-01T00:00:00+00:00",
        },
        "components": components,
        "channels": [{"channel": channel, "rank": 1, "score": score, "components": components}],
        "stages": [
            {
                "stage": "awareness",
                "kpis": [
                    {"name": "visits", "unit": "number", "value": 10.0, "previous": 8.0, **up},
                    {
                        "name": "ctr",
                        "unit": "percent",
                        "value": None,
                        "previous": 0.1,
                        "direction": None,
                        "relative": None,
                        "improved": None,
                    },
                ],
                "worst_channel": {
                    "channel": channel,
                    "progression": 0.6,
                    "others": 0.8,
                    "gap": 0.2,
                    "exits": 10,
                    "low_volume": True,
                },
                "channels": {channel: cell},
            },
        ],
        "most_lost": {
            "stage": "awareness",
            "exits": 10,
            "advanced": 6,
            "dropped": 4,
            "dropoff": 0.4,
        },
    }


def test_scorecard_section_ranks_journeys_and_escapes_names() -> None:
    """Journeys ranked at the top; per journey the score, channels, KPIs and where to look."""
    first = {**_report(), "scorecard": _card("retail", 71.34, channel=EVIL)}
    second = {**_report(journey="b2b"), "scorecard": {**_card("b2b", None), "rank": 2}}
    page = render_html([first, second], ["web"])
    root = _parse(page)
    text = "".join(root.itertext())
    assert EVIL not in page and "&lt;script&gt;" in page
    assert "Journeys ranked by score" in text
    assert text.index("retail") < text.index("b2b")
    for fragment in (
        "71.3",  # the score
        "50.0% (5/10)",  # conversion with its counts
        "↑ 25.0%",  # the KPI moved up, and that is worse here
        "Most customers are lost at awareness",
        "20.0 points below the other channels",
        "1,234.50",
        "-0.12",
        "4m 0s",  # handling time
    ):
        assert fragment in text, fragment
    assert 'class="worse"' in page


def test_a_report_without_a_scorecard_has_no_ranking() -> None:
    page = render_html([_report()], ["web"])
    assert "Journeys ranked by score" not in page and "Scorecard" not in page
