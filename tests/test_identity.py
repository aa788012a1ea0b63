"""Identity stitching rules: placeholders, first claim wins, batches resolved in order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.identity import (
    ALREADY_LINKED,
    MERGED,
    PLACEHOLDER_IDS,
    REFUSED_CLAIMED,
    REFUSED_PLACEHOLDER,
    Ref,
    Resolved,
    anonymous,
    customer,
    groups,
    is_placeholder,
    resolve,
    routing_key,
)


@dataclass(frozen=True)
class Ids:
    event_id: str
    customer_id: str | None = None
    anonymous_id: str | None = None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "anonymous",
        "Anonymous",
        "null",
        "NULL",
        '"null"',
        "'undefined'",
        "undefined",
        "0",
        "-1",
        "[object Object]",
        "00000000-0000-0000-0000-000000000000",
        "000",
        '"0"',
        "None",
        "nil",
        "NaN",
    ],
)
def test_placeholders_are_recognised(raw: str) -> None:
    assert is_placeholder(raw)


@pytest.mark.parametrize("raw", ["c-1", "0a", "10", "anon-42", "nullable", "user_0", "-12"])
def test_real_ids_are_not_placeholders(raw: str) -> None:
    assert not is_placeholder(raw)


def _placeholder_rule(raw: str) -> bool:
    """The rule as first written, plainly: the fast version must agree with it."""
    text = raw.strip().strip("\"'`").strip().lower()
    if text in PLACEHOLDER_IDS:
        return True
    digits = text.replace("-", "").replace("_", "").replace(" ", "").replace(":", "")
    return digits != "" and set(digits) <= {"0"}


@given(
    st.one_of(
        st.text(),
        st.text(alphabet="0-_ :\t\"'`aA1"),
        st.sampled_from(sorted(PLACEHOLDER_IDS)).map(lambda t: f" '{t.upper()}' "),
    )
)
def test_placeholder_check_follows_the_rule(raw: str) -> None:
    assert is_placeholder(raw) == _placeholder_rule(raw)


def test_routing_key_skips_placeholders() -> None:
    assert routing_key("null", "dev-1") == "dev-1"
    assert routing_key("c1", "dev-1") == "c1"
    assert routing_key("undefined", "0") is None


def test_first_claim_wins_and_later_events_follow_the_link() -> None:
    events = [
        Ids("1", anonymous_id="d1"),
        Ids("2", customer_id="alice", anonymous_id="d1"),
        Ids("3", anonymous_id="d1"),
        Ids("4", customer_id="bob", anonymous_id="d1"),
        Ids("5", customer_id="alice", anonymous_id="d1"),
    ]
    r = resolve(events, {})
    assert r.events == [
        Resolved(anonymous("d1")),
        Resolved(customer("alice"), anonymous("d1"), MERGED),
        Resolved(customer("alice")),
        Resolved(customer("bob"), None, REFUSED_CLAIMED),
        Resolved(customer("alice"), None, ALREADY_LINKED),
    ]
    assert r.links == {"d1": "alice"}


def test_known_links_come_from_the_store() -> None:
    r = resolve([Ids("1", anonymous_id="d1"), Ids("2", "bob", "d1")], {"d1": "alice"})
    assert r.events == [
        Resolved(customer("alice")),
        Resolved(customer("bob"), None, REFUSED_CLAIMED),
    ]
    assert r.links == {}


def test_placeholders_never_link() -> None:
    r = resolve([Ids("1", "alice", "null"), Ids("2", "undefined", "d1")], {})
    assert r.events == [
        Resolved(customer("alice"), None, REFUSED_PLACEHOLDER),
        Resolved(anonymous("d1"), None, REFUSED_PLACEHOLDER),
    ]
    assert r.links == {}
    with pytest.raises(ValueError, match="no usable"):
        resolve([Ids("3", "0", "null")], {})


def test_a_chain_of_devices_lands_on_one_customer() -> None:
    events = [
        Ids("1", anonymous_id="web-1"),
        Ids("2", anonymous_id="app-1"),
        Ids("3", customer_id="c", anonymous_id="app-1"),
        Ids("4", customer_id="c", anonymous_id="web-1"),
        Ids("5", anonymous_id="web-1"),
    ]
    r = resolve(events, {})
    assert {e.target for e in r.events[2:]} == {customer("c")}
    assert groups(r.events) == [[0, 1, 2, 3, 4]]


def test_groups_keep_independent_profiles_apart() -> None:
    r = resolve([Ids("1", "a"), Ids("2", "b"), Ids("3", "a"), Ids("4", anonymous_id="d")], {})
    assert groups(r.events) == [[0, 2], [1], [3]]


def test_ref_round_trips() -> None:
    for ref in (customer("x:y"), anonymous("d")):
        assert Ref.parse(str(ref)) == ref
    with pytest.raises(ValueError):
        Ref.parse("z:1")


ids = st.sampled_from(["c1", "c2", "c3", None, "null", "0"])
devices = st.sampled_from(["d1", "d2", "d3", None, "undefined"])


@given(
    st.lists(st.tuples(ids, devices), max_size=30).filter(
        lambda xs: all(routing_key(c, a) is not None for c, a in xs)
    )
)
def test_an_anonymous_id_is_linked_at_most_once(pairs: list[tuple[str | None, str | None]]) -> None:
    events = [Ids(str(i), c, a) for i, (c, a) in enumerate(pairs)]
    whole = resolve(events, {})
    # Resolving one event at a time, carrying links over, gives the same answer.
    links: dict[str, str] = {}
    one_by_one = []
    for event in events:
        r = resolve([event], links)
        links.update(r.links)
        one_by_one.extend(r.events)
    assert one_by_one == whole.events
    assert links == whole.links
    assert sum(1 for e in whole.events if e.result == MERGED) == len(whole.links)
    for group in groups(whole.events):
        assert group == sorted(group)
