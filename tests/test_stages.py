"""The pure stage engine: tables of moves, and properties that must hold for any stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.journeys import Journey, default_journeys, parse_journeys
from pipeline.stages import (
    ADVANCED,
    DROPPED,
    ENTERED,
    REGRESSED,
    Position,
    Profile,
    Transition,
    apply_event,
    replay,
)

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Ev:
    """A stand-in with the fields the engine reads; the real Event has the same shape."""

    event_id: str
    event_type: str
    ts: float
    channel: str = "web"
    customer: str = "c1"
    properties: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.customer


RETAIL = default_journeys()
LOOPY = parse_journeys(
    """\
journeys:
  - name: loopy
    allow_regression: true
    stages:
      - name: browse
        events: [page_view]
        max_dwell: 1h
      - name: cart
        events: [add_to_cart]
        max_dwell: 1h
      - name: bought
        events: [order_completed]
""",
    "loopy.yaml",
)
BOTH = RETAIL + LOOPY


def run(types: Sequence[str | tuple[str, dict[str, Any]]], journeys: Sequence[Journey] = RETAIL):
    events = []
    for i, t in enumerate(types):
        name, props = (t, {}) if isinstance(t, str) else t
        events.append(Ev(f"e{i}", name, 1000.0 + 60 * i, properties=props))
    return replay(events, journeys)


def moves(transitions: list[Transition]) -> list[tuple[str, str | None, str | None, str]]:
    return [(t.journey, t.from_stage, t.to_stage, t.kind) for t in transitions]


@pytest.mark.parametrize(
    ("types", "stage", "expected"),
    [
        pytest.param(
            ["page_view", "search", "order_completed", "repeat_purchase", "referral_sent"],
            "advocacy",
            [
                (None, "awareness", ENTERED),
                ("awareness", "consideration", ADVANCED),
                ("consideration", "purchase", ADVANCED),
                ("purchase", "retention", ADVANCED),
                ("retention", "advocacy", ADVANCED),
            ],
            id="forward-all-the-way",
        ),
        pytest.param(
            ["store_visit", "order_completed"],
            "purchase",
            [(None, "awareness", ENTERED), ("awareness", "purchase", ADVANCED)],
            id="store-walk-in-skips-consideration",
        ),
        pytest.param(
            ["order_completed"],
            "purchase",
            [(None, "purchase", ENTERED)],
            id="first-event-enters-a-later-stage",
        ),
        pytest.param(
            ["order_completed", "page_view", "search"],
            "purchase",
            [(None, "purchase", ENTERED)],
            id="regression-ignored",
        ),
        pytest.param(
            ["page_view", "page_view", "ad_click"],
            "awareness",
            [(None, "awareness", ENTERED)],
            id="same-stage-changes-nothing",
        ),
        pytest.param(
            ["password_reset", "logout"],
            None,
            [],
            id="unmapped-types-move-nobody",
        ),
        pytest.param(
            ["page_view", "password_reset"],
            "awareness",
            [(None, "awareness", ENTERED)],
            id="unmapped-after-entry",
        ),
        pytest.param(
            ["order_completed", ("review_submitted", {"rating": 3})],
            "purchase",
            [(None, "purchase", ENTERED)],
            id="condition-fails-no-move",
        ),
        pytest.param(
            ["order_completed", ("review_submitted", {"rating": 5})],
            "advocacy",
            [(None, "purchase", ENTERED), ("purchase", "advocacy", ADVANCED)],
            id="condition-holds-moves",
        ),
        pytest.param(
            [("nps_response", {"nps": "10"})],
            None,
            [],
            id="condition-wrong-type",
        ),
    ],
)
def test_retail_moves(
    types: list[Any], stage: str | None, expected: list[tuple[str | None, str, str]]
) -> None:
    profiles, transitions, duplicates = run(types)
    assert duplicates == 0
    assert [(t.from_stage, t.to_stage, t.kind) for t in transitions] == expected
    position = profiles["c1"].positions.get("retail")
    assert (position.stage if position else None) == stage


def test_allowed_regression() -> None:
    _, transitions, _ = run(["page_view", "add_to_cart", "page_view", "order_completed"], LOOPY)
    assert moves(transitions) == [
        ("loopy", None, "browse", ENTERED),
        ("loopy", "browse", "cart", ADVANCED),
        ("loopy", "cart", "browse", REGRESSED),
        ("loopy", "browse", "bought", ADVANCED),
    ]


def test_several_journeys_at_once() -> None:
    profiles, transitions, _ = run(
        ["page_view", "add_to_cart", "order_completed", "page_view"], BOTH
    )
    assert moves(transitions) == [
        ("retail", None, "awareness", ENTERED),
        ("loopy", None, "browse", ENTERED),
        ("retail", "awareness", "consideration", ADVANCED),
        ("loopy", "browse", "cart", ADVANCED),
        ("retail", "consideration", "purchase", ADVANCED),
        ("loopy", "cart", "bought", ADVANCED),
        ("loopy", "bought", "browse", REGRESSED),
    ]
    positions = profiles["c1"].positions
    assert positions["retail"].stage == "purchase"
    assert positions["loopy"].stage == "browse"


def test_journey_not_entered_stays_absent() -> None:
    profiles, _, _ = run(["search", "store_visit"], BOTH)
    assert set(profiles["c1"].positions) == {"retail"}


def test_transition_fields_and_bookkeeping() -> None:
    events = [
        Ev("a", "page_view", 100.0, "web"),
        Ev("b", "password_reset", 150.0, "email"),
        Ev("c", "page_view", 170.0, "social"),
        Ev("d", "order_completed", 400.0, "store"),
    ]
    profiles, transitions, _ = replay(events, RETAIL)
    first, second = transitions
    assert first == Transition("retail", "c1", None, "awareness", ENTERED, "web", "a", 100.0, 0.0)
    # The last hand-off made in awareness (social → store) travels with the exit.
    assert second == Transition(
        "retail",
        "c1",
        "awareness",
        "purchase",
        ADVANCED,
        "store",
        "d",
        400.0,
        300.0,
        "social",
        "store",
    )
    assert second.to_dict() == {
        "journey": "retail",
        "customer": "c1",
        "from_stage": "awareness",
        "to_stage": "purchase",
        "kind": "advanced",
        "channel": "store",
        "event_id": "d",
        "occurred_at": 400.0,
        "seconds_in_previous": 300.0,
        "handoff_from": "social",
        "handoff_to": "store",
    }
    profile = profiles["c1"]
    assert profile.channels == {"web", "email", "social", "store"}
    assert profile.last_channel == "store"
    assert profile.last_event_at == 400.0
    assert profile.positions["retail"] == Position("purchase", 400.0, 400.0, "store")


def test_bookkeeping_without_a_move() -> None:
    step = apply_event(Profile.empty("c1"), Ev("a", "search", 100.0, "web"), RETAIL)
    step = apply_event(step.profile, Ev("b", "password_reset", 200.0, "app"), RETAIL)
    assert step.transitions == []
    assert step.profile.positions["retail"] == Position(
        "consideration", 100.0, 200.0, "app", handoff=("web", "app")
    )
    step = apply_event(step.profile, Ev("c", "page_view", 300.0, "store"), RETAIL)
    assert step.transitions == []
    assert step.profile.positions["retail"] == Position(
        "consideration", 100.0, 300.0, "store", handoff=("app", "store")
    )
    assert [(h.stage, h.from_channel, h.to_channel) for h in step.handoffs] == [
        ("consideration", "app", "store")
    ]


def test_events_apply_in_arrival_order_and_time_never_runs_back() -> None:
    events = [Ev("a", "search", 500.0), Ev("b", "order_completed", 400.0, "app")]
    profiles, transitions, _ = replay(events, RETAIL)
    assert transitions[-1].kind == ADVANCED
    assert transitions[-1].seconds_in_previous == 0.0
    position = profiles["c1"].positions["retail"]
    assert position.entered_at == 400.0
    assert position.last_event_at == 500.0
    assert profiles["c1"].last_event_at == 500.0


def test_duplicates_change_nothing() -> None:
    events = [
        Ev("a", "page_view", 100.0),
        Ev("a", "order_completed", 120.0),  # same id: a replayed message, ignored
        Ev("b", "search", 130.0, customer="c2"),
        Ev("b", "search", 130.0, customer="c2"),
    ]
    profiles, transitions, duplicates = replay(events, RETAIL)
    assert duplicates == 2
    assert profiles["c1"].positions["retail"].stage == "awareness"
    assert len(transitions) == 2


def test_customers_are_independent() -> None:
    events = [
        Ev("a", "order_completed", 1.0, customer="x"),
        Ev("b", "page_view", 2.0, customer="y"),
    ]
    profiles, _, _ = replay(events, RETAIL)
    assert profiles["x"].positions["retail"].stage == "purchase"
    assert profiles["y"].positions["retail"].stage == "awareness"


def test_stage_missing_from_a_changed_journey_file_reenters() -> None:
    stale = Profile("c1", {"retail": Position("gone", 1.0, 1.0, "web")})
    step = apply_event(stale, Ev("a", "page_view", 5.0), RETAIL)
    assert moves(step.transitions) == [("retail", None, "awareness", ENTERED)]
    assert step.profile.positions["retail"].stage == "awareness"


def test_profile_json_is_compact_and_sorted() -> None:
    profile = Profile(
        "c1",
        {"retail": Position("purchase", 1.5, 2.5, "app")},
        frozenset({"web", "app"}),
        "app",
        2.5,
    )
    data = profile.to_json()
    assert data == b'[2,"c1",0,2.5,"app",["app","web"],{"retail":["purchase",1.5,2.5,"app"]}]'
    assert Profile.from_json(data) == profile
    assert Profile.from_json(Profile.empty("z").to_json()) == Profile.empty("z")


def test_profiles_stored_in_format_1_are_still_read() -> None:
    """What a worker of the previous release left in Redis loads unchanged."""
    v1 = (
        b'{"anonymous":true,"channels":["app","web"],"customer":"d1","last_channel":"web",'
        b'"last_event_at":9.5,"positions":{"retail":{"dropped_from":"cart","entered_at":8.0,'
        b'"handoff":["app","web"],"last_channel":"web","last_event_at":9.5,"stage":null}},"v":1}'
    )
    profile = Profile.from_json(v1)
    assert profile == Profile(
        "d1",
        {"retail": Position(None, 8.0, 9.5, "web", "cart", ("app", "web"))},
        frozenset({"app", "web"}),
        "web",
        9.5,
        anonymous=True,
    )
    assert Profile.from_json(profile.to_json()) == profile
    with pytest.raises(ValueError, match="format 3"):
        Profile.from_json(b'[3,"x",0,null,null,[],{}]')


# ------------------------------------------------------------------ properties

TYPES = [
    "page_view",
    "store_visit",
    "search",
    "add_to_cart",
    "order_completed",
    "repeat_purchase",
    "support_resolved",
    "referral_sent",
    "password_reset",
    "review_submitted",
    "nps_response",
]
CHANNELS = ["web", "app", "store", "email"]

properties = st.dictionaries(
    st.sampled_from(["rating", "nps", "campaign"]),
    st.one_of(st.none(), st.booleans(), st.integers(0, 10), st.text(max_size=3)),
    max_size=3,
)


@st.composite
def streams(draw: st.DrawFn) -> list[Ev]:
    n = draw(st.integers(0, 30))
    return [
        Ev(
            f"e{i}",
            draw(st.sampled_from(TYPES)),
            draw(st.floats(0, 1e9, allow_nan=False)),
            draw(st.sampled_from(CHANNELS)),
            draw(st.sampled_from(["c1", "c2", "c3"])),
            draw(properties),
        )
        for i in range(n)
    ]


def _index(journeys: Sequence[Journey], journey: str, stage: str | None) -> int:
    if stage is None:
        return -1
    (j,) = [j for j in journeys if j.name == journey]
    return j.stage(stage).index


@settings(max_examples=200, deadline=None)
@given(streams())
def test_without_regression_stage_never_decreases(events: list[Ev]) -> None:
    profiles: dict[str, Profile] = {}
    for event in events:
        before = profiles.get(event.key) or Profile.empty(event.key)
        step = apply_event(before, event, RETAIL)
        old, new = before.positions.get("retail"), step.profile.positions.get("retail")
        old_i = _index(RETAIL, "retail", old.stage if old else None)
        new_i = _index(RETAIL, "retail", new.stage if new else None)
        kinds = [t.kind for t in step.transitions]
        # Only a drop (and a re-engagement after it) may leave the customer further back.
        assert new_i >= old_i or DROPPED in kinds
        assert REGRESSED not in kinds
        profiles[event.key] = step.profile


@settings(max_examples=200, deadline=None)
@given(streams(), st.data())
def test_duplicates_do_not_change_the_result(events: list[Ev], data: st.DataObject) -> None:
    with_dupes = list(events)
    extra = data.draw(st.integers(0, 10)) if events else 0
    for _ in range(extra):
        original = data.draw(st.sampled_from(events))
        # A redelivery can arrive any time after the original.
        at = data.draw(st.integers(with_dupes.index(original) + 1, len(with_dupes)))
        with_dupes.insert(at, original)
    expected = replay(events, BOTH)
    got = replay(with_dupes, BOTH)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert got[2] == extra


@settings(max_examples=200, deadline=None)
@given(streams())
def test_profile_json_round_trips(events: list[Ev]) -> None:
    profiles, _, _ = replay(events, BOTH)
    for profile in [*profiles.values(), Profile.empty("nobody")]:
        data = profile.to_json()
        assert Profile.from_json(data) == profile
        assert Profile.from_json(data).to_json() == data


@settings(max_examples=200, deadline=None)
@given(streams())
def test_every_transition_lands_in_a_stage_of_its_journey(events: list[Ev]) -> None:
    _, transitions, _ = replay(events, BOTH)
    by_name = {j.name: j for j in BOTH}
    for t in transitions:
        journey = by_name[t.journey]
        assert t.to_stage in journey.stage_names or (t.kind == DROPPED and t.to_stage is None)
        assert t.from_stage is None or t.from_stage in journey.stage_names
        assert t.seconds_in_previous >= 0.0
        assert (t.kind == ENTERED) == (t.from_stage is None)
