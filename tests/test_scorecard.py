"""Scorecards: the pure score math, and every KPI from ClickHouse (chDB) on hand-made data.

The hand-made set below has its answers worked out in comments next to the
assertions; a second, random set is checked against a plain-Python
computation of the same definitions. Rows go in through ``ClickHouseSink``
exactly as the worker writes them.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from pipeline.cli import cli
from pipeline.consistency import consistency_index
from pipeline.embedded import Service, free_port
from pipeline.events import Event, Validator
from pipeline.journeys import Journey, Kpi, Weights, default_journeys, parse_journeys
from pipeline.report import (
    REPORT_END,
    REPORT_START,
    Dropoff,
    Exits,
    FeedbackReport,
    Funnel,
    Scores,
    StageDropoff,
    StageRow,
)
from pipeline.scorecard import (
    GoalTimes,
    Inputs,
    chained_conversion,
    combine,
    compare,
    consistency_effects,
    conversion_value,
    dropoff_value,
    evaluate_kpis,
    journey_score,
    live_values,
    make_score,
    previous_period,
    rank,
    ratio,
    render_scorecards,
    satisfaction_value,
    scorecard,
    stage_kpis,
    time_value,
    worst_channel,
)
from pipeline.settings import Settings
from pipeline.sinks.clickhouse import ClickHouseSink, event_row, feedback_row, transition_row
from pipeline.stages import Feedback, Transition

T0 = 1_700_000_000.0
HOUR = 3_600.0
DAY = 86_400.0
COMPONENTS = ("conversion", "dropoff", "time_to_goal", "satisfaction")


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# =========================================================================== pure math


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(1, 2, 0.5), (0, 5, 0.0), (3, 0, None), (None, 2, None), (2, None, None), (0, 0, None)],
)
def test_ratio_has_no_value_without_a_denominator(
    a: float | None, b: float | None, expected: float | None
) -> None:
    assert ratio(a, b) == expected


def test_ratios_are_computed_from_the_measured_kpis_in_file_order() -> None:
    """A ratio divides two measures; a missing or zero denominator gives no value."""
    kpis = (
        Kpi("buyers", "flow", measure="reached"),
        Kpi("conversion", "ratio", operands=("buyers", "prospects")),
        Kpi("prospects", "flow", measure="reached"),
        Kpi("cost", "sum", event_types=("campaign_cost",), prop="amount"),
        Kpi("cpc", "ratio", operands=("cost", "buyers")),
    )
    values = evaluate_kpis(kpis, {"buyers": 4, "prospects": 16, "cost": None})
    assert list(values) == ["buyers", "conversion", "prospects", "cost", "cpc"]
    assert values == {"buyers": 4, "conversion": 0.25, "prospects": 16, "cost": None, "cpc": None}
    assert evaluate_kpis(kpis, {"buyers": 0, "prospects": 0, "cost": 30})["cpc"] is None
    assert evaluate_kpis(kpis, {})["conversion"] is None


@pytest.mark.parametrize(
    ("current", "previous", "better", "expected"),
    [
        (12, 10, "higher", ("up", 0.2, True)),
        (8, 10, "higher", ("down", -0.2, False)),
        (8, 10, "lower", ("down", -0.2, True)),
        (12, 10, "lower", ("up", 0.2, False)),
        (10, 10, "higher", ("same", 0.0, None)),
        (5, 0, "higher", ("up", None, True)),
        (-5, 0, "lower", ("down", None, True)),
        (0, 0, "higher", ("same", None, None)),
        (None, 10, "higher", (None, None, None)),
        (10, None, "higher", (None, None, None)),
        (3, -2, "higher", ("up", 2.5, True)),
    ],
)
def test_compare_says_which_way_and_whether_better(
    current: float | None, previous: float | None, better: str, expected: tuple[Any, ...]
) -> None:
    change = compare(current, previous, better)
    assert change.direction == expected[0]
    assert change.relative == (None if expected[1] is None else pytest.approx(expected[1]))
    assert change.improved is expected[2]


def test_previous_period_has_the_same_length_and_open_ends_stop_at_now() -> None:
    since, until, now = at(T0), at(T0 + 7 * DAY), at(T0 + 30 * DAY)
    assert previous_period(since, until, now) == (at(T0 - 7 * DAY), since)
    # `--days 7`: the period runs to the end of time; it is the 7 days before now.
    assert previous_period(at(T0), REPORT_END, at(T0 + 7 * DAY)) == (at(T0 - 7 * DAY), at(T0))
    assert previous_period(REPORT_START, REPORT_END, now) is None  # all history
    assert previous_period(at(T0), at(T0 + DAY), at(T0 - DAY)) is None  # entirely in the future


@pytest.mark.parametrize(
    ("figures", "expected"),
    [
        ((5, 10), 0.5),
        ((0, 0), None),
        ((3, 3), 1.0),
    ],
)
def test_conversion_value(figures: tuple[int, int], expected: float | None) -> None:
    assert conversion_value(*figures) == expected


def test_component_values_at_their_edges() -> None:
    assert dropoff_value(0, 10) == 1.0 and dropoff_value(10, 10) == 0.0
    assert dropoff_value(0, 0) is None
    assert time_value(0, 100) == 1.0 and time_value(50, 100) == 0.5
    assert time_value(150, 100) == 0.0  # beyond the limit: clamped
    assert time_value(None, 100) is None and time_value(50, None) is None
    assert satisfaction_value(5, 100) == 1.0 and satisfaction_value(1, -100) == 0.0
    assert satisfaction_value(3, None) == 0.5 and satisfaction_value(None, 0) == 0.5
    assert satisfaction_value(4, 0) == pytest.approx((0.75 + 0.5) / 2)
    assert satisfaction_value(None, None) is None
    assert chained_conversion([0.5, None, 0.4]) == pytest.approx(0.2)
    assert chained_conversion([None, None]) is None and chained_conversion([]) is None


WEIGHTS = {"conversion": 0.4, "dropoff": 0.2, "time_to_goal": 0.2, "satisfaction": 0.2}

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
maybe_unit = st.one_of(st.none(), unit)
# Weights are numbers someone writes in a journey file: zero, or not vanishingly small
# (a subnormal weight times a factor can underflow to 0, which is not about proportions).
weight = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=100.0))
component_values = st.fixed_dictionaries({c: maybe_unit for c in COMPONENTS})
component_weights = st.fixed_dictionaries({c: weight for c in COMPONENTS})


@given(component_values, component_weights)
def test_score_is_within_0_and_100_or_has_no_value(
    values: dict[str, float | None], weights: dict[str, float]
) -> None:
    score = combine(values, weights)
    judged = [c for c in COMPONENTS if values[c] is not None and weights[c] > 0]
    if not judged:
        assert score is None
    else:
        assert score is not None and 0.0 <= score <= 100.0


@given(component_values, component_weights, st.sampled_from(COMPONENTS), unit, unit)
def test_score_is_monotone_in_each_component(
    values: dict[str, float | None],
    weights: dict[str, float],
    name: str,
    low: float,
    high: float,
) -> None:
    low, high = min(low, high), max(low, high)
    worse = combine({**values, name: low}, weights)
    better = combine({**values, name: high}, weights)
    if worse is None or better is None:
        assert worse is better is None
    else:
        assert better >= worse - 1e-9


@given(component_values, component_weights, st.floats(min_value=0.01, max_value=1000))
def test_only_the_proportions_of_the_weights_matter(
    values: dict[str, float | None], weights: dict[str, float], factor: float
) -> None:
    scaled = combine(values, {c: w * factor for c, w in weights.items()})
    plain = combine(values, weights)
    assert (scaled is None) == (plain is None)
    if plain is not None and scaled is not None:
        assert scaled == pytest.approx(plain, abs=1e-6)


@given(unit, component_weights)
def test_equal_components_give_that_score(value: float, weights: dict[str, float]) -> None:
    score = combine(dict.fromkeys(COMPONENTS, value), weights)
    if any(w > 0 for w in weights.values()):
        assert score == pytest.approx(100 * value)


def test_a_component_without_data_hands_its_weight_to_the_others() -> None:
    """No survey answers: the other three components make the whole score."""
    values = {"conversion": 0.5, "dropoff": 1.0, "time_to_goal": 0.0, "satisfaction": None}
    assert combine(values, WEIGHTS) == pytest.approx(100 * (0.2 + 0.2 + 0.0) / 0.8)
    assert combine({**values, "satisfaction": 1.0}, WEIGHTS) == pytest.approx(60.0)
    assert combine(dict.fromkeys(COMPONENTS), WEIGHTS) is None
    assert combine(values, {"satisfaction": 1.0}) is None  # the only weighted one has no data


def test_consistency_effect_is_the_index_with_minus_without() -> None:
    counts = {"web": (30, 40), "app": (10, 40), "store": (20, 25), "email": (5, 5)}
    effects = consistency_effects(counts, 20)
    whole = consistency_index(counts, 20)
    assert whole is not None
    without_app = consistency_index({c: v for c, v in counts.items() if c != "app"}, 20)
    assert without_app is not None
    assert effects["app"] == pytest.approx(whole - without_app)
    assert effects["app"] is not None and effects["app"] < 0  # the odd one out drags it down
    assert effects["email"] is None  # too few exits: not one of the index's channels
    # Two channels: without either, there is no index to compare with.
    assert consistency_effects({"web": (10, 20), "app": (5, 20)}, 20) == {"web": None, "app": None}


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        pytest.param(
            {"web": (30, 40), "app": (10, 40), "store": (20, 25)},
            ("app", 0.25, (0.75 + 0.8) / 2, 40, False),
            id="lowest-ratio",
        ),
        pytest.param(
            {"web": (30, 40), "app": (1, 5), "store": (20, 25)},
            ("web", 0.75, 0.8, 40, False),
            id="few-exits-left-out",
        ),
        pytest.param(
            {"web": (3, 4), "app": (1, 5)}, ("app", 0.2, 0.75, 5, True), id="all-low-volume"
        ),
        pytest.param(
            {"web": (10, 20), "app": (10, 20)}, ("app", 0.5, 0.5, 20, False), id="tie-by-name"
        ),
        pytest.param({"web": (10, 20)}, None, id="one-channel"),
        pytest.param({"web": (10, 20), "app": (0, 0)}, None, id="a-channel-without-exits"),
    ],
)
def test_worst_channel(
    counts: dict[str, tuple[int, int]], expected: tuple[Any, ...] | None
) -> None:
    worst = worst_channel(counts, 20)
    if expected is None:
        assert worst is None
        return
    assert worst is not None
    channel, progression, others, exits, low = expected
    assert (worst.channel, worst.exits, worst.low_volume) == (channel, exits, low)
    assert worst.progression == pytest.approx(progression)
    assert worst.others == pytest.approx(others)
    assert worst.gap == pytest.approx(others - progression)


def test_make_score_keeps_every_component_and_its_figures() -> None:
    score = make_score(
        Weights(1, 1, 1, 1),
        (0.5, {"reached_goal": 5, "reached_first": 10}),
        (2, 8),
        GoalTimes(3, 50.0),
        100.0,
        Scores(csat_responses=2, csat_sum=8.0, nps_responses=0),
    )
    assert [c.name for c in score.components] == list(COMPONENTS)
    assert score.component("dropoff").detail == {"dropped": 2, "exits": 8, "dropoff": 0.25}
    assert score.component("satisfaction").value == 0.75
    assert score.score == pytest.approx(100 * (0.5 + 0.75 + 0.5 + 0.75) / 4)
    assert score.to_dict()["components"]["time_to_goal"] == {
        "value": 0.5,
        "weight": 1,
        "median_seconds": 50.0,
        "customers": 3,
        "limit_seconds": 100.0,
    }


def test_channel_scores_from_hand_made_figures_without_clickhouse() -> None:
    """A channel's conversion chains its progression at each stage before the goal."""
    (retail,) = default_journeys()  # goal purchase: awareness and consideration before it
    stages = [
        StageDropoff("awareness", Exits(6, 4), {"web": Exits(4, 1), "app": Exits(2, 3)}),
        StageDropoff("consideration", Exits(3, 1), {"web": Exits(3, 1)}),
        *(StageDropoff(s, Exits(), {}) for s in ("purchase", "retention", "advocacy")),
    ]
    reached = [10, 6, 3, 0, 0]
    funnel = Funnel(
        "retail", [StageRow(s, reached=r) for s, r in zip(retail.stage_names, reached, strict=True)]
    )
    inputs = Inputs(
        funnel,
        Dropoff("retail", stages),
        FeedbackReport("retail", [], {"app": Scores(1, 5.0, 0, 0, 0)}, Scores(1, 5.0, 0, 0, 0)),
        {"": GoalTimes(3, 0.0), "web": GoalTimes(3, 0.0)},
    )
    score = journey_score(retail, inputs)
    assert score.score.component("conversion").value == pytest.approx(0.3)
    assert score.score.component("dropoff").value == pytest.approx(1 - 5 / 14)
    web, app = score.channels["web"], score.channels["app"]
    assert web.component("conversion").value == pytest.approx(0.8 * 0.75)
    assert app.component("conversion").value == pytest.approx(0.4)  # no consideration exits
    assert app.component("time_to_goal").value is None
    assert web.component("satisfaction").value is None
    assert app.component("satisfaction").value == 1.0


# =========================================================================== ClickHouse

SHOP = """\
journeys:
  - name: shop
    score:
      goal: buy
      time_limit: 10h
      weights: {conversion: 0.5, dropoff: 0.2, time_to_goal: 0.1, satisfaction: 0.2}
    stages:
      - name: visit
        events: [page_view, store_visit]
        max_dwell: 1d
        kpis:
          visits: {count: [page_view, store_visit]}
          visitors: {customers: [page_view, store_visit]}
          entered: {flow: entered}
          left: {flow: dropped}
          moved_on: {flow: advanced}
          progression: {ratio: [moved_on, entered], unit: percent}
      - name: buy
        events: [order_completed]
        max_dwell: 2d
        kpis:
          sales: {count: [order_completed]}
          revenue: {sum: order_value, of: [order_completed]}
          basket: {avg: order_value, of: [order_completed]}
          buyers: {flow: reached}
          prospects: {flow: reached, stage: visit}
          conversion: {ratio: [buyers, prospects], unit: percent}
          cost: {sum: amount, of: [campaign_cost], better: lower}
          cost_per_conversion: {ratio: [cost, buyers], better: lower}
          handling: {avg: duration, of: [order_completed], unit: seconds}
      - name: love
        events: [review_submitted]
        kpis:
          csat: {survey: csat}
          answers: {survey: csat_answers}
          nps: {survey: nps, any_stage: true}
          nps_here: {survey: nps}
"""
(SHOP_JOURNEY,) = parse_journeys(SHOP, "shop.yaml")
PERIOD = (at(T0), at(T0 + DAY))
VALIDATOR = Validator(("web", "app", "store", "email", "call_center", "social"))


def ev(
    event_id: str, ts: float, customer: str, channel: str, event_type: str, **properties: Any
) -> Event:
    event = VALIDATOR.validate_dict(
        {
            "event_id": event_id,
            "occurred_at": datetime.fromtimestamp(ts, UTC).isoformat(),
            "customer_id": customer,
            "channel": channel,
            "event_type": event_type,
            "properties": properties,
            "schema_version": 1,
        },
        now=T0 + 10 * DAY,
    )
    assert isinstance(event, Event), event
    return event


def tr(
    customer: str, src: str | None, dst: str | None, kind: str, channel: str, ts: float, s: float
) -> Transition:
    event_id = "" if kind == "dropped" else f"{customer}-{kind}-{ts}"
    return Transition("shop", customer, src, dst, kind, channel, event_id, ts, s)


# c0 entered the day before and buys in the period; c1 and c2 visit then buy; c3 and
# c5 visit and drop; c4 walks into the store and buys at once. Nobody reaches `love`.
EVENTS = [
    ev("p0", T0 - 1_000, "c0", "web", "page_view"),
    ev("k0", T0 - 500, "m", "social", "campaign_cost", amount=10, campaign="spring"),
    ev("p1", T0, "c1", "web", "page_view"),
    ev("p2", T0, "c2", "app", "page_view"),
    ev("p3", T0 + 100, "c3", "app", "page_view"),
    ev("s4", T0 + 150, "c4", "store", "store_visit"),
    ev("p5", T0 + 300, "c5", "web", "page_view"),
    ev("p5b", T0 + 400, "c5", "web", "page_view"),
    ev("k1", T0 + 10, "m", "social", "campaign_cost", amount=40, campaign="spring"),
    ev("k2", T0 + 20, "m", "email", "campaign_cost", amount=20.0, campaign="news"),
    ev("o4", T0 + 200, "c4", "store", "order_completed", order_value=30, duration=300),
    ev("o0", T0 + 500, "c0", "web", "order_completed", order_value="20"),  # text: not summed
    ev("o1", T0 + 3_600, "c1", "web", "order_completed", order_value=100),
    ev("o2", T0 + 7_200, "c2", "app", "order_completed", order_value=50.0, duration=120),
    ev("late", T0 + 2 * DAY, "c1", "web", "page_view"),  # after the period
]
TRANSITIONS = [
    tr("c0", None, "visit", "entered", "web", T0 - 1_000, 0),
    tr("c0", "visit", "buy", "advanced", "web", T0 + 500, 1_500),
    tr("c1", None, "visit", "entered", "web", T0, 0),
    tr("c1", "visit", "buy", "advanced", "web", T0 + 3_600, 3_600),
    tr("c2", None, "visit", "entered", "app", T0, 0),
    tr("c2", "visit", "buy", "advanced", "app", T0 + 7_200, 7_200),
    tr("c3", None, "visit", "entered", "app", T0 + 100, 0),
    tr("c3", "visit", None, "dropped", "app", T0 + 5_000, 4_900),
    tr("c4", None, "buy", "entered", "store", T0 + 200, 0),
    tr("c5", None, "visit", "entered", "web", T0 + 300, 0),
    tr("c5", "visit", None, "dropped", "web", T0 + 6_000, 5_700),
]
FEEDBACK = [
    Feedback("shop", "buy", "web", "c1", "f1", T0 + 3_700, 5.0, 10.0),
    Feedback("shop", "visit", "app", "c3", "f2", T0 + 150, None, 3.0),
    Feedback("shop", "buy", "store", "c4", "f3", T0 + 250, None, 8.0),
    Feedback("shop", "buy", "app", "c2", "f4", T0 + 7_300, 3.0, None),
]


async def _loaded(chdb_path: Path) -> ClickHouseSink:
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    for _ in range(2):  # the second time is a replayed batch: FINAL counts it once
        sink.add_events([event_row(e, T0 + 3 * DAY) for e in EVENTS])
        sink.add_transitions([transition_row(t) for t in TRANSITIONS])
        sink.add_feedback([feedback_row(f) for f in FEEDBACK])
        await sink.flush()
    return sink


def kpis_of(card: Mapping[str, Any], stage: str) -> dict[str, dict[str, Any]]:
    (s,) = [s for s in card["stages"] if s["stage"] == stage]
    return {k["name"]: k for k in s["kpis"]}


def check_kpis(card: Mapping[str, Any]) -> None:
    visit = kpis_of(card, "visit")
    assert {n: k["value"] for n, k in visit.items()} == {
        "visits": 6,  # five page views and a store visit
        "visitors": 5,  # c1, c2, c3, c4, c5
        "entered": 4,  # c0 entered the day before
        "left": 2,
        "moved_on": 3,  # c0, c1, c2
        "progression": 0.75,
    }
    assert visit["visits"]["by_channel"] == {"app": 2, "store": 1, "web": 3}
    assert visit["visitors"]["by_channel"] == {"app": 2, "store": 1, "web": 2}
    assert visit["progression"]["by_channel"] == {"app": 0.5, "store": None, "web": 1.0}

    buy = kpis_of(card, "buy")
    values = {n: k["value"] for n, k in buy.items()}
    assert values == {
        "sales": 4,
        "revenue": 180,  # c0's "20" is text, not a number
        "basket": 60,
        "buyers": 4,  # c0, c1, c2, c4
        "prospects": 6,  # everyone who entered in the period, at any stage
        "conversion": pytest.approx(4 / 6),
        "cost": 60,
        "cost_per_conversion": 15,
        "handling": 210,
    }
    # Email and social only paid for campaigns: no sales, revenue or handling there.
    nothing = {"email": None, "social": None}
    assert buy["revenue"]["by_channel"] == {"app": 50, "store": 30, "web": 100, **nothing}
    assert buy["handling"]["by_channel"] == {"app": 120, "store": 300, "web": None, **nothing}
    assert buy["sales"]["by_channel"] == {"app": 1, "store": 1, "web": 2, "email": 0, "social": 0}
    assert buy["conversion"]["by_channel"] == {
        "app": 0.5,
        "store": 1.0,
        "web": pytest.approx(2 / 3),
        # Channels with campaign cost but no customers: no conversion, no cost per conversion.
        "email": None,
        "social": None,
    }
    assert buy["cost"]["by_channel"] == {
        "app": None,
        "email": 20,
        "social": 40,
        "store": None,
        "web": None,
    }
    assert buy["cost_per_conversion"]["by_channel"]["social"] is None

    love = kpis_of(card, "love")  # nobody reached it
    assert {n: k["value"] for n, k in love.items()} == {
        "csat": None,
        "answers": 0,
        "nps": 0.0,  # any stage: one promoter (10), one detractor (3), one passive (8)
        "nps_here": None,
    }
    assert love["nps"]["by_channel"] == {"app": -100.0, "store": 0.0, "web": 100.0}


def check_score(card: Mapping[str, Any]) -> None:
    c = card["components"]
    assert c["conversion"]["value"] == pytest.approx(4 / 6)
    assert (c["dropoff"]["dropped"], c["dropoff"]["exits"]) == (2, 5)
    # Time to goal: c4 0 s, c0 1500 s (since the day before), c1 3600 s, c2 7200 s.
    assert (c["time_to_goal"]["customers"], c["time_to_goal"]["median_seconds"]) == (4, 2_550)
    assert c["time_to_goal"]["value"] == pytest.approx(1 - 2_550 / 36_000)
    assert (c["satisfaction"]["csat"], c["satisfaction"]["nps"]) == (4.0, 0.0)
    assert c["satisfaction"]["value"] == pytest.approx(0.625)
    expected = 100 * (0.5 * 4 / 6 + 0.2 * 0.6 + 0.1 * (1 - 2_550 / 36_000) + 0.2 * 0.625)
    assert card["score"] == pytest.approx(expected)

    channels = {ch["channel"]: ch for ch in card["channels"]}
    assert [ch["channel"] for ch in card["channels"]] == ["web", "store", "app"]
    web = channels["web"]["components"]
    assert web["conversion"]["value"] == pytest.approx(2 / 3)  # visit exits on web: 2 of 3 moved on
    assert web["time_to_goal"]["median_seconds"] == 2_550  # c0 and c1 bought on web
    assert web["satisfaction"]["value"] == 1.0
    assert channels["web"]["score"] == pytest.approx(
        100 * (0.5 * 2 / 3 + 0.2 * 2 / 3 + 0.1 * (1 - 2_550 / 36_000) + 0.2 * 1.0)
    )
    assert channels["app"]["score"] == pytest.approx(100 * (0.25 + 0.1 + 0.1 * 0.8 + 0.2 * 0.25))
    # The store has no exits: time to goal (0 s) and satisfaction (NPS 0) alone.
    assert channels["store"]["components"]["conversion"]["value"] is None
    assert channels["store"]["score"] == pytest.approx(100 * (0.1 + 0.2 * 0.5) / 0.3)
    assert channels["app"]["rank"] == 3


def check_channels(card: Mapping[str, Any]) -> None:
    (visit,) = [s for s in card["stages"] if s["stage"] == "visit"]
    web, app = visit["channels"]["web"], visit["channels"]["app"]
    assert (web["exits"], web["advanced"], web["dropped"]) == (3, 2, 1)
    assert web["progression"] == pytest.approx(2 / 3) and web["dropoff"] == pytest.approx(1 / 3)
    # Web's times in stage: 1500, 3600, 5700 → mean 3600, p90 3600 + 0.8 × 2100.
    assert web["time_in_stage"] == {"count": 3, "avg": 3_600, "p90": pytest.approx(5_280)}
    assert app["time_in_stage"]["p90"] == pytest.approx(4_900 + 0.9 * 2_300)
    assert (app["nps"], app["csat"]) == (-100.0, None)
    assert web["nps"] is None and web["csat_responses"] == 0  # no survey on web while visiting
    assert web["consistency_effect"] is None  # under the 20 exits a channel needs
    assert "store" not in visit["channels"]  # a store visit, but no exit, answer or value there
    assert visit["worst_channel"] == {
        "channel": "app",
        "progression": 0.5,
        "others": pytest.approx(2 / 3),
        "gap": pytest.approx(1 / 6),
        "exits": 2,
        "low_volume": True,
    }
    (buy,) = [s for s in card["stages"] if s["stage"] == "buy"]
    assert {ch: c["revenue"] for ch, c in buy["channels"].items()} == {
        "app": 50,
        "store": 30,
        "web": 100,
    }
    assert {ch: c["handling_time"] for ch, c in buy["channels"].items()} == {
        "app": 120,
        "store": 300,
        "web": None,
    }
    assert (buy["channels"]["web"]["csat"], buy["channels"]["web"]["nps"]) == (5.0, 100.0)
    assert buy["worst_channel"] is None  # nobody left `buy`
    assert card["most_lost"] == {
        "stage": "visit",
        "exits": 5,
        "advanced": 3,
        "dropped": 2,
        "dropoff": 0.4,
    }


@pytest.mark.services
async def test_every_kpi_score_and_channel_figure_on_a_hand_made_set(chdb_path: Path) -> None:
    sink = await _loaded(chdb_path)
    card = await sink.run(lambda c: scorecard(c, SHOP_JOURNEY, *PERIOD, now=at(T0 + 5 * DAY)))
    check_kpis(card)
    check_score(card)
    check_channels(card)

    # Against the day before: c0's page view, the first campaign cost, c0 entering.
    assert card["previous_period"] == {
        "since": at(T0 - DAY).isoformat(),
        "until": at(T0).isoformat(),
    }
    visit, buy = kpis_of(card, "visit"), kpis_of(card, "buy")
    assert (visit["visits"]["previous"], visit["visits"]["direction"]) == (1, "up")
    assert visit["visits"]["relative"] == 5.0 and visit["visits"]["improved"] is True
    assert (buy["cost"]["previous"], buy["cost"]["improved"]) == (10, False)  # lower is better
    assert (buy["sales"]["previous"], buy["sales"]["relative"]) == (0, None)
    assert buy["cost_per_conversion"]["direction"] is None  # nothing to compare with
    assert card["previous_score"] is not None
    assert orjson.loads(orjson.dumps(card)) == card
    await sink.close()


@pytest.mark.services
async def test_an_empty_period_has_zero_counts_and_no_score(chdb_path: Path) -> None:
    sink = await _loaded(chdb_path)
    card = await sink.run(
        lambda c: scorecard(c, SHOP_JOURNEY, at(T0 + 30 * DAY), at(T0 + 31 * DAY), at(T0))
    )
    await sink.close()
    assert card["score"] is None and card["channels"] == [] and card["most_lost"] is None
    assert all(c["value"] is None for c in card["components"].values())
    values = {k["name"]: k["value"] for s in card["stages"] for k in s["kpis"]}
    assert values["visits"] == 0 and values["buyers"] == 0 and values["answers"] == 0
    assert values["revenue"] is None and values["conversion"] is None and values["nps"] is None
    assert all(s["worst_channel"] is None and s["channels"] == {} for s in card["stages"])


def _reference(
    journey: Journey, events: list[Event], transitions: list[Transition], since: float, until: float
) -> dict[tuple[str, str], dict[str, float | None]]:
    """The measured KPIs by (stage, channel) ('' = all) straight from the definitions."""
    out: dict[tuple[str, str], dict[str, float | None]] = {}
    names = journey.stage_names
    evs = [e for e in events if since <= e.occurred_at.timestamp() < until]
    trs = [t for t in transitions if since <= t.occurred_at < until]
    channels = {e.channel for e in evs} | {t.channel for t in trs}
    for stage in journey.stages:
        for channel in ["", *channels]:
            cell = out.setdefault((stage.name, channel), {})
            for k in stage.kpis:
                mine = [e for e in evs if channel in ("", e.channel)]
                if k.kind in ("count", "customers", "sum", "avg"):
                    hits = [e for e in mine if e.event_type in k.event_types]
                    numbers = [
                        float(v)
                        for e in hits
                        if isinstance(v := e.properties.get(k.prop or ""), int | float)
                        and not isinstance(v, bool)
                    ]
                    cell[k.name] = {
                        "count": float(len(hits)),
                        "customers": float(len({e.key for e in hits})),
                        "sum": math.fsum(numbers) if numbers else None,
                        "avg": statistics.fmean(numbers) if numbers else None,
                    }[k.kind]
                elif k.kind == "flow":
                    target = k.stage or stage.name
                    ts = [t for t in trs if channel in ("", t.channel)]
                    if k.measure == "entered":
                        hit = [t for t in ts if t.kind != "dropped" and t.to_stage == target]
                    elif k.measure == "reached":
                        later = names[names.index(target) :]
                        hit = [t for t in ts if t.kind != "dropped" and t.to_stage in later]
                    else:
                        hit = [t for t in ts if t.kind == k.measure and t.from_stage == target]
                    cell[k.name] = float(len({t.customer for t in hit}))
    return out


@pytest.mark.services
async def test_kpi_queries_agree_with_plain_python_on_random_data(chdb_path: Path) -> None:
    """Counts, distinct customers, sums, means and flows, per channel, over random events."""
    rng = random.Random(8)
    channels = ["web", "app", "store", "email"]
    types = ["page_view", "store_visit", "order_completed", "campaign_cost", "other"]
    events, transitions = [], []
    for i in range(300):
        props: dict[str, Any] = {}
        kind = rng.random()
        props["order_value"] = (
            rng.randint(1, 500) if kind < 0.4 else round(rng.uniform(0, 99), 2) if kind < 0.7
            else rng.choice(["12", True, None])
        )  # fmt: skip
        if rng.random() < 0.5:
            props["amount"] = rng.randint(1, 50)
        if rng.random() < 0.3:
            props["duration"] = rng.randint(0, 900)
        events.append(
            ev(
                f"r{i}",
                T0 + rng.uniform(-DAY, 2 * DAY),
                f"c{rng.randint(0, 40)}",
                rng.choice(channels),
                rng.choice(types),
                **props,
            )
        )
    stages = SHOP_JOURNEY.stage_names
    for i in range(200):
        who, when, ch = (
            f"c{rng.randint(0, 40)}",
            T0 + rng.uniform(-DAY, 2 * DAY),
            rng.choice(channels),
        )
        kind = rng.choice(["entered", "advanced", "dropped", "reengaged", "regressed"])
        src = None if kind == "entered" else rng.choice(stages[:-1])
        dst = None if kind == "dropped" else rng.choice(stages)
        transitions.append(Transition("shop", who, src, dst, kind, ch, f"t{i}", when, 1.0))
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    sink.add_events([event_row(e, T0) for e in events])
    sink.add_transitions([transition_row(t) for t in transitions])
    await sink.flush()
    got = await sink.run(lambda c: stage_kpis(c, SHOP_JOURNEY, *PERIOD))
    await sink.close()
    expected = _reference(SHOP_JOURNEY, events, transitions, T0, T0 + DAY)
    checked = 0
    for s in got:
        for channel in ["", *channels]:
            measured = s.values if channel == "" else s.by_channel.get(channel)
            if measured is None:
                continue
            for name, want in expected[(s.stage, channel)].items():
                have = measured[name]
                assert (have is None) == (want is None), (s.stage, channel, name)
                if want is not None:
                    assert have == pytest.approx(want), (s.stage, channel, name)
                checked += 1
    assert checked >= 60  # every measured KPI of visit and buy, overall and per channel


@pytest.mark.services
async def test_the_live_gauges_equal_the_report(
    chdb_path: Path, redis_service: Service, redis_client: Any
) -> None:
    """The worker's timer exports the score `journey report --scorecard` gives for its window."""
    from pipeline.worker import Runtime

    journeys_file = chdb_path.parent / "shop.yaml"
    journeys_file.write_text(SHOP)
    settings = Settings(
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{chdb_path}",
        journeys_path=journeys_file,
        consistency_window_seconds=DAY,
    )
    runtime = Runtime(settings, (SHOP_JOURNEY,))
    await runtime.sink.start()
    runtime.sink.add_events([event_row(e, T0) for e in EVENTS])
    runtime.sink.add_transitions([transition_row(t) for t in TRANSITIONS])
    runtime.sink.add_feedback([feedback_row(f) for f in FEEDBACK])
    await runtime.sink.flush()
    # A partition clock standing at the end of the period (seen "later" than now: no drift).
    redis_client.hset("jt:clock:0", mapping={"newest": T0 + DAY, "seen": 1e12})
    await runtime.refresh_consistency()
    card = await runtime.sink.run(lambda c: scorecard(c, SHOP_JOURNEY, *PERIOD, now=at(T0)))
    await runtime.sink.close()
    await runtime.store.close()

    registry = runtime.metrics.registry
    assert registry.get_sample_value("journey_score", {"journey": "shop"}) == pytest.approx(
        card["score"]
    )
    for name, component in card["components"].items():
        value = registry.get_sample_value(
            "journey_score_component", {"journey": "shop", "component": name}
        )
        assert value == pytest.approx(component["value"]), name
    for ch in card["channels"]:
        value = registry.get_sample_value(
            "journey_channel_score", {"journey": "shop", "channel": ch["channel"]}
        )
        assert value == pytest.approx(ch["score"]), ch["channel"]


def test_live_values_leave_out_what_has_no_value() -> None:
    (retail,) = default_journeys()
    empty = Inputs(
        Funnel("retail", [StageRow(s) for s in retail.stage_names]),
        Dropoff("retail", [StageDropoff(s, Exits(), {}) for s in retail.stage_names]),
        FeedbackReport("retail", [], {}, Scores()),
        {},
    )
    values = live_values([journey_score(retail, empty)])
    assert values.scores == {} and values.components == {} and values.channels == {}


# =========================================================================== command and rendering


@pytest.mark.services
async def test_report_scorecard_command_ranks_and_prints(
    chdb_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sink = await _loaded(chdb_path)
    await sink.close()
    journeys_file = tmp_path / "shop.yaml"
    # A second journey over the same events, with a goal nobody reached: it ranks last.
    journeys_file.write_text(
        SHOP + "  - name: other\n    score: {goal: love}\n    stages:\n"
        "      - {name: visit, events: [page_view]}\n      - {name: love, events: [review]}\n"
    )
    monkeypatch.setenv("JOURNEY_CLICKHOUSE_DSN", f"chdb://{chdb_path}")
    monkeypatch.setenv("JOURNEY_WEB_PORT", str(free_port()))
    monkeypatch.setenv("JOURNEY_JOURNEYS", str(journeys_file))
    period = ["--since", "2023-11-14T22:13:20", "--until", "2023-11-15T22:13:20"]
    result = CliRunner().invoke(cli, ["report", "--scorecard", "--json", *period])
    assert result.exit_code == 0, result.output
    reports = orjson.loads(result.stdout)
    assert [(r["journey"], r["scorecard"]["rank"]) for r in reports] == [("shop", 1), ("other", 2)]
    check_kpis(reports[0]["scorecard"])
    check_score(reports[0]["scorecard"])
    assert reports[1]["scorecard"]["score"] is None  # no transitions in `other` at all
    assert "dropoff" in reports[0]  # the rest of the report is still there

    table = CliRunner().invoke(cli, ["report", "--scorecard", *period], env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    for text in (
        "Journeys ranked by score",
        "Channels ranked — journey shop",
        "Stage KPIs — journey shop",
        "Channel performance by stage",
        "Most customers are lost at visit",
        "visit: app carries 50.0% forward, 16.7 points below",
        "66.7% (4/6)",
    ):
        assert text in table.output, text


def test_render_scorecards_without_data_or_kpis() -> None:
    """A journey without KPIs and without any data renders dashes, not errors."""
    card = {
        "journey": "empty",
        "rank": 1,
        "goal": "b",
        "score": None,
        "score_change": compare(None, None).to_dict(),
        "previous_period": None,
        "components": {
            c: {"value": None, "weight": 0.25, **d}
            for c, d in {
                "conversion": {"reached_goal": 0, "reached_first": 0},
                "dropoff": {"dropped": 0, "exits": 0, "dropoff": None},
                "time_to_goal": {"median_seconds": None, "customers": 0, "limit_seconds": None},
                "satisfaction": {"csat": None, "nps": None},
            }.items()
        },
        "channels": [],
        "stages": [{"stage": "a", "kpis": [], "worst_channel": None, "channels": {}}],
        "most_lost": None,
    }
    console = Console(record=True, width=200)
    render_scorecards(rank([{"journey": "empty", "scorecard": card}]), ["web"], console)
    text = console.export_text()
    assert "declares no stage KPIs" in text and "Nobody dropped off" in text


def _every_kpi_kind() -> Iterator[str]:
    (retail,) = default_journeys()
    for stage in retail.stages:
        for k in stage.kpis:
            yield k.kind


def test_the_default_journey_measures_what_the_issue_lists() -> None:
    """Awareness to advocacy: visits … NPS, with cost per conversion from campaign_cost events."""
    (retail,) = default_journeys()
    names = {s.name: [k.name for k in s.kpis] for s in retail.stages}
    assert names == {
        "awareness": ["visits", "subscriptions", "social_engagement", "new_customers"],
        "consideration": ["aware", "considering", "click_through", "interactions", "engagement"],
        "purchase": [
            "sales",
            "prospects",
            "buyers",
            "conversion",
            "revenue",
            "campaign_cost",
            "cost_per_conversion",
        ],
        "retention": [
            "repeat_purchases",
            "repeat_revenue",
            "customers",
            "retained",
            "repeat_rate",
            "feedback",
            "csat",
        ],
        "advocacy": ["reviews", "referrals", "advocates", "nps"],
    }
    assert set(_every_kpi_kind()) == {"count", "flow", "ratio", "sum", "survey"}
    assert retail.scoring.goal == "purchase"
    assert retail.scoring.time_limit == 21 * DAY  # awareness 7d + consideration 14d


@pytest.mark.services
async def test_the_dashboard_kpi_panel_says_what_the_report_says(chdb_path: Path) -> None:
    """Every ClickHouse panel of the scorecard dashboard runs; the KPI panel equals the report."""
    from pipeline.dashboards import ALL, clickhouse_query, generate_dashboards, iter_targets

    board = generate_dashboards([SHOP_JOURNEY])["journey-scorecard.json"]
    sink = await _loaded(chdb_path)
    card = await sink.run(lambda c: scorecard(c, SHOP_JOURNEY, *PERIOD, now=at(T0)))
    web = await sink.run(lambda c: stage_kpis(c, SHOP_JOURNEY, *PERIOD))

    def run_panels(client: Any) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for channel in (ALL, ["web"]):
            for panel, target in iter_targets(board):
                if "rawSql" not in target:
                    continue
                text = clickhouse_query(
                    target["rawSql"],
                    {"journey": "shop", "channel": channel},
                    at(T0),
                    at(T0 + DAY - 1),
                    60,
                )
                result = client.query(text)
                rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
                out[f"{panel['title']} {channel}"] = rows
        return out

    panels = await sink.run(run_panels)
    await sink.close()
    kpis = panels["Stage KPIs (period) $__all"]
    expected = [(s["stage"], k["name"], k["value"]) for s in card["stages"] for k in s["kpis"]]
    assert [(r["stage"], r["kpi"]) for r in kpis] == [(s, k) for s, k, _ in expected]
    for row, (_, _, value) in zip(kpis, expected, strict=True):
        assert row["value"] == (None if value is None else pytest.approx(value)), row
    # Only web selected: the per-channel figures of the report.
    by_stage = {s.stage: s.by_channel.get("web", {}) for s in web}
    for row in panels["Stage KPIs (period) ['web']"]:
        want = by_stage[row["stage"]].get(row["kpi"])
        assert row["value"] == (None if want is None else pytest.approx(want)), row
    lost = panels["Where customers are lost (period) $__all"]
    assert (lost[0]["stage"], lost[0]["dropped"]) == ("visit", 2)
    perf = {(r["stage"], r["channel"]): r for r in panels[
        "Channel performance per stage (period) $__all"]}  # fmt: skip
    assert perf[("visit", "web")]["p90_time"] == pytest.approx(5_280)
    money = {
        (r["stage"], r["channel"]): r
        for r in panels[
            "Satisfaction, handling time and revenue per stage and channel (period) $__all"
        ]
    }
    assert money[("buy", "app")]["handling_time"] == 120 and money[("buy", "web")]["revenue"] == 100
    assert money[("visit", "app")]["nps_score"] == -100
