"""The compiled fast path agrees with jsonschema, so no verdict and no reason changed.

``Validator()`` lets fastjsonschema accept events and jsonschema explain
rejections; ``Validator(fast=False)`` is jsonschema alone, the validator as it
was. On JSON input the two schema checks must give the same yes/no, and the
two validators the same ``Event`` or the same ``Rejection`` (code and text).
On Python-only values (``validate_dict``) the fast check may say no where
jsonschema says yes; it then defers, so the results are still equal.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from decimal import Decimal
from enum import IntEnum
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.events import (
    DEFAULT_CHANNELS,
    Event,
    Rejection,
    Validator,
    _compile_fast_check,
    _StrictValidator,
    load_schema,
)
from pipeline.simulate import generate
from tests.test_events import BAD, GOOD
from tests.test_hostile_input import catalogue

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
FAST = Validator()
SLOW = Validator(fast=False)
_REFERENCE = _StrictValidator(load_schema())
_CHECK = _compile_fast_check(load_schema())


def reference(obj: object) -> bool:
    """jsonschema's verdict, with the project's ECMA-style ``pattern``."""
    try:
        return bool(_REFERENCE.is_valid(obj))
    except RecursionError:  # its message quotes a value ~1000 levels deep: never a valid event
        return False


def fast(obj: object) -> bool:
    assert _CHECK is not None
    return _CHECK(obj)


def assert_agree(raw: bytes) -> Event | Rejection:
    """Same schema verdict on the parsed value, and the same decode result end to end."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        assert fast(obj) == reference(obj), obj
    result = FAST.decode(raw, now=NOW)
    assert result == SLOW.decode(raw, now=NOW)
    return result


# --- the fast path is on, and it is what the real traffic takes --------------------------


def test_fast_path_is_on_for_the_packaged_schema() -> None:
    """A schema change that drops the fast path must be noticed, not silently cost 8×."""
    assert _CHECK is not None
    assert FAST._fast is not None
    assert SLOW._fast is None


def test_simulator_traffic_takes_the_fast_path() -> None:
    """Every event the simulator makes is accepted by the compiled check alone."""
    rng = random.Random(7)
    for event, _ in zip(generate(rng, NOW - 3600, 50, None), range(3000), strict=False):
        assert fast(event), event
        assert reference(event)


# --- the existing catalogues give the same result either way -----------------------------


@pytest.mark.parametrize("case", catalogue(NOW), ids=lambda c: c.name)
def test_hostile_catalogue_agrees(case: Any) -> None:
    assert_agree(case.raw)


@pytest.mark.parametrize(
    "raw", [g[1] for g in GOOD] + [b[1] for b in BAD], ids=[g[0] for g in GOOD + BAD]
)
def test_event_tables_agree(raw: bytes) -> None:
    assert_agree(raw)


# --- near-valid events: one field at a time, at the edges that differ between libraries --

BASE: dict[str, Any] = {
    "event_id": "evt-1",
    "occurred_at": "2024-05-01T11:00:00Z",
    "customer_id": "cust-1",
    "anonymous_id": "dev-1",
    "channel": "web",
    "event_type": "page_view",
    "touchpoint": "home",
    "source": "web-sdk",
    "properties": {"order_value": 12.5, "currency": "EUR"},
    "schema_version": 1,
}
CHARS = ["a", "é", "😀", "\u0301", "\n", "\x00", "日", " ", "Z"]
LENGTHS = [0, 1, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025]

edge_text = st.text(max_size=12) | st.builds(
    lambda c, n, tail: c * n + tail,
    st.sampled_from(CHARS),
    st.sampled_from(LENGTHS),
    st.sampled_from(["", "\n", "a", "😀"]),
)
NUMBERS: list[int | float] = [0, 1, -1, 1.0, -0.0, 0.0, 1.0000000001, 0.9999999999, 2, -1.5]
NUMBERS += [1e300, 5e-324, 2**63 - 1, 2**64 - 1, -(2**63), 1.8446744073709552e19]
numbers = st.sampled_from(NUMBERS)
scalars = st.none() | st.booleans() | numbers | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars | edge_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(edge_text, inner, max_size=3),
    max_leaves=6,
)
stamps = st.sampled_from(
    [
        "2024-05-01T11:00:00Z",
        "2024-05-01t11:00:00z",
        "2024-05-01T11:00:00.1+02:00",
        "2024-05-01T11:00:00.123456789-23:59",
        "2024-05-01T11:00:00.1234567890Z",
        "2024-05-01T11:00:00Z\n",
        "2024-05-01T11:00:00Z ",
        "2024-05-01T11:00:00",
        "2024-05-01 11:00:00Z",
        "2024-13-01T11:00:00Z",
        "2024-02-30T11:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T11:00:00+24:00",
        "２０２４-05-01T11:00:00Z",
        "x2024-05-01T11:00:00Z",
        "",
    ]
) | st.from_regex(
    r"[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{0,10})?"
    r"([Zz]|[+-][0-2][0-9]:[0-6][0-9])?\n?",
    fullmatch=True,
)
event_types = st.from_regex(r"[a-zA-Z0-9_é\-]{0,66}\n?", fullmatch=True) | st.sampled_from(
    ["a" * 64, "a" * 65, "page_view\n", "page_view\x00", "9lives", "_x", "ǆ", "ｐａｇｅ"]
)
edge_keys = edge_text | st.sampled_from(["", "k" * 128, "k" * 129, "😀" * 128, "😀" * 129])
valid_scalars = st.none() | st.booleans() | numbers | st.text(max_size=8)
valid_bags = st.dictionaries(st.text(min_size=1, max_size=8), valid_scalars, max_size=3)
property_bags = (
    st.builds(lambda bag, key, value: {**bag, key: value}, valid_bags, edge_keys, valid_scalars)
    | st.builds(lambda bag, key, value: {**bag, key: value}, valid_bags, edge_keys, json_values)
    | st.builds(
        lambda bag, key, text: {**bag, key: text},
        valid_bags,
        st.text(min_size=1, max_size=8),
        edge_text,
    )
    | st.integers(62, 66).map(lambda n: {f"k{i}": i for i in range(n)})
)

# What each field may be set to: its own edge values, anything JSON, or a wrong type.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": edge_text | json_values,
    "customer_id": edge_text | json_values,
    "anonymous_id": edge_text | json_values,
    "occurred_at": stamps | json_values,
    "channel": st.sampled_from([*DEFAULT_CHANNELS, "fax", "Web"]) | json_values,
    "event_type": event_types | json_values,
    "touchpoint": edge_text | json_values,
    "source": edge_text | json_values,
    "properties": property_bags | json_values,
    "schema_version": numbers | st.sampled_from([True, False, "1", None, [1], {"v": 1}]),
}
EXTRA_NAMES = st.sampled_from(["", "x", "__proto__", "Event_id", "event_id ", "$ref", "😀"])
OPTIONAL = ("touchpoint", "source", "properties")


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event (either id or both, some optional fields), then one or two changes."""
    doc = copy.deepcopy(BASE)
    ids = draw(
        st.sampled_from([("customer_id",), ("anonymous_id",), ("customer_id", "anonymous_id")])
    )
    for name in ("customer_id", "anonymous_id", *OPTIONAL):
        if name not in ids and (name not in OPTIONAL or draw(st.booleans())):
            del doc[name]
    for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
        action = draw(st.sampled_from(["set", "set", "set", "set", "drop", "add"]))
        if action == "drop" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif action == "add":
            doc[draw(EXTRA_NAMES)] = draw(json_values)
        else:
            name = draw(st.sampled_from(sorted(FIELD_VALUES)))
            doc[name] = draw(FIELD_VALUES[name])
    return doc


def _dumps(doc: object) -> bytes | None:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # an int past 64 bits: orjson will not write it
        return None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid())
def test_near_valid_events_agree(doc: dict[str, Any]) -> None:
    raw = _dumps(doc)
    if raw is not None:
        assert_agree(raw)
    assert FAST.validate_dict(doc, now=NOW) == SLOW.validate_dict(doc, now=NOW)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)) | EXTRA_NAMES, json_values))
def test_arbitrary_objects_agree(doc: dict[str, Any]) -> None:
    raw = _dumps(doc)
    if raw is not None:
        assert_agree(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_agrees(value: Any) -> None:
    raw = _dumps(value)
    if raw is not None:
        assert_agree(raw)


# Literal JSON numbers orjson reads but cannot write: 2**64 becomes a float, 1e-400 is 0.0.
@pytest.mark.parametrize(
    "literal",
    [b"18446744073709551616", b"-9223372036854775809", b"1e-400", b"1.0", b"1e0", b"10e-1", b"-0"],
)
@pytest.mark.parametrize("field", ["schema_version", "properties"])
def test_number_literals_agree(literal: bytes, field: str) -> None:
    text = literal if field == "schema_version" else b'{"n":' + literal + b"}"
    raw = orjson.dumps({**BASE, field: "@@"}).replace(b'"@@"', text)
    assert_agree(raw)


# --- Python-only values: the fast check may defer, the result must not change -------------


class One(IntEnum):
    ONE = 1


class Text(str):
    pass


PYTHON_ONLY: list[tuple[str, Any]] = [
    ("schema_version", Decimal(1)),
    ("schema_version", Fraction(1)),
    ("schema_version", complex(1, 0)),
    ("schema_version", One.ONE),
    ("schema_version", float("nan")),
    ("customer_id", Text("c-1")),
    ("event_id", ("e",)),
    ("properties", {"d": Decimal("1.5"), "f": Fraction(1, 3)}),
    ("properties", {"c": complex(1, 2)}),
    ("properties", {"t": ("x",)}),
    ("properties", {"s": {1, 2}}),
    ("properties", {1: "int key"}),
    ("properties", {"big": 2**70, "neg": -(2**70)}),
    ("properties", {"nan": float("nan"), "inf": float("inf")}),
    ("properties", (("a", 1),)),
]


@pytest.mark.parametrize(("field", "value"), PYTHON_ONLY, ids=[repr(p) for p in PYTHON_ONLY])
def test_python_only_values_give_the_same_result(field: str, value: Any) -> None:
    doc = {**BASE, field: value}
    if fast(doc):
        assert reference(doc), doc  # the fast check never accepts what jsonschema refuses
    assert FAST.validate_dict(doc, now=NOW) == SLOW.validate_dict(doc, now=NOW)


# --- the guard: keywords the compiled check is not proven on turn it off ----------------


def _with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    schema = load_schema()
    change(schema)
    return schema


UNPROVEN: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("new keyword", lambda s: s.update(dependentRequired={"customer_id": ["source"]})),
    ("numeric bound", lambda s: s["properties"].update(rating={"type": "number", "minimum": 1})),
    ("format", lambda s: s["properties"]["occurred_at"].update(format="date-time")),
    ("enum", lambda s: s["properties"]["channel"].update(enum=["web"])),
    ("array type", lambda s: s["properties"].update(tags={"type": "array"})),
    ("integer type", lambda s: s["properties"].update(n={"type": "integer"})),
    ("$ in a pattern", lambda s: s["properties"]["event_type"].update(pattern="^(a$|b)$")),
    ("$ref sibling", lambda s: s["properties"]["event_id"].update(maxLength=8)),
    ("remote $ref", lambda s: s["properties"]["event_id"].update({"$ref": "other.json#/id"})),
    ("boolean const", lambda s: s["properties"].update(flag={"const": True})),
    ("null const", lambda s: s["properties"].update(flag={"const": None})),
    ("dangling $ref", lambda s: s["properties"].update(flag={"$ref": "#/$defs/missing"})),
]


@pytest.mark.parametrize(("name", "change"), UNPROVEN, ids=[u[0] for u in UNPROVEN])
def test_unproven_keywords_leave_jsonschema_alone(
    name: str, change: Callable[[dict[str, Any]], None]
) -> None:
    assert _compile_fast_check(_with(change)) is None


def test_fast_check_follows_the_schema_it_is_given() -> None:
    """Compiled from the schema, not a copy of it: a tighter limit is applied at once."""

    def tighten(schema: dict[str, Any]) -> None:
        schema["$defs"]["id"]["maxLength"] = 8

    check = _compile_fast_check(_with(tighten))
    assert check is not None
    assert check({**BASE, "customer_id": "c" * 8})
    assert not check({**BASE, "customer_id": "c" * 9})
