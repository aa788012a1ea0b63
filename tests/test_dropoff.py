"""Dwell and drop-off in the pure engine, case by case, then as properties of any stream."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.journeys import parse_journeys
from pipeline.stages import (
    ADVANCED,
    DROPPED,
    ENTERED,
    REENGAGED,
    Position,
    Profile,
    Transition,
    apply_event,
    deadline,
    expire,
    next_deadline,
    replay,
)

Scalar = str | int | float | bool | None

SHOP = parse_journeys(
    """\
journeys:
  - name: shop
    stages:
      - name: browse
        events: [page_view]
        max_dwell: 100s
      - name: cart
        events: [add_to_cart]
        max_dwell: 50s
      - name: loyal
        events: [repeat_purchase]
        max_dwell: 30s
        dwell_from: last_activity
      - name: fan
        events: [referral_sent]
""",
    "shop.yaml",
)
(JOURNEY,) = SHOP


@dataclass(frozen=True)
class Ev:
    event_id: str
    event_type: str
    ts: float
    channel: str = "web"
    customer: str = "c1"
    properties: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.customer


def kinds(transitions: Sequence[Transition]) -> list[tuple[str | None, str | None, str, float]]:
    return [(t.from_stage, t.to_stage, t.kind, t.occurred_at) for t in transitions]


def test_deadline_from_entry_or_last_activity() -> None:
    assert deadline(JOURNEY, Position("browse", 10.0, 70.0, "web")) == 110.0
    assert deadline(JOURNEY, Position("loyal", 10.0, 70.0, "web")) == 100.0
    assert deadline(JOURNEY, Position("fan", 10.0, 70.0, "web")) is None
    assert deadline(JOURNEY, Position(None, 10.0, 70.0, "web", dropped_from="cart")) is None
    assert deadline(JOURNEY, Position("renamed", 10.0, 70.0, "web")) is None


def test_an_event_at_the_deadline_still_saves_the_customer() -> None:
    _, transitions, _ = replay([Ev("a", "page_view", 0.0), Ev("b", "add_to_cart", 100.0)], SHOP)
    assert kinds(transitions) == [
        (None, "browse", ENTERED, 0.0),
        ("browse", "cart", ADVANCED, 100.0),
    ]


def test_a_late_move_drops_at_the_deadline_then_reengages() -> None:
    events = [
        Ev("a", "page_view", 0.0, "web"),
        Ev("x", "password_reset", 20.0, "app"),  # activity in browse: names the channel
        Ev("b", "add_to_cart", 150.0, "store"),
    ]
    profiles, transitions, _ = replay(events, SHOP)
    dropped, back = transitions[1], transitions[2]
    assert dropped == Transition(
        "shop", "c1", "browse", None, DROPPED, "app", "", 100.0, 100.0, "web", "app"
    )
    assert back == Transition("shop", "c1", "browse", "cart", REENGAGED, "store", "b", 150.0, 50.0)
    assert profiles["c1"].positions["shop"] == Position("cart", 150.0, 150.0, "store")


def test_an_unmapped_event_after_the_deadline_leaves_the_customer_dropped() -> None:
    events = [Ev("a", "page_view", 0.0), Ev("b", "logout", 500.0, "app")]
    profiles, transitions, _ = replay(events, SHOP)
    assert kinds(transitions)[-1] == ("browse", None, DROPPED, 100.0)
    position = profiles["c1"].positions["shop"]
    assert position.stage is None and position.dropped_from == "browse"
    assert position.last_channel == "app" and position.last_event_at == 500.0
    assert next_deadline(profiles["c1"], SHOP) is None


def test_reengaging_at_an_earlier_stage_is_allowed() -> None:
    events = [Ev("a", "add_to_cart", 0.0), Ev("b", "page_view", 60.0)]
    _, transitions, _ = replay(events, SHOP)
    assert kinds(transitions) == [
        (None, "cart", ENTERED, 0.0),
        ("cart", None, DROPPED, 50.0),
        ("cart", "browse", REENGAGED, 60.0),
    ]


def test_last_activity_dwell_is_extended_by_any_event() -> None:
    events = [
        Ev("a", "repeat_purchase", 0.0),
        Ev("b", "logout", 25.0),
        Ev("c", "logout", 50.0),
    ]
    profiles, transitions, _ = replay(events, SHOP)
    assert [t.kind for t in transitions] == [ENTERED]
    assert next_deadline(profiles["c1"], SHOP) == 80.0
    swept, dropped = expire(profiles["c1"], SHOP, 80.5)
    assert kinds(dropped) == [("loyal", None, DROPPED, 80.0)]
    assert swept.positions["shop"].stage is None


def test_nobody_drops_from_the_last_stage() -> None:
    profiles, _, _ = replay([Ev("a", "referral_sent", 0.0)], SHOP, until=1e12)
    assert profiles["c1"].positions["shop"].stage == "fan"


def test_sweep_and_event_agree_on_the_drop() -> None:
    """Dropping by the sweep, then the event, gives what the event alone gives."""
    events = [Ev("a", "page_view", 0.0), Ev("b", "add_to_cart", 300.0)]
    _, by_event, _ = replay(events, SHOP)
    first = apply_event(Profile.empty("c1"), events[0], SHOP)
    swept, drops = expire(first.profile, SHOP, 250.0)
    second = apply_event(swept, events[1], SHOP)
    assert [*first.transitions, *drops, *second.transitions] == by_event


def test_expire_strictly_before_now() -> None:
    first = apply_event(Profile.empty("c1"), Ev("a", "page_view", 0.0), SHOP)
    same, none = expire(first.profile, SHOP, 100.0)
    assert none == [] and same is first.profile


# ------------------------------------------------------------------ properties

TYPES = ["page_view", "add_to_cart", "repeat_purchase", "referral_sent", "logout"]


@st.composite
def streams(draw: st.DrawFn) -> list[Ev]:
    """Events of a few customers with times going mostly forward, with gaps that drop people."""
    n = draw(st.integers(0, 25))
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 5.0, 20.0, 49.0, 50.0, 51.0, 120.0, 400.0]))
        out.append(
            Ev(
                f"e{i}",
                draw(st.sampled_from(TYPES)),
                t,
                draw(st.sampled_from(["web", "app", "store"])),
                draw(st.sampled_from(["c1", "c2", "c3"])),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(streams(), st.floats(0, 5000))
def test_sweeping_at_any_time_changes_nothing_but_order(events: list[Ev], at: float) -> None:
    """A sweep in the middle of a stream (idle clock) gives the same transitions as none.

    Events arrive in time order here: sweeping only ever drops what a later
    event of the customer would have dropped at the same deadline.
    """
    _, expected, _ = replay(events, SHOP, until=1e9)
    profiles: dict[str, Profile] = {}
    got: list[Transition] = []
    swept = False
    for event in events:
        if not swept and event.ts > at:
            for key, profile in list(profiles.items()):
                profiles[key], dropped = expire(profile, SHOP, at)
                got.extend(dropped)
            swept = True
        step = apply_event(profiles.get(event.key) or Profile.empty(event.key), event, SHOP)
        profiles[event.key] = step.profile
        got.extend(step.transitions)
    for key, profile in list(profiles.items()):
        profiles[key], dropped = expire(profile, SHOP, 1e9)
        got.extend(dropped)
    assert sorted(got, key=repr) == sorted(expected, key=repr)


@settings(max_examples=300, deadline=None)
@given(streams())
def test_every_exit_is_timed_and_every_drop_is_at_a_deadline(events: list[Ev]) -> None:
    _, transitions, _ = replay(events, SHOP, until=1e9)
    dwell = {s.name: s.max_dwell for s in JOURNEY.stages}
    for t in transitions:
        assert t.seconds_in_previous >= 0
        if t.kind == DROPPED:
            assert t.from_stage is not None and t.to_stage is None and t.event_id == ""
            if t.from_stage != "loyal":  # dwell from entry: exactly max_dwell in the stage
                assert t.seconds_in_previous == dwell[t.from_stage]
    # Each customer alternates: a drop is followed by a re-engagement or nothing.
    for customer in {e.customer for e in events}:
        mine = [t.kind for t in transitions if t.customer == customer]
        for before, after in itertools.pairwise(mine):
            if before == DROPPED:
                assert after == REENGAGED
            if after == REENGAGED:
                assert before == DROPPED
