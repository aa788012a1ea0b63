"""Events built by the SDK pass the worker's validator, and caller mistakes raise at once."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.emit import IDENTIFY, EventBuilder, InvalidEvent, format_time
from pipeline.events import MAX_EVENT_BYTES, Event, Validator
from pipeline.identity import routing_key

NOW = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC).timestamp()
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def builder(**kwargs: Any) -> EventBuilder:
    return EventBuilder(clock=lambda: NOW, **kwargs)


def test_generated_fields() -> None:
    """A uuid4 event id, the clock's time in UTC with milliseconds, schema version 1."""
    out = builder().track("page_view", channel="web", customer_id="c1")
    event = out.event
    assert uuid.UUID(event["event_id"]).version == 4
    assert event["occurred_at"] == "2026-05-01T12:00:00.123Z"
    assert STAMP.match(event["occurred_at"])
    assert event["schema_version"] == 1
    assert orjson.loads(out.payload) == event
    assert set(event) == {
        "event_id",
        "occurred_at",
        "channel",
        "event_type",
        "schema_version",
        "customer_id",
    }


def test_event_ids_differ() -> None:
    b = builder()
    ids = {b.track("page_view", channel="web", customer_id="c").event_id for _ in range(100)}
    assert len(ids) == 100


def test_given_fields_kept() -> None:
    out = builder(source="pos-eu").track(
        "order_completed",
        channel="store",
        customer_id="c1",
        anonymous_id="a1",
        properties={"order_value": 59.9, "currency": "EUR", "paid": True, "coupon": None},
        touchpoint="pos",
        occurred_at=datetime(2026, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        event_id="order-77",
    )
    assert out.event == {
        "event_id": "order-77",
        "occurred_at": "2026-05-01T12:00:00.000Z",
        "channel": "store",
        "event_type": "order_completed",
        "schema_version": 1,
        "customer_id": "c1",
        "anonymous_id": "a1",
        "touchpoint": "pos",
        "properties": {"order_value": 59.9, "currency": "EUR", "paid": True, "coupon": None},
        "source": "pos-eu",
    }


@pytest.mark.parametrize(
    ("customer_id", "anonymous_id", "key"),
    [
        ("c1", None, b"c1"),
        (None, "a1", b"a1"),
        ("c1", "a1", b"c1"),
        ("null", "a1", b"a1"),  # a placeholder customer id is skipped, as the worker skips it
    ],
)
def test_key_is_the_workers_key(
    customer_id: str | None, anonymous_id: str | None, key: bytes
) -> None:
    out = builder().track(
        "page_view", channel="web", customer_id=customer_id, anonymous_id=anonymous_id
    )
    assert out.key == key
    event = Validator().decode(out.payload, now=NOW)
    assert isinstance(event, Event)
    assert event.key.encode() == key


def test_identify_carries_both_ids() -> None:
    out = builder().identify("c1", "a1", channel="app", touchpoint="login")
    assert out.event["event_type"] == IDENTIFY == "identify"
    assert (out.event["customer_id"], out.event["anonymous_id"]) == ("c1", "a1")
    assert out.key == b"c1"


@pytest.mark.parametrize(
    ("customer_id", "anonymous_id"), [("undefined", "a1"), ("c1", "0000"), ("c1", "")]
)
def test_identify_refuses_placeholder_ids(customer_id: str, anonymous_id: str) -> None:
    """A placeholder never links, so asking identify for it is a mistake."""
    with pytest.raises(InvalidEvent, match="placeholder") as info:
        builder().identify(customer_id, anonymous_id, channel="web")
    assert info.value.code == "identity"


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"event_type": "Page View"}, "schema", "event_type"),
        ({"channel": "fax"}, "channel", "'fax' is not a configured channel"),
        ({"customer_id": None}, "schema", "customer_id or anonymous_id"),
        ({"customer_id": "null", "anonymous_id": "undefined"}, "identity", "placeholder"),
        ({"customer_id": 42}, "schema", "customer_id: expected string"),
        ({"properties": {"cart": {"sku": 1}}}, "schema", "properties.cart"),
        ({"properties": {"items": [1, 2]}}, "schema", "properties.items"),
        ({"touchpoint": "x" * 129}, "schema", "touchpoint"),
        ({"event_id": ""}, "schema", "event_id"),
        ({"occurred_at": "yesterday"}, "timestamp", "RFC 3339"),
        ({"occurred_at": "2026-05-03T12:00:00Z"}, "timestamp", "future"),
        ({"occurred_at": datetime(2026, 5, 1, 12)}, "timestamp", "no time zone"),
        ({"properties": {f"p{i}": "y" * 1024 for i in range(64)}}, "too_large", "bytes"),
    ],
)
def test_caller_mistakes_raise_invalid_event(
    kwargs: dict[str, Any], code: str, message: str
) -> None:
    """Every one of these would be dead-lettered by the worker; the SDK says so at the call."""
    call: dict[str, Any] = {
        "event_type": "page_view",
        "channel": "web",
        "customer_id": "c1",
        **kwargs,
    }
    with pytest.raises(InvalidEvent, match=re.escape(message)) as info:
        builder().track(**call)
    assert info.value.code == code
    assert isinstance(info.value, ValueError)


def test_too_large_matches_worker_limit() -> None:
    """Just under the worker's byte limit passes, and the worker agrees."""
    props = {f"p{i}": "y" * 1000 for i in range(62)}
    out = builder().track("page_view", channel="web", customer_id="c1", properties=props)
    assert len(out.payload) <= MAX_EVENT_BYTES
    assert isinstance(Validator().decode(out.payload, now=NOW), Event)


def test_channels_are_configurable() -> None:
    b = builder(channels=("kiosk", "web"))
    assert b.track("page_view", channel="kiosk", customer_id="c1").event["channel"] == "kiosk"
    with pytest.raises(InvalidEvent, match=r"configured channel \(kiosk, web\)"):
        b.track("page_view", channel="app", customer_id="c1")


def test_format_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=timezone(timedelta(hours=-5)))
    assert format_time(moment) == "2026-01-02T08:04:05.678Z"
    with pytest.raises(InvalidEvent):
        format_time(datetime(2026, 1, 2))


ids = st.text(min_size=1, max_size=128)
scalars = st.one_of(
    st.text(max_size=50),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)


@settings(max_examples=150, deadline=None)
@given(
    customer_id=st.none() | ids,
    anonymous_id=st.none() | ids,
    properties=st.dictionaries(st.text(min_size=1, max_size=20), scalars, max_size=8),
    touchpoint=st.none() | st.text(max_size=128),
)
def test_built_events_pass_the_worker(
    customer_id: str | None,
    anonymous_id: str | None,
    properties: dict[str, Any],
    touchpoint: str | None,
) -> None:
    """Whatever the inputs, the SDK either raises InvalidEvent or builds what the worker accepts."""
    try:
        out = builder().track(
            "page_view",
            channel="web",
            customer_id=customer_id,
            anonymous_id=anonymous_id,
            properties=properties,
            touchpoint=touchpoint,
        )
    except InvalidEvent as exc:
        assert routing_key(customer_id, anonymous_id) is None, exc
        return
    event = Validator().decode(out.payload, now=NOW)
    assert isinstance(event, Event)
    assert event.key.encode() == out.key
    assert event.event_id == out.event_id
