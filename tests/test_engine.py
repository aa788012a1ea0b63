"""Stitching and stages together: merges, and batches computed by groups as the worker does."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import engine
from pipeline.engine import Slot, feedback_of, links_of
from pipeline.identity import LINKED, MERGED, REFUSED_CLAIMED, anonymous, customer, groups, resolve
from pipeline.journeys import default_journeys, parse_journeys
from pipeline.processor import stage_deltas
from pipeline.stages import ADVANCED, DROPPED, ENTERED, Position, Profile
from pipeline.stages import MERGED as MERGED_KIND

Scalar = str | int | float | bool | None
RETAIL = default_journeys()
SHORT = parse_journeys(
    """\
journeys:
  - name: short
    stages:
      - name: awareness
        events: [page_view]
        max_dwell: 100s
      - name: consideration
        events: [search]
        max_dwell: 100s
      - name: purchase
        events: [order_completed]
""",
    "short.yaml",
)


@dataclass(frozen=True)
class Ev:
    event_id: str
    event_type: str
    ts: float
    channel: str = "web"
    customer_id: str | None = None
    anonymous_id: str | None = None
    properties: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def key(self) -> str:
        key = self.customer_id or self.anonymous_id
        assert key is not None
        return key


def test_login_merges_the_device_history_and_later_device_events_follow() -> None:
    events = [
        Ev("1", "search", 10.0, "web", anonymous_id="d1"),
        Ev("2", "page_view", 20.0, "app", customer_id="c1"),
        Ev("3", "login", 30.0, "app", customer_id="c1", anonymous_id="d1"),
        Ev("4", "order_completed", 40.0, "web", anonymous_id="d1"),
    ]
    ref = engine.replay(events, RETAIL)
    c1 = ref.slots[customer("c1")].profile
    assert c1 is not None
    # Consideration (device) beats awareness (customer), with the device's entry time.
    assert c1.positions["retail"].stage == "purchase"
    assert c1.channels == {"web", "app"}
    assert ref.slots[anonymous("d1")] == Slot(None, "c1")
    merged = [t for t in ref.outcome.transitions if t.kind == MERGED_KIND]
    assert [(t.customer, t.from_stage, t.to_stage, t.event_id) for t in merged] == [
        ("c1", "consideration", "consideration", "3")
    ]
    advanced = ref.outcome.transitions[-1]
    assert (advanced.customer, advanced.kind, advanced.seconds_in_previous) == (
        "c1",
        ADVANCED,
        30.0,
    )
    assert ref.outcome.merge_results == Counter({MERGED: 1})
    assert ref.stage_customers() == Counter({("retail", "purchase"): 1})


def test_merge_tie_goes_to_the_earlier_entry_and_no_history_only_links() -> None:
    events = [
        Ev("1", "page_view", 50.0, "web", customer_id="c1"),
        Ev("2", "page_view", 10.0, "app", anonymous_id="d1"),
        Ev("3", "login", 60.0, "store", customer_id="c1", anonymous_id="d1"),
        Ev("4", "login", 70.0, "web", customer_id="c1", anonymous_id="fresh"),
        Ev("5", "login", 80.0, "web", customer_id="c2", anonymous_id="d1"),
    ]
    ref = engine.replay(events, RETAIL)
    c1 = ref.slots[customer("c1")].profile
    assert c1 is not None
    assert c1.positions["retail"].entered_at == 10.0
    assert ref.outcome.merge_results == Counter({MERGED: 1, LINKED: 1, REFUSED_CLAIMED: 1})
    assert links_of(ref.slots) == {"d1": "c1", "fresh": "c1"}
    assert ref.slots[customer("c2")].profile is not None  # the refused claim still applies


def test_a_device_past_its_deadline_drops_before_it_merges() -> None:
    events = [
        Ev("1", "search", 0.0, "app", anonymous_id="d1"),
        Ev("2", "page_view", 10.0, "web", customer_id="c1"),
        Ev("3", "login", 150.0, "web", customer_id="c1", anonymous_id="d1"),
    ]
    ref = engine.replay(events, SHORT)
    kinds = [(t.customer, t.kind, t.from_stage, t.to_stage) for t in ref.outcome.transitions]
    assert kinds == [
        ("d1", ENTERED, None, "consideration"),
        ("c1", ENTERED, None, "awareness"),
        ("d1", DROPPED, "consideration", None),
        ("c1", DROPPED, "awareness", None),
        ("c1", MERGED_KIND, None, None),
    ]
    assert ref.stage_customers() == Counter()


def test_feedback_is_placed_at_the_stage_and_bad_scores_ignored() -> None:
    profile = Profile("c1", {"retail": Position("retention", 1.0, 1.0, "store")})
    good = Ev("1", "survey", 5.0, "store", "c1", properties={"csat": 4, "nps": 10})
    (f,) = feedback_of(good, profile, RETAIL)
    assert (f.stage, f.channel, f.csat, f.nps) == ("retention", "store", 4.0, 10.0)
    assert feedback_of(Ev("2", "survey", 5.0, properties={"csat": 9}), profile, RETAIL) == []
    assert feedback_of(Ev("3", "survey", 5.0, properties={"nps": True}), profile, RETAIL) == []
    (nobody,) = feedback_of(Ev("4", "s", 5.0, properties={"nps": 0}), Profile.empty("x"), RETAIL)
    assert nobody.stage == "" and nobody.nps == 0.0


# ------------------------------------------------------------------ the worker's way

TYPES = ["page_view", "search", "order_completed", "login", "logout"]


@st.composite
def streams(draw: st.DrawFn) -> list[Ev]:
    n = draw(st.integers(0, 40))
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 10.0, 60.0, 99.0, 101.0, 250.0]))
        who = draw(st.sampled_from(["c", "a", "both"]))
        c = draw(st.sampled_from(["c1", "c2", "c3"])) if who != "a" else None
        a = draw(st.sampled_from(["d1", "d2", "d3", "null"])) if who != "c" else None
        if c is None and a == "null":
            a = "d1"
        out.append(
            Ev(
                f"e{i}",
                draw(st.sampled_from(TYPES)),
                t,
                draw(st.sampled_from(["web", "app"])),
                c,
                a,
            )
        )
    return out


def run_in_batches(events: list[Ev], cuts: list[int]) -> tuple[dict, list, Counter, Counter]:
    """What the processor computes: per batch, resolve, group, run each group, write back."""
    store: dict = {}
    population: Counter[tuple[str, str]] = Counter()
    transitions = []
    results: Counter[str] = Counter()
    bounds = [0, *sorted(set(cuts)), len(events)]
    for lo, hi in itertools.pairwise(bounds):
        batch = events[lo:hi]
        resolution = resolve(batch, links_of(store))
        for indexes in groups(resolution.events):
            items = [(batch[i], resolution.events[i]) for i in indexes]
            refs = {r.target for _, r in items} | {r.absorb for _, r in items if r.absorb}
            slots = {ref: store.get(ref, Slot()) for ref in refs}
            before = {ref: slots[ref].profile for ref in refs}
            out = engine.run_events(slots, items, SHORT)
            for ref in out.changed:
                for key, delta in stage_deltas(before[ref], slots[ref].profile).items():
                    population[key] += delta
                store[ref] = slots[ref]
            transitions.extend(out.transitions)
            results.update(out.merge_results)
    return store, transitions, population, results


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 40), max_size=5))
def test_batches_by_group_equal_one_event_at_a_time(events: list[Ev], cuts: list[int]) -> None:
    ref = engine.replay(events, SHORT)
    store, transitions, population, results = run_in_batches(events, cuts)
    assert {k: v for k, v in store.items()} == ref.slots
    assert sorted(transitions, key=repr) == sorted(ref.outcome.transitions, key=repr)
    assert +population == ref.stage_customers()
    assert results == ref.outcome.merge_results


@settings(max_examples=200, deadline=None)
@given(streams())
def test_population_is_conserved_through_merges(events: list[Ev]) -> None:
    ref = engine.replay(events, SHORT, until=1e9)
    live = [s.profile for s in ref.slots.values() if s.profile is not None]
    linked = [s for s in ref.slots.values() if s.linked_to is not None]
    assert all(s.profile is None for s in linked)
    # Nobody is in a stage after every deadline passed, but purchasers (the last stage).
    for profile in live:
        position = profile.positions.get("short")
        assert position is None or position.stage in (None, "purchase")
    kinds = Counter(t.kind for t in ref.outcome.transitions)
    assert kinds[MERGED_KIND] <= ref.outcome.merge_results[MERGED]
