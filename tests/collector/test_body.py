"""Request bodies: what is a batch, what is the sender's error, what is one event's rejection."""

from __future__ import annotations

import gzip

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.collector.body import BodyError, decompress, split_events

EVENT = {"event_id": "e1", "channel": "web"}


def test_one_object_is_one_event() -> None:
    assert split_events(orjson.dumps(EVENT), "application/json", 10) == [EVENT]


def test_array_keeps_order_and_non_objects() -> None:
    """Non-objects inside an array are events too: each gets its own rejection later."""
    body = orjson.dumps([EVENT, 3, "x", {"event_id": "e2"}])
    assert split_events(body, "application/json; charset=utf-8", 10) == [
        EVENT,
        3,
        "x",
        {"event_id": "e2"},
    ]


@pytest.mark.parametrize("body", [b"null", b'"text"', b"42", b"[[1], null]"])
def test_json_that_is_not_an_object_is_still_events(body: bytes) -> None:
    """Each value becomes an event the validator rejects as not_object, answered per event."""
    items = split_events(body, "application/json", 10)
    assert items and all(not isinstance(i, dict) for i in items)


def test_json_lines_are_raw_lines_and_blank_lines_skipped() -> None:
    body = b'{"a":1}\n\nnot json\r\n{"b":2}\n'
    assert split_events(body, "application/x-ndjson", 10) == [b'{"a":1}', b"not json", b'{"b":2}']


@pytest.mark.parametrize(
    "content_type", ["text/plain", "", "application/json", "application/x-www-form-urlencoded"]
)
def test_lines_are_sniffed_without_a_lines_type(content_type: str) -> None:
    """sendBeacon posts text/plain; several objects on lines still split per event."""
    body = b'{"a":1}\n{"b":2}'
    assert split_events(body, content_type, 10) == [b'{"a":1}', b'{"b":2}']


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "application/json", 400),
        (b"   \n ", "application/x-ndjson", 400),
        (b"[]", "application/json", 400),
        (b"[1, 2", "application/json", 400),
        (b"{not json", "application/json", 400),
        (b"[" * 2000 + b"]" * 2000, "application/json", 400),  # deeper than any parser allows
        ("\ufeff[{}]".encode(), "application/json", 400),  # a byte-order mark is not JSON
        ("[{}]".encode("utf-16"), "application/json", 400),
        (b"<xml/>", "application/xml", 415),
        (b"a=1", "multipart/form-data; boundary=x", 415),
    ],
)
def test_bodies_that_are_not_a_batch(body: bytes, content_type: str, status: int) -> None:
    with pytest.raises(BodyError) as caught:
        split_events(body, content_type, 10)
    assert caught.value.status == status
    assert caught.value.body()["detail"]


def test_too_many_events_is_413_with_the_limit() -> None:
    with pytest.raises(BodyError) as caught:
        split_events(orjson.dumps([EVENT] * 11), "application/json", 10)
    assert caught.value.status == 413
    assert caught.value.body()["limit"] == 10
    assert split_events(orjson.dumps([EVENT] * 10), "application/json", 10) == [EVENT] * 10


def test_gzip_round_trip_and_identity() -> None:
    raw = orjson.dumps([EVENT] * 3)
    assert decompress(gzip.compress(raw), "gzip", 1000) == raw
    assert decompress(raw, "", 1000) == raw
    assert decompress(raw, "identity", 1000) == raw


def test_gzip_bomb_stops_at_the_limit() -> None:
    """A few KiB that inflate to 50 MB are refused without inflating them whole."""
    bomb = gzip.compress(b" " * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(BodyError) as caught:
        decompress(bomb, "gzip", 1_000_000)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    ("body", "encoding", "status"),
    [
        (b"not gzip at all", "gzip", 400),
        (gzip.compress(b'{"a":1}')[:-6], "gzip", 400),
        (b"{}", "br", 415),
    ],
)
def test_bad_encodings(body: bytes, encoding: str, status: int) -> None:
    with pytest.raises(BodyError) as caught:
        decompress(body, encoding, 1000)
    assert caught.value.status == status


@given(st.binary(max_size=300), st.sampled_from(["application/json", "text/plain", ""]))
def test_any_bytes_give_events_or_a_body_error(body: bytes, content_type: str) -> None:
    """Nothing a client sends makes the splitter raise anything but BodyError."""
    try:
        items = split_events(body, content_type, 1000)
    except BodyError as exc:
        assert exc.status in (400, 413)
    else:
        assert 1 <= len(items) <= 1000
