"""Journey files: the YAML contract, its error messages, and event → stage matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from pipeline.journeys import (
    DEFAULT_WEIGHTS,
    Condition,
    Journey,
    JourneyFileError,
    default_journeys,
    load_journeys,
    parse_duration,
    parse_journeys,
)

ROOT = Path(__file__).resolve().parents[1]
RETAIL_STAGES = ("awareness", "consideration", "purchase", "retention", "advocacy")


def test_default_journey_is_the_retail_journey() -> None:
    (retail,) = default_journeys()
    assert retail.name == "retail"
    assert retail.allow_regression is False
    assert retail.stage_names == RETAIL_STAGES
    assert [s.max_dwell for s in retail.stages] == [
        7 * 86400.0,
        14 * 86400.0,
        30 * 86400.0,
        90 * 86400.0,
        None,
    ]
    assert [s.dwell_from for s in retail.stages] == [
        "entered",
        "entered",
        "entered",
        "last_activity",
        "entered",
    ]
    assert [s.index for s in retail.stages] == [0, 1, 2, 3, 4]
    assert retail.stage("purchase").index == 2
    assert load_journeys(None) == default_journeys()


def test_schema_symlink_and_default_file_validate() -> None:
    link = ROOT / "schemas" / "journey.v1.json"
    assert link.is_symlink()
    assert not Path(link.readlink()).is_absolute()
    schema = json.loads(link.read_text())
    Draft202012Validator.check_schema(schema)
    data = yaml.safe_load((ROOT / "pipeline" / "data" / "default_journey.yaml").read_text())
    assert list(Draft202012Validator(schema).iter_errors(data)) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("15m", 900.0), ("12h", 43200.0), ("7d", 604800.0), ("0s", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7w", "1.5h", "-1d", " 7d", "7 d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# ------------------------------------------------------------------ conditions


@pytest.mark.parametrize(
    ("op", "value", "props", "expected"),
    [
        ("eq", "spring", {"campaign": "spring"}, True),
        ("eq", "spring", {"campaign": "autumn"}, False),
        ("eq", 1, {"campaign": True}, False),  # bool is not a number
        ("eq", None, {"campaign": None}, True),
        ("ne", "spring", {"campaign": "autumn"}, True),
        ("ne", "spring", {"campaign": "spring"}, False),
        ("ne", "spring", {"campaign": 5}, False),  # incomparable
        ("gt", 4, {"campaign": 5}, True),
        ("gt", 4, {"campaign": 4}, False),
        ("gte", 4, {"campaign": 4}, True),
        ("gte", 4, {"campaign": 3.9}, False),
        ("gte", 4, {"campaign": 4.0}, True),
        ("lt", 4, {"campaign": 3}, True),
        ("lt", 4, {"campaign": 4}, False),
        ("lte", 4, {"campaign": 4}, True),
        ("lte", 4, {"campaign": 5}, False),
        ("gt", "b", {"campaign": "c"}, True),
        ("gt", 4, {"campaign": "5"}, False),  # wrong type
        ("gte", 4, {"campaign": True}, False),  # bool is not orderable
        ("lt", 4, {"campaign": None}, False),
        ("gt", True, {"campaign": True}, False),
        ("in", ("a", "b"), {"campaign": "b"}, True),
        ("in", ("a", "b"), {"campaign": "c"}, False),
        ("in", (1, 2), {"campaign": 2.0}, True),
        ("in", (1, 2), {"campaign": True}, False),
        ("in", (1, 2), {"campaign": "1"}, False),
    ],
)
def test_condition_ops(op: Any, value: Any, props: dict[str, Any], expected: bool) -> None:
    assert Condition("campaign", op, value).holds(props) is expected


@pytest.mark.parametrize("op", ["eq", "ne", "gt", "gte", "lt", "lte", "in"])
def test_condition_missing_property_is_false(op: Any) -> None:
    value: Any = ("x",) if op == "in" else "x"
    assert Condition("campaign", op, value).holds({"other": "x"}) is False


def test_condition_never_raises_on_nan() -> None:
    assert Condition("v", "gt", 1).holds({"v": float("nan")}) is False


# ------------------------------------------------------------------ matching

MULTI = """\
journeys:
  - name: support
    stages:
      - name: contacted
        events:
          - support_call
          - ticket: {priority: {in: [low, normal]}}
        max_dwell: 1h
      - name: escalated
        events:
          - ticket: {priority: {eq: high}}
          - support_call: {minutes: {gt: 30}}
        max_dwell: 2d
      - name: resolved
        events:
          - ticket: {priority: {eq: high}, vip: {eq: true}}
          - support_resolved
"""


@pytest.fixture
def support() -> Journey:
    (journey,) = parse_journeys(MULTI, "multi.yaml")
    return journey


@pytest.mark.parametrize(
    ("event_type", "props", "expected"),
    [
        ("support_call", {}, "contacted"),
        ("support_call", {"minutes": 10}, "contacted"),
        ("support_call", {"minutes": 45}, "escalated"),
        ("support_call", {"minutes": "45"}, "contacted"),  # wrong type: condition fails
        ("ticket", {"priority": "low"}, "contacted"),
        ("ticket", {"priority": "high"}, "escalated"),
        ("ticket", {"priority": "high", "vip": True}, "resolved"),
        ("ticket", {"priority": "high", "vip": 1}, "escalated"),
        ("ticket", {"priority": "urgent"}, None),
        ("ticket", {}, None),
        ("support_resolved", {}, "resolved"),
        ("page_view", {}, None),
    ],
)
def test_furthest_matching_stage_wins(
    support: Journey, event_type: str, props: dict[str, Any], expected: str | None
) -> None:
    stage = support.match(event_type, props)
    assert (stage.name if stage else None) == expected


@pytest.mark.parametrize(
    ("event_type", "props", "expected"),
    [
        ("page_view", {}, "awareness"),
        ("store_visit", {}, "awareness"),
        ("add_to_cart", {}, "consideration"),
        ("order_completed", {}, "purchase"),
        ("repeat_purchase", {}, "retention"),
        ("review_submitted", {"rating": 5}, "advocacy"),
        ("review_submitted", {"rating": 4}, "advocacy"),
        ("review_submitted", {"rating": 3}, None),
        ("review_submitted", {}, None),
        ("nps_response", {"nps": 9}, "advocacy"),
        ("nps_response", {"nps": 8}, None),
        ("nps_response", {"nps": "ten"}, None),
        ("referral_sent", {}, "advocacy"),
        ("password_reset", {}, None),
    ],
)
def test_default_journey_matching(
    event_type: str, props: dict[str, Any], expected: str | None
) -> None:
    stage = default_journeys()[0].match(event_type, props)
    assert (stage.name if stage else None) == expected


def test_several_journeys_and_defaults() -> None:
    text = (
        MULTI
        + "    allow_regression: true\n"
        + "\n".join(
            [
                "  - name: onboarding",
                "    stages:",
                "      - name: signed_up",
                "        events: [signup]",
                "        max_dwell: 3d",
                "        dwell_from: last_activity",
                "      - name: active",
                "        events: [login]",
            ]
        )
    )
    support, onboarding = parse_journeys(text, "two.yaml")
    assert support.allow_regression is True
    assert onboarding.allow_regression is False
    assert onboarding.stage_names == ("signed_up", "active")
    assert onboarding.stage("signed_up").dwell_from == "last_activity"
    assert onboarding.stage("active").max_dwell is None
    with pytest.raises(KeyError):
        onboarding.stage("nope")


# ------------------------------------------------------------------ file errors

GOOD_HEAD = """\
journeys:
  - name: retail
    stages:
      - name: awareness
        events: [page_view]
        max_dwell: 7d
"""


KPIS = """\
        kpis:
          visits: {count: [page_view]}
          revenue: {sum: order_value, of: [order_completed]}
"""
TAIL = "      - name: b\n        events: [order_completed]\n"


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param(
            GOOD_HEAD + "      - name: consideration\n        events: [search]\n"
            "        max_dwell: 14x\n      - name: purchase\n        events: [order_completed]\n",
            9,
            "journeys[0].stages[1].max_dwell: '14x' does not match",
            id="bad-duration",
        ),
        pytest.param(
            GOOD_HEAD + "        colour: red\n      - name: purchase\n        events: [order]\n",
            7,
            "unknown key 'colour'",
            id="unknown-key",
        ),
        pytest.param(
            GOOD_HEAD + "      - name: purchase\n        events: [order]\n"
            "      - name: awareness\n        events: [x]\n",
            9,
            "duplicate stage name 'awareness'",
            id="duplicate-stage",
        ),
        pytest.param(
            GOOD_HEAD + "      - name: purchase\n        events: [order\n      - name: x\n",
            9,
            "invalid YAML",
            id="yaml-syntax",
        ),
        pytest.param("", 1, "the file is empty", id="empty"),
        pytest.param("# only a comment\n", 1, "the file is empty", id="only-comments"),
        pytest.param(
            GOOD_HEAD + "      - name: purchase\n        events: [order]\n        max_dwell: 30d\n",
            9,
            "the last stage ('purchase') cannot have max_dwell",
            id="last-stage-max-dwell",
        ),
        pytest.param(
            GOOD_HEAD
            + "      - name: b\n        events: [x]\n"
            + "  - name: retail\n    stages:\n      - name: a\n        events: [x]\n",
            9,
            "duplicate journey name 'retail'",
            id="duplicate-journey",
        ),
        pytest.param(
            GOOD_HEAD.replace("name: awareness", "name: Awareness"),
            4,
            "journeys[0].stages[0].name: 'Awareness' does not match",
            id="bad-stage-name",
        ),
        pytest.param(
            GOOD_HEAD.replace("[page_view]", "\n          - page_view\n          - Page-View"),
            7,
            "journeys[0].stages[0].events[1]",
            id="bad-event-type",
        ),
        pytest.param(
            GOOD_HEAD.replace("[page_view]", "\n          - review: {rating: {gtx: 4}}"),
            6,
            "unknown key 'gtx'",
            id="unknown-operator",
        ),
        pytest.param(
            GOOD_HEAD + "        dwell_from: exit\n      - name: b\n        events: [x]\n",
            7,
            "dwell_from",
            id="bad-dwell-from",
        ),
        pytest.param(
            GOOD_HEAD + "      - name: b\n",
            7,
            "'events' is a required property",
            id="missing-events",
        ),
        pytest.param(
            GOOD_HEAD.replace("    stages:", "    allow_regression: yes please\n    stages:"),
            3,
            "allow_regression",
            id="bad-bool",
        ),
        pytest.param(
            GOOD_HEAD + "        max_dwell: 8d\n      - name: b\n        events: [x]\n",
            7,
            "duplicate key 'max_dwell'",
            id="duplicate-yaml-key",
        ),
        pytest.param("journeys: []\n", 1, "should be non-empty", id="no-journeys"),
        pytest.param(
            GOOD_HEAD + KPIS + "          rate: {ratio: [buyerz, visits]}\n" + TAIL,
            10,
            "journeys[0].stages[0].kpis.rate.ratio: 'buyerz' is not a KPI of stage 'awareness' "
            "(its KPIs: visits, revenue)",
            id="kpi-ratio-unknown-measure",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          r1: {ratio: [visits, revenue]}\n"
            "          r2: {ratio: [r1, visits]}\n" + TAIL,
            11,
            "'r1' is a ratio itself",
            id="kpi-ratio-of-a-ratio",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          both: {count: [x], customers: [x]}\n" + TAIL,
            10,
            "a KPI names exactly one of count, customers, sum, avg, flow, survey, ratio "
            "(found count and customers)",
            id="kpi-two-measures",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          nothing: {unit: percent}\n" + TAIL,
            10,
            "(found none)",
            id="kpi-no-measure",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          total: {sum: order_value}\n" + TAIL,
            10,
            "'of' is a dependency of 'sum'",
            id="kpi-sum-without-events",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          later: {flow: reached, stage: checkout}\n" + TAIL,
            10,
            "kpis.later.stage: 'checkout' is not a stage of this journey (stages: awareness, b)",
            id="kpi-unknown-stage",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          n: {count: [x], stage: b}\n" + TAIL,
            10,
            "only a flow or survey KPI takes 'stage', not count",
            id="kpi-stage-on-a-count",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          n: {flow: left}\n" + TAIL,
            10,
            "'left' is not one of",
            id="kpi-unknown-flow",
        ),
        pytest.param(
            GOOD_HEAD + KPIS + "          n: {sum: order value, of: [x]}\n" + TAIL,
            10,
            "expected a property name",
            id="kpi-bad-property",
        ),
        pytest.param(
            GOOD_HEAD.replace("    stages:", "    score: {goal: checkout}\n    stages:") + TAIL,
            3,
            "journeys[0].score.goal: 'checkout' is not a stage of this journey",
            id="score-unknown-goal",
        ),
        pytest.param(
            GOOD_HEAD.replace("    stages:", "    score: {goal: awareness}\n    stages:") + TAIL,
            3,
            "the goal cannot be the first stage",
            id="score-goal-first-stage",
        ),
        pytest.param(
            GOOD_HEAD.replace(
                "    stages:", "    score:\n      weights: {conversion: 0, dropoff: 0}\n    stages:"
            )
            + TAIL,
            4,
            "at least one weight must be above zero",
            id="score-zero-weights",
        ),
        pytest.param(
            GOOD_HEAD.replace("    stages:", "    score:\n      weights: {speed: 1}\n    stages:")
            + TAIL,
            4,
            "unknown key 'speed'",
            id="score-unknown-weight",
        ),
    ],
)
def test_journey_file_errors(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = tmp_path / "journeys.yaml"
    path.write_text(text)
    with pytest.raises(JourneyFileError) as info:
        load_journeys(path)
    err = info.value
    assert err.source == str(path)
    assert err.line == line, str(err)
    assert problem in err.problem
    assert str(err).startswith(f"{path}, line {line}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(JourneyFileError, match=r"nope\.yaml: journey file not found"):
        load_journeys(str(path))


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^custom\.yaml, line 1: "):
        parse_journeys("journeys: 3\n", "custom.yaml")


def test_good_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "j.yaml"
    path.write_text(MULTI)
    (journey,) = load_journeys(path)
    assert journey.stage_names == ("contacted", "escalated", "resolved")
    assert journey.stage("escalated").max_dwell == 2 * 86400.0


def test_kpis_and_score_are_read_with_their_defaults() -> None:
    """Units, directions and stages default sensibly; weights left out weigh 0."""
    (journey,) = parse_journeys(
        GOOD_HEAD.replace("    stages:", "    score:\n      weights: {conversion: 3}\n    stages:")
        + KPIS
        + "          buyers: {flow: reached, stage: b}\n"
        "          nps: {survey: nps, any_stage: true}\n"
        "          per_visit: {ratio: [revenue, visits], better: lower, unit: percent}\n" + TAIL
    )
    visits, revenue, buyers, nps, per_visit = journey.stage("awareness").kpis
    assert (visits.kind, visits.event_types, visits.unit, visits.better) == (
        "count",
        ("page_view",),
        "number",
        "higher",
    )
    assert (revenue.kind, revenue.prop, revenue.event_types) == (
        "sum",
        "order_value",
        ("order_completed",),
    )
    assert (buyers.measure, buyers.stage) == ("reached", "b")
    assert (nps.kind, nps.measure, nps.stage) == ("survey", "nps", None)
    assert (per_visit.operands, per_visit.better, per_visit.unit) == (
        ("revenue", "visits"),
        "lower",
        "percent",
    )
    scoring = journey.scoring
    assert scoring.goal == "b"  # the last stage
    assert scoring.weights.as_dict() == {
        "conversion": 3.0,
        "dropoff": 0.0,
        "time_to_goal": 0.0,
        "satisfaction": 0.0,
    }
    assert scoring.time_limit == 7 * 86400.0  # awareness's max_dwell


def test_files_without_kpis_or_score_keep_working() -> None:
    (journey,) = parse_journeys(GOOD_HEAD + TAIL)
    assert all(s.kpis == () for s in journey.stages)
    assert journey.score is None
    assert journey.scoring.weights == DEFAULT_WEIGHTS
    (no_limit,) = parse_journeys(GOOD_HEAD.replace("        max_dwell: 7d\n", "") + TAIL)
    assert no_limit.scoring.time_limit is None  # a stage before the goal has no max_dwell
