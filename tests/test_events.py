"""Unit tests for pipeline.events: the contract every other stage relies on."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.events import (
    DEFAULT_CHANNELS,
    MAX_EVENT_BYTES,
    REJECTION_CODES,
    Event,
    Rejection,
    Validator,
    load_schema,
)

NOW = datetime.fromisoformat("2024-05-01T12:00:00+00:00").timestamp()
REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "event_id": "evt-1",
    "occurred_at": "2024-05-01T11:59:00+02:00",
    "customer_id": "cust-1",
    "channel": "web",
    "event_type": "page_view",
    "schema_version": 1,
}

DROP = object()  # marker: remove this key from BASE


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


def make(**changes: Any) -> bytes:
    event = dict(BASE)
    for key, value in changes.items():
        if value is DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return orjson.dumps(event)


GOOD: list[tuple[str, bytes]] = [
    ("minimal", make()),
    ("anonymous only", make(customer_id=DROP, anonymous_id="anon-1")),
    ("both ids", make(anonymous_id="anon-1")),
    ("utc z", make(occurred_at="2024-05-01T10:00:00Z")),
    ("lower-case t and z", make(occurred_at="2024-05-01t10:00:00z")),
    ("nanoseconds", make(occurred_at="2024-05-01T10:00:00.123456789-05:30")),
    ("within 1 day ahead", make(occurred_at="2024-05-02T11:00:00Z")),
    ("year 2000", make(occurred_at="2000-01-01T00:00:00Z")),
    ("touchpoint", make(touchpoint="checkout")),
    ("source", make(source="pos-gateway")),
    (
        "flat properties",
        make(properties={"order_value": 12.5, "currency": "EUR", "csat": 5, "ok": True, "x": None}),
    ),
    ("64 properties", make(properties={f"k{i}": i for i in range(64)})),
    ("every default channel", make(channel="call_center")),
    ("schema_version 1.0", make(schema_version=1.0)),
    ("unicode ids", make(customer_id="klant-ü-日本", event_id="é" * 128)),
    ("whitespace around json", b"  \n" + make() + b"\n"),
]


@pytest.mark.parametrize(("name", "raw"), GOOD, ids=[g[0] for g in GOOD])
def test_good_events_decode(validator: Validator, name: str, raw: bytes) -> None:
    result = validator.decode(raw, now=NOW)
    assert isinstance(result, Event), result
    assert result.occurred_at.utcoffset() is not None
    assert result.ts == result.occurred_at.timestamp()
    # to_dict round-trips through the same validator
    again = validator.decode(orjson.dumps(result.to_dict()), now=NOW)
    assert isinstance(again, Event), again
    assert again.ts == pytest.approx(result.ts, abs=1e-6)
    assert again.key == result.key


# (name, raw, expected code, text the reason must contain)
BAD: list[tuple[str, bytes, str, str]] = [
    ("not json", b"{not json", "not_json", "not valid JSON"),
    ("empty payload", b"", "not_json", "not valid JSON"),
    ("truncated", make()[:-1], "not_json", "not valid JSON"),
    ("NaN literal", b'{"x": NaN}', "not_json", "not valid JSON"),
    ("utf-8 bom", b"\xef\xbb\xbf" + make(), "not_json", "not valid JSON"),
    ("invalid utf-8", b'{"event_id": "\xff\xfe"}', "not_utf8", "UTF-8"),
    ("lone surrogate bytes", b'{"a": "\xed\xa0\x80"}', "not_utf8", "UTF-8"),
    ("number payload", b"123", "not_object", "object"),
    ("json array", b"[" + make() + b"]", "not_object", "array"),
    ("json string", b'"hello"', "not_object", "string"),
    ("json null", b"null", "not_object", "null"),
    ("oversize", b" " * (MAX_EVENT_BYTES + 1), "too_large", f"{MAX_EVENT_BYTES}-byte"),
    ("missing event_id", make(event_id=DROP), "schema", "event_id"),
    ("empty event_id", make(event_id=""), "schema", "event_id"),
    ("long event_id", make(event_id="x" * 129), "schema", "event_id"),
    ("event_id number", make(event_id=42), "schema", "event_id"),
    ("both ids missing", make(customer_id=DROP), "schema", "customer_id or anonymous_id"),
    ("customer_id null", make(customer_id=None), "schema", "customer_id"),
    ("anonymous_id list", make(anonymous_id=["a"]), "schema", "anonymous_id"),
    ("missing channel", make(channel=DROP), "schema", "channel"),
    ("channel number", make(channel=7), "schema", "channel"),
    ("unknown channel", make(channel="fax"), "channel", "channel: 'fax'"),
    ("channel wrong case", make(channel="Web"), "channel", "channel"),
    ("missing event_type", make(event_type=DROP), "schema", "event_type"),
    ("event_type bad chars", make(event_type="Bad-Type"), "schema", "event_type"),
    ("event_type too long", make(event_type="a" * 65), "schema", "event_type"),
    ("event_type trailing newline", make(event_type="click\n"), "schema", "event_type"),
    ("event_type NUL", make(event_type="click\x00"), "schema", "event_type"),
    ("event_type tab", make(event_type="cl\tick"), "schema", "event_type"),
    ("event_type number", make(event_type=1), "schema", "event_type"),
    ("schema_version 2", make(schema_version=2), "schema", "schema_version"),
    ("schema_version string", make(schema_version="1"), "schema", "schema_version"),
    ("schema_version true", make(schema_version=True), "schema", "schema_version"),
    ("missing schema_version", make(schema_version=DROP), "schema", "schema_version"),
    ("missing occurred_at", make(occurred_at=DROP), "schema", "occurred_at"),
    ("no offset", make(occurred_at="2024-05-01T12:00:00"), "timestamp", "occurred_at"),
    ("date only", make(occurred_at="2024-05-01"), "timestamp", "occurred_at"),
    ("epoch number", make(occurred_at=1714557600), "timestamp", "occurred_at"),
    ("space separator", make(occurred_at="2024-05-01 12:00:00Z"), "timestamp", "occurred_at"),
    ("offset 00:60", make(occurred_at="2024-05-01T12:00:00+00:60"), "timestamp", "occurred_at"),
    ("feb 30", make(occurred_at="2024-02-30T12:00:00Z"), "timestamp", "occurred_at"),
    ("year 1999", make(occurred_at="1999-12-31T23:59:59Z"), "timestamp", "before 2000"),
    ("year 0000", make(occurred_at="0000-01-01T00:00:00Z"), "timestamp", "occurred_at"),
    ("far future", make(occurred_at="2030-01-01T00:00:00Z"), "timestamp", "future"),
    ("just over 1 day", make(occurred_at="2024-05-02T12:00:01Z"), "timestamp", "future"),
    ("trailing newline ts", make(occurred_at="2024-05-01T12:00:00Z\n"), "timestamp", "occurred_at"),
    ("nested properties", make(properties={"a": {"b": 1}}), "schema", "properties.a"),
    ("array property", make(properties={"tags": ["x"]}), "schema", "properties.tags"),
    ("properties not object", make(properties=[1, 2]), "schema", "properties"),
    ("long property string", make(properties={"note": "x" * 1025}), "schema", "properties.note"),
    ("65 properties", make(properties={f"k{i}": i for i in range(65)}), "schema", "properties"),
    ("empty property key", make(properties={"": 1}), "schema", "properties"),
    ("long touchpoint", make(touchpoint="t" * 129), "schema", "touchpoint"),
    ("touchpoint number", make(touchpoint=3), "schema", "touchpoint"),
    ("long source", make(source="s" * 129), "schema", "source"),
    ("unknown field", make(customer_email="a@b.c"), "schema", "customer_email"),
]


@pytest.mark.parametrize(("name", "raw", "code", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_events_are_rejected(
    validator: Validator, name: str, raw: bytes, code: str, needle: str
) -> None:
    result = validator.decode(raw, now=NOW)
    assert isinstance(result, Rejection), result
    assert result.code == code, result.reason
    assert needle in result.reason
    assert result.raw == raw
    assert len(result.reason) <= 400


def test_reason_examples(validator: Validator) -> None:
    reject = validator.decode(make(event_type="Bad-Type"), now=NOW)
    assert isinstance(reject, Rejection)
    assert reject.reason == "event_type: 'Bad-Type' does not match ^[a-z][a-z0-9_]{0,63}$"
    reject = validator.decode(b"x" * 70000, now=NOW)
    assert isinstance(reject, Rejection)
    assert reject.reason == "payload is 70000 bytes, over the 65536-byte limit"
    reject = validator.decode(make(channel="fax"), now=NOW)
    assert isinstance(reject, Rejection)
    assert reject.reason.startswith("channel: 'fax' is not a configured channel (web, app, ")


def test_configured_channels(validator: Validator) -> None:
    custom = Validator(channels=("web", "kiosk"))
    assert isinstance(custom.decode(make(channel="kiosk"), now=NOW), Event)
    rejected = custom.decode(make(channel="store"), now=NOW)
    assert isinstance(rejected, Rejection)
    assert rejected.code == "channel"
    assert "(web, kiosk)" in rejected.reason
    assert validator.channels == frozenset(DEFAULT_CHANNELS)


def test_event_fields_and_key(validator: Validator) -> None:
    event = validator.decode(
        make(anonymous_id="anon-1", touchpoint="pos", properties={"order_value": 10}),
        now=NOW,
    )
    assert isinstance(event, Event)
    assert event.key == "cust-1"
    assert event.ts == datetime.fromisoformat("2024-05-01T09:59:00+00:00").timestamp()
    assert event.occurred_at.tzinfo is not None
    assert event.properties == {"order_value": 10}
    assert event.source is None
    anon = validator.decode(make(customer_id=DROP, anonymous_id="anon-1"), now=NOW)
    assert isinstance(anon, Event)
    assert anon.key == "anon-1"
    assert "customer_id" not in anon.to_dict()


def test_now_defaults_to_wall_clock(validator: Validator) -> None:
    assert isinstance(validator.decode(make(occurred_at="2099-01-01T00:00:00Z")), Rejection)
    assert isinstance(validator.decode(make(occurred_at="2020-01-01T00:00:00Z")), Event)


def test_validate_dict(validator: Validator) -> None:
    assert isinstance(validator.validate_dict(dict(BASE), now=NOW), Event)
    int_key: dict[object, object] = {5: "int key"}
    int_key.update(BASE)
    bad_inputs: tuple[object, ...] = (
        [BASE],
        None,
        {**BASE, "properties": {1: "int key"}},
        {**BASE, "properties": {"x": float("nan")}},
        {**BASE, "properties": {"x": float("inf")}},
        {**BASE, "properties": {"x": 2**70}},
        int_key,
        {**BASE, "properties": {"x": {1, 2}}},
    )
    for bad in bad_inputs:
        result = validator.validate_dict(bad, now=NOW)
        assert isinstance(result, Rejection), bad
        assert result.code in REJECTION_CODES
        assert "internal" not in result.reason


def test_accepts_non_bytes_transport_values(validator: Validator) -> None:
    assert isinstance(validator.decode(bytearray(make()), now=NOW), Event)  # type: ignore[arg-type]
    assert isinstance(validator.decode(memoryview(make()), now=NOW), Event)  # type: ignore[arg-type]
    tombstone = validator.decode(None, now=NOW)  # type: ignore[arg-type]
    assert isinstance(tombstone, Rejection)
    assert tombstone.code == "not_json"


SQLISH = "'; DROP TABLE events; --"


def test_sql_looking_strings_are_inert_data(validator: Validator) -> None:
    raw = make(
        event_id=SQLISH,
        customer_id='1" OR "1"="1',
        touchpoint=SQLISH,
        properties={"note": SQLISH, "q": "Robert'); DROP TABLE students;--"},
    )
    event = validator.decode(raw, now=NOW)
    assert isinstance(event, Event), event
    assert event.event_id == SQLISH
    assert event.touchpoint == SQLISH
    assert event.properties["note"] == SQLISH
    assert event.to_dict()["event_id"] == SQLISH


def test_packaged_schema_is_the_repo_schema() -> None:
    packaged = (REPO / "pipeline" / "data" / "event.v1.json").read_bytes()
    repo_copy = REPO / "schemas" / "event.v1.json"
    assert repo_copy.read_bytes() == packaged
    assert repo_copy.is_symlink()
    assert repo_copy.resolve() == (REPO / "pipeline" / "data" / "event.v1.json").resolve()
    schema = json.loads(packaged)
    Draft202012Validator.check_schema(schema)
    assert schema == load_schema()
    assert schema["properties"]["schema_version"] == {"const": 1}


# --- property tests: decode must never raise -------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from([*BASE, "anonymous_id", "touchpoint", "properties", "source", "x"])
field_values = (
    json_values
    | st.sampled_from(DEFAULT_CHANNELS)
    | st.from_regex(r"[a-z][a-z0-9_]{0,5}\n?", fullmatch=True)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.dictionaries(st.text(max_size=8), json_scalars, max_size=5)
)


def _check(result: Event | Rejection) -> None:
    assert isinstance(result, Event | Rejection)
    if isinstance(result, Rejection):
        assert result.code in REJECTION_CODES
        assert "internal" not in result.reason, result.reason
        assert result.reason
    else:
        orjson.dumps(result.to_dict())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_never_raises_on_bytes(raw: bytes) -> None:
    result = _shared().decode(raw, now=NOW)
    _check(result)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(result, Rejection)
        assert result.code == "not_utf8"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, field_values, max_size=10))
def test_decode_never_raises_on_jsonish_dicts(changes: dict[str, Any]) -> None:
    obj = {**BASE, **changes}
    _check(_shared().decode(orjson.dumps(obj), now=NOW))
    _check(_shared().validate_dict(obj, now=NOW))


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_decode_never_raises_on_any_json(value: Any) -> None:
    _check(_shared().decode(orjson.dumps(value), now=NOW))


_VALIDATOR: list[Validator] = []


def _shared() -> Validator:
    """Hypothesis forbids function-scoped fixtures in @given tests; share one instance."""
    if not _VALIDATOR:
        _VALIDATOR.append(Validator())
    return _VALIDATOR[0]
