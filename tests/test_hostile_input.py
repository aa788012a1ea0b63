"""Hostile and broken input: the catalogue an operator would throw at the validator.

Every payload either becomes a ``Rejection`` whose code is the precise reason
and whose text names the field, or an ``Event`` that carries the data inertly
(verbatim, to be stored as data and never interpreted). ``catalogue(now)`` is
shared with ``tests/integration/test_hostile_worker.py``, which sends the
same lines through a real worker. The property tests fuzz the validator and
the pure engine for a bounded time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import engine
from pipeline.events import (
    DEFAULT_CHANNELS,
    MAX_ENVELOPE_BYTES,
    MAX_ENVELOPE_EVENTS,
    MAX_EVENT_BYTES,
    REJECTION_CODES,
    Event,
    Rejection,
    Validator,
)
from pipeline.identity import Ref, resolve
from pipeline.journeys import Journey, default_journeys, parse_journeys
from pipeline.processor import stage_deltas
from pipeline.stages import DROPPED, Profile, next_deadline

NOW = datetime.fromisoformat("2024-05-01T12:00:00+00:00").timestamp()
MAX_REASON = 400  # reasons travel in Kafka records and ClickHouse rows: keep them small

SQL_DROP = "'; DROP TABLE journey.events; --"
SQL_QUOTE = '"; DROP TABLE journey.transitions; --'
RESP_DEL = "*3\r\n$3\r\nDEL\r\n$13\r\njt:{c:victim}\r\n"
RESP_FLUSH = "\n FLUSHALL\r\n"
RTL = "\u202eevil\u202c"


@dataclass(frozen=True)
class Case:
    """One catalogue line: rejected with ``code`` (naming ``needle``), or accepted when None."""

    name: str
    raw: bytes
    code: str | None
    needle: str = ""
    expect: dict[str, Any] = field(default_factory=dict)  # accepted: Event fields, verbatim


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def base(now: float, event_id: str) -> dict[str, Any]:
    """A valid event an hour before ``now``: each case changes one thing."""
    return {
        "event_id": event_id,
        "occurred_at": iso(now - 3600),
        "customer_id": f"cust-{event_id}",
        "channel": "web",
        "event_type": "page_view",
        "schema_version": 1,
    }


DROP = object()  # marker: remove this key


def catalogue(now: float) -> list[Case]:
    """Every hostile or broken payload, with the outcome an operator expects, at time ``now``.

    Event ids are unique across the catalogue (``h-…``), so the accepted cases
    are new events for a worker too.
    """
    cases: list[Case] = []

    def event(event_id: str, /, **changes: Any) -> dict[str, Any]:
        doc = base(now, event_id)
        for key, value in changes.items():
            if value is DROP:
                doc.pop(key, None)
            else:
                doc[key] = value
        return doc

    def bad(name: str, raw: bytes | dict[str, Any], code: str, needle: str) -> None:
        cases.append(Case(name, raw if isinstance(raw, bytes) else orjson.dumps(raw), code, needle))

    def ok(name: str, raw: bytes | dict[str, Any], **expect: Any) -> None:
        cases.append(
            Case(name, raw if isinstance(raw, bytes) else orjson.dumps(raw), None, "", expect)
        )

    def splice(doc: dict[str, Any], key: str, json_text: bytes) -> bytes:
        """``doc`` as JSON with ``key`` set to literal JSON text orjson cannot produce."""
        marker = f"@@{key}@@"
        return orjson.dumps({**doc, key: marker}).replace(f'"{marker}"'.encode(), json_text)

    # --- not JSON at all ---------------------------------------------------------------
    bad("not json", b"this is not json", "not_json", "not valid JSON")
    bad("truncated", orjson.dumps(event("h-trunc"))[:-5], "not_json", "not valid JSON")
    bad("trailing garbage", orjson.dumps(event("h-trail")) + b" x", "not_json", "not valid JSON")
    bad("two objects", orjson.dumps(event("h-two")) * 2, "not_json", "not valid JSON")
    bad("single quotes", b"{'event_id': 'h-sq'}", "not_json", "not valid JSON")
    bad("utf-8 bom", b"\xef\xbb\xbf" + orjson.dumps(event("h-bom")), "not_json", "not valid JSON")
    bad("raw NUL byte", orjson.dumps(event("h-nul"))[:-1] + b"\x00}", "not_json", "not valid JSON")
    bad(
        "raw control char in string",
        orjson.dumps(event("h-ctl")).replace(b"h-ctl", b"h-\x01ctl"),
        "not_json",
        "control character",
    )
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        doc = event(f"h-{literal.decode()}", properties={})
        bad(
            f"{literal.decode()} literal",
            splice(doc, "properties", b'{"x":' + literal + b"}"),
            "not_json",
            "not valid JSON",
        )
    bad(
        "number overflows a double",
        splice(event("h-1e400"), "properties", b'{"x":1e400}'),
        "not_json",
        "infinity",
    )
    bad(
        "schema_version 1e400",
        splice(event("h-sv1e400"), "schema_version", b"1e400"),
        "not_json",
        "infinity",
    )
    bad(
        "lone high surrogate escape",
        splice(event("h-sur1"), "customer_id", b'"\\ud800"'),
        "not_json",
        "surrogate",
    )
    bad(
        "lone low surrogate escape",
        splice(event("h-sur2"), "touchpoint", b'"a\\udc00b"'),
        "not_json",
        "surrogate",
    )
    bad(
        "reversed surrogate pair",
        splice(event("h-sur3"), "source", b'"\\ude00\\ud83d"'),
        "not_json",
        "surrogate",
    )
    bad("nested 1100 deep", b"[" * 1100 + b"]" * 1100, "not_json", "depth")
    bad(
        "properties 1100 deep",
        splice(event("h-deep2"), "properties", b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}"),
        "not_json",
        "depth",
    )

    # --- invalid UTF-8 -----------------------------------------------------------------
    good = orjson.dumps(event("h-utf"))
    bad("invalid byte 0xff", good.replace(b"h-utf", b"h-\xff"), "not_utf8", "UTF-8")
    bad("latin-1 text", good.replace(b"h-utf", b"caf\xe9"), "not_utf8", "UTF-8")
    bad("overlong slash", good.replace(b"h-utf", b"h\xc0\xaf"), "not_utf8", "UTF-8")
    bad("CESU surrogate bytes", good.replace(b"h-utf", b"h\xed\xa0\x80"), "not_utf8", "UTF-8")
    bad("truncated sequence", good.replace(b"h-utf", b"h\xe2\x82"), "not_utf8", "UTF-8")
    bad(
        "utf-16 document",
        orjson.dumps(event("h-u16")).decode().encode("utf-16"),
        "not_utf8",
        "UTF-8",
    )

    # --- not an object -----------------------------------------------------------------
    bad("array of an event", b"[" + orjson.dumps(event("h-arr")) + b"]", "not_object", "array")
    for raw, kind in (
        (b'"h-string"', "string"),
        (b"42", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
        (b"[]", "array"),
    ):
        bad(f"json {kind} {raw.decode()}", raw, "not_object", kind)

    # --- wrong types for every field ---------------------------------------------------
    wrong: dict[str, list[Any]] = {
        "event_id": [42, None, True, ["h"], {"id": "h"}, 1.5],
        "occurred_at": [1714557600, None, False, ["2024-05-01T12:00:00Z"], {"t": 1}],
        "customer_id": [42, None, True, ["c"], {"id": "c"}],
        "anonymous_id": [7, False, [], {}],
        "channel": [1, None, ["web"], {"web": True}],
        "event_type": [1, None, ["page_view"], True],
        "touchpoint": [3, True, None, ["checkout"], {"a": 1}],
        "properties": [[1, 2], "order_value=1", None, 5, True],
        "schema_version": ["1", None, True, [1], {"v": 1}],
        "source": [9, False, None, ["pos"]],
    }
    for name, values in wrong.items():
        for i, value in enumerate(values):
            code = "timestamp" if name == "occurred_at" else "schema"
            bad(
                f"{name} as {type(value).__name__}",
                event(f"h-w-{name}-{i}", **{name: value}),
                code,
                name,
            )

    # --- missing fields and ids --------------------------------------------------------
    for name in ("event_id", "occurred_at", "channel", "event_type", "schema_version"):
        bad(f"missing {name}", event(f"h-m-{name}", **{name: DROP}), "schema", name)
    bad("no id at all", event("h-noid", customer_id=DROP), "schema", "customer_id or anonymous_id")
    bad("empty object", b"{}", "schema", "event_id")
    bad("empty event_id", event("h-e1", event_id=""), "schema", "event_id")
    bad("empty customer_id", event("h-e2", customer_id=""), "schema", "customer_id")

    # --- placeholder ids: names nobody ---------------------------------------------------
    placeholders = [
        ("null", "undefined"),
        ("0", "-1"),
        ('"None"', "[object Object]"),
        ("N/A", "nil"),
        ("00000000-0000-0000-0000-000000000000", "   "),
        ("UNKNOWN", "anonymous"),
        ("NaN", "'null'"),
    ]
    for i, (cust, anon) in enumerate(placeholders):
        bad(
            f"placeholders {cust!r} + {anon!r}",
            event(f"h-p{i}", customer_id=cust, anonymous_id=anon),
            "identity",
            "customer_id",
        )
    bad(
        "placeholder customer only",
        event("h-p-c", customer_id="undefined"),
        "identity",
        "customer_id 'undefined'",
    )
    bad(
        "placeholder device only",
        event("h-p-a", customer_id=DROP, anonymous_id="null"),
        "identity",
        "anonymous_id 'null'",
    )

    # --- channels ------------------------------------------------------------------------
    for i, channel in enumerate(
        [
            "fax",
            "Web",
            "web ",
            "",
            "web\x00",
            "\u202eweb",
            "ｗｅｂ",
            "📱",
            "web'; DROP TABLE journey.events; --",
            "c" * 10_000,
        ]
    ):
        bad(f"channel {channel[:20]!r}", event(f"h-ch{i}", channel=channel), "channel", "channel")

    # --- schema version --------------------------------------------------------------------
    for i, version in enumerate([2, 0, -1, 1.5, 2**63, 1e300]):
        bad(
            f"schema_version {version}",
            event(f"h-sv{i}", schema_version=version),
            "schema",
            "schema_version",
        )

    # --- timestamps ----------------------------------------------------------------------
    stamps: list[tuple[str, str, str]] = [
        ("far future", "2999-01-01T00:00:00Z", "future"),
        ("year 9999", "9999-12-31T23:59:59-23:59", "future"),
        ("two days ahead", iso(now + 2 * 86_400), "future"),
        ("just over a day ahead", iso(now + 86_400 + 600), "future"),
        ("year 1999", "1999-12-31T23:59:59Z", "before 2000"),
        ("before 2000 by offset", "2000-01-01T00:59:59+01:00", "before 2000"),
        ("unix epoch", "1970-01-01T00:00:00Z", "before 2000"),
        ("year 0001", "0001-01-01T00:00:00+01:00", "occurred_at"),
        ("year 0000", "0000-01-01T00:00:00Z", "occurred_at"),
        ("five-digit year", "10000-01-01T00:00:00Z", "occurred_at"),
        ("signed year", "+002024-05-01T12:00:00Z", "occurred_at"),
        ("negative year", "-0001-05-01T12:00:00Z", "occurred_at"),
        ("no offset", "2024-05-01T12:00:00", "occurred_at"),
        ("date only", "2024-05-01", "occurred_at"),
        ("space separator", "2024-05-01 12:00:00Z", "occurred_at"),
        ("february 30", "2024-02-30T12:00:00Z", "occurred_at"),
        ("hour 24", "2024-05-01T24:00:00Z", "occurred_at"),
        ("leap second", "2016-12-31T23:59:60Z", "occurred_at"),
        ("offset +24:00", "2024-05-01T12:00:00+24:00", "occurred_at"),
        ("ten fraction digits", "2024-05-01T12:00:00.1234567890Z", "occurred_at"),
        ("epoch millis as text", "1714564800000", "occurred_at"),
        ("words", "yesterday", "occurred_at"),
        ("fullwidth digits", "２０２４-05-01T12:00:00Z", "occurred_at"),
        ("trailing newline", "2024-05-01T12:00:00Z\n", "occurred_at"),
        ("empty", "", "occurred_at"),
        ("very long", "2" * 5000, "occurred_at"),
    ]
    for i, (name, stamp, needle) in enumerate(stamps):
        bad(f"occurred_at {name}", event(f"h-t{i}", occurred_at=stamp), "timestamp", needle)

    # --- size limits ---------------------------------------------------------------------
    padded = orjson.dumps(event("h-size-exact"))
    ok("exactly 64 KiB", padded + b" " * (MAX_EVENT_BYTES - len(padded)), event_id="h-size-exact")
    padded = orjson.dumps(event("h-size-over"))
    bad("64 KiB + 1", padded + b" " * (MAX_EVENT_BYTES + 1 - len(padded)), "too_large", "65536")
    bad(
        "200 KiB property",
        event("h-size-big", properties={"blob": "x" * 200 * 1024}),
        "too_large",
        "65536",
    )
    bad(
        "a thousand properties",
        event("h-size-props", properties={f"p{i:04}": "v" * 60 for i in range(1000)}),
        "too_large",
        "65536",
    )

    # --- properties must be flat and bounded ---------------------------------------------
    bad(
        "nested object property",
        event("h-pr1", properties={"a": {"b": 1}}),
        "schema",
        "properties.a",
    )
    bad(
        "array property",
        event("h-pr2", properties={"tags": ["x", "y"]}),
        "schema",
        "properties.tags",
    )
    # Deeper than Python's repr() can go (orjson parses up to 1024 levels): still a reason.
    deep = b"[" * 1015 + b"1" + b"]" * 1015
    bad(
        "property nested 1015 deep",
        splice(event("h-pr3"), "properties", b'{"deep":' + deep + b"}"),
        "schema",
        "properties.deep: nested",
    )
    bad("event_id nested 1015 deep", splice(event("h-pr4"), "event_id", deep), "schema", "event_id")
    bad("unknown field nested 1015 deep", splice(event("h-pr5"), "extra", deep), "schema", "extra")
    bad(
        "schema_version nested 1015 deep",
        splice(event("h-pr5b"), "schema_version", b'{"v":' + deep + b"}"),
        "schema",
        "schema_version.v: nested",
    )
    bad(
        "65 properties",
        event("h-pr6", properties={f"k{i}": i for i in range(65)}),
        "schema",
        "properties",
    )
    bad(
        "property string 1025 chars",
        event("h-pr7", properties={"note": "n" * 1025}),
        "schema",
        "properties.note",
    )
    bad("property key 129 chars", event("h-pr8", properties={"k" * 129: 1}), "schema", "properties")
    bad("empty property key", event("h-pr9", properties={"": 1}), "schema", "properties")
    bad(
        "property key with a newline",
        event("h-pr10", properties={"a\nb": [1]}),
        "schema",
        "properties.'a\\nb'",
    )

    # --- long strings --------------------------------------------------------------------
    bad("event_id 129 chars", event("h-l1", event_id="e" * 129), "schema", "event_id")
    bad(
        "customer_id 10k chars",
        event("h-l2", customer_id="c" * 10_000),
        "schema",
        "customer_id: 10000 characters",
    )
    bad("anonymous_id 129 emoji", event("h-l3", anonymous_id="😀" * 129), "schema", "anonymous_id")
    bad("touchpoint 129 chars", event("h-l4", touchpoint="t" * 129), "schema", "touchpoint")
    bad("source 129 chars", event("h-l5", source="s" * 129), "schema", "source")
    bad("event_type 65 chars", event("h-l6", event_type="a" * 65), "schema", "event_type")
    bad(
        "combining marks over 128",
        event("h-l7", customer_id="e" + "\u0301" * 128),
        "schema",
        "customer_id",
    )

    # --- crafted strings in constrained fields -------------------------------------------
    bad(
        "event_type as SQL",
        event("h-c1", event_type="page_view; DROP TABLE events"),
        "schema",
        "event_type",
    )
    bad("event_type as Redis", event("h-c2", event_type="flushall\r\n"), "schema", "event_type")
    bad("event_type with NUL", event("h-c3", event_type="page_view\x00"), "schema", "event_type")
    bad("event_type non-ascii", event("h-c4", event_type="pagé_view"), "schema", "event_type")
    bad("unknown field", event("h-c5", customer_email="a@b.c"), "schema", "customer_email")
    bad("__proto__ field", event("h-c6", __proto__={"admin": True}), "schema", "__proto__")
    bad("$where field", event("h-c7", **{"$where": "sleep(1000)"}), "schema", "$where")

    # --- duplicate keys: the last one wins (as in JSON.parse and Python's json) ------------
    dup = orjson.dumps(event("h-dup-first"))
    ok(
        "duplicate key, last valid",
        dup[:-1] + b',"event_id":"h-dup-last","touchpoint":"a","touchpoint":"b"}',
        event_id="h-dup-last",
        touchpoint="b",
    )
    bad(
        "duplicate key, last invalid",
        orjson.dumps(event("h-dup-bad"))[:-1] + b',"channel":"fax"}',
        "channel",
        "channel",
    )

    # --- accepted, carried inertly -------------------------------------------------------
    ok(
        "SQL in every free-text field",
        event(
            "h-sql-" + SQL_DROP,
            customer_id=SQL_QUOTE,
            anonymous_id="1' OR '1'='1",
            touchpoint="x'); INSERT INTO journey.events VALUES (1); --",
            source="\\'; SELECT sleep(3); --",
            properties={"q": "Robert'); DROP TABLE students;--", "c": "{x:String}"},
        ),
        event_id="h-sql-" + SQL_DROP,
        customer_id=SQL_QUOTE,
        anonymous_id="1' OR '1'='1",
        touchpoint="x'); INSERT INTO journey.events VALUES (1); --",
        properties={"q": "Robert'); DROP TABLE students;--", "c": "{x:String}"},
    )
    ok(
        "Redis commands in ids",
        event(
            "h-resp" + RESP_FLUSH,
            customer_id=RESP_DEL,
            anonymous_id="\r\nFLUSHALL\r\n",
            touchpoint="EVAL \"redis.call('flushall')\" 0",
            properties={"cmd": "*1\r\n$8\r\nFLUSHALL\r\n"},
        ),
        event_id="h-resp" + RESP_FLUSH,
        customer_id=RESP_DEL,
        anonymous_id="\r\nFLUSHALL\r\n",
        properties={"cmd": "*1\r\n$8\r\nFLUSHALL\r\n"},
    )
    ok(
        "Redis key names as ids",
        event("jt:stage_customers:0", customer_id="victim}:p", anonymous_id="*"),
        event_id="jt:stage_customers:0",
        customer_id="victim}:p",
        anonymous_id="*",
    )
    ok(
        "glob and format characters",
        event("h-glob-%s%n{0}", customer_id="[a-z]*?%d"),
        customer_id="[a-z]*?%d",
    )
    ok(
        "NUL and control characters escaped",
        event(
            "h-ctrl\u0000",
            customer_id="nul\u0000id\u0007",
            touchpoint="\u001b[2J\u001b[31mRED",
            source="line1\nline2\r\n\ttab",
            properties={"nul": "\u0000", "bell": "\u0007"},
        ),
        event_id="h-ctrl\x00",
        customer_id="nul\x00id\x07",
        touchpoint="\x1b[2J\x1b[31mRED",
        source="line1\nline2\r\n\ttab",
        properties={"nul": "\x00", "bell": "\x07"},
    )
    ok(
        "bidi override and invisible characters",
        event("h-rtl", customer_id=RTL, anonymous_id="\u200b\ufeff", touchpoint="\u2028\u2029"),
        customer_id=RTL,
        anonymous_id="\u200b\ufeff",
        touchpoint="\u2028\u2029",
    )
    ok(
        "emoji, ZWJ and combining marks",
        event("h-emoji-🛒", customer_id="👩‍👩‍👧" + "e\u0301\u0301", properties={"😀": "🎉"}),
        event_id="h-emoji-🛒",
        customer_id="👩‍👩‍👧e\u0301\u0301",
        properties={"😀": "🎉"},
    )
    ok(
        "surrogate pair escape",
        splice(event("h-pair"), "customer_id", b'"\\ud83d\\ude00"'),
        customer_id="😀",
    )
    ok(
        "128 emoji id (512 bytes)",
        event("h-128emoji", customer_id="😀" * 128),
        customer_id="😀" * 128,
    )
    ok(
        "limits exactly",
        event(
            "e" * 125 + "-ok",
            customer_id="c" * 128,
            touchpoint="t" * 128,
            source="s" * 128,
            event_type="a" * 64,
            properties={"k" * 128: "v" * 1024, **{f"k{i}": i for i in range(63)}},
        ),
        event_id="e" * 125 + "-ok",
        customer_id="c" * 128,
        touchpoint="t" * 128,
    )
    ok(
        "numbers at the edges",
        splice(
            event("h-num"),
            "properties",
            b'{"u64":18446744073709551615,"i64":-9223372036854775808,"big":1e308,"tiny":5e-324,'
            b'"over":18446744073709551616,"negzero":-0.0,"under":1e-400}',
        ),
        properties={
            "u64": 2**64 - 1,
            "i64": -(2**63),
            "big": 1e308,
            "tiny": 5e-324,
            "over": 1.8446744073709552e19,
            "negzero": 0.0,
            "under": 0.0,
        },
    )
    ok(
        "placeholder customer, real device",
        event("h-ph", customer_id="null", anonymous_id="dev-9"),
        customer_id="null",
        anonymous_id="dev-9",
    )
    ok("year 2000 exactly", event("h-y2k", occurred_at="2000-01-01T00:00:00Z"))
    ok("23 hours ahead", event("h-ahead", occurred_at=iso(now + 23 * 3600)))
    ok(
        "lower-case t and z",
        event("h-tz", occurred_at=iso(now - 60).replace("+00:00", "z").replace("T", "t")),
    )
    ok("nine fraction digits", event("h-ns", occurred_at="2024-05-01T10:00:00.123456789+14:00"))

    # Envelopes (schemas/envelope.v1.json) that break the envelope contract are refused
    # whole; their events are not looked at. Valid envelopes are tests/test_envelopes.py's.
    inner = [event("h-env-inner")]
    bad("envelope version 2", {"envelope": 2, "events": inner}, "envelope", "version must be 1")
    bad("envelope version as text", {"envelope": "1", "events": inner}, "envelope", "version")
    bad("envelope events missing", {"envelope": 1}, "envelope", "events is required")
    bad(
        "envelope events an object", {"envelope": 1, "events": {"0": inner[0]}}, "envelope", "array"
    )
    bad("envelope events null", {"envelope": 1, "events": None}, "envelope", "got null")
    bad("envelope empty", {"envelope": 1, "events": []}, "envelope", "0 events")
    many = [event(f"h-env-{i}") for i in range(MAX_ENVELOPE_EVENTS + 1)]
    bad("envelope over the event limit", {"envelope": 1, "events": many}, "envelope", "1001 events")
    bad(
        "envelope with an extra field",
        {"envelope": 1, "events": inner, "customer_id": SQL_DROP},
        "envelope",
        "not an allowed field",
    )
    # Just over the envelope limit, yet under a producer's 1 MiB request limit: it can be sent.
    huge = {"envelope": 1, "events": [event("h-env-big", properties={"pad": "p" * 59_000})] * 17}
    bad("envelope over 1 MB", huge, "too_large", f"{MAX_ENVELOPE_BYTES}-byte limit")
    bad("envelope cut short", b'{"envelope": 1, "events": [{"event_id": "h-cut"', "not_json", "")
    return cases


CASES = catalogue(NOW)
REJECTED = [c for c in CASES if c.code is not None]
ACCEPTED = [c for c in CASES if c.code is None]


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


def test_catalogue_is_what_it_claims() -> None:
    """Unique names and event ids, every code used, and enough of both outcomes."""
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.code for c in REJECTED} == REJECTION_CODES
    assert len(REJECTED) > 150 and len(ACCEPTED) > 15
    ids = [orjson.loads(c.raw)["event_id"] for c in ACCEPTED]
    assert len(set(ids)) == len(ids)


def _assert_plain(reason: str) -> None:
    """Short and printable: one plain line, whatever the payload carried."""
    assert reason
    assert len(reason) <= MAX_REASON, reason
    assert reason.isprintable(), reason
    assert "internal" not in reason, reason


def verdict(validator: Validator, raw: bytes, now: float = NOW) -> Event | Rejection:
    """What the worker makes of one catalogue message: each holds one verdict."""
    [(index, result)] = validator.decode_message(raw, now=now)
    assert index is None
    return result


@pytest.mark.parametrize("case", REJECTED, ids=[c.name for c in REJECTED])
def test_rejected_with_the_precise_code(validator: Validator, case: Case) -> None:
    result = verdict(validator, case.raw)
    assert isinstance(result, Rejection), result
    assert (result.code, case.needle in result.reason) == (case.code, True), result.reason
    assert result.raw == case.raw
    _assert_plain(result.reason)


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.name for c in ACCEPTED])
def test_accepted_and_carried_verbatim(validator: Validator, case: Case) -> None:
    result = verdict(validator, case.raw)
    assert isinstance(result, Event), result
    for name, value in case.expect.items():
        assert getattr(result, name) == value, name
    again = validator.decode(orjson.dumps(result.to_dict()), now=NOW)
    assert again == result


def test_whole_catalogue_is_cheap(validator: Validator) -> None:
    """No payload under the size limit makes the validator slow (a flood of them must not)."""
    started = time.perf_counter()
    for case in CASES:
        validator.decode_message(case.raw, now=NOW)
    assert time.perf_counter() - started < 2.0


def test_validate_dict_cycles_and_python_only_values(validator: Validator) -> None:
    """A Python caller's objects (cycles, sets, NaN keys) are refused, never raised."""
    cyclic: dict[str, Any] = {**base(NOW, "h-cycle")}
    cyclic["properties"] = cyclic
    loop: list[Any] = []
    loop.append(loop)
    for obj in (cyclic, {**base(NOW, "h-loop"), "properties": {"l": loop}}):
        result = validator.validate_dict(obj, now=NOW)
        assert isinstance(result, Rejection)
        assert result.code == "schema"
        _assert_plain(result.reason)
    rtl_key = validator.validate_dict({**base(NOW, "h-k"), "properties": {RTL: float("nan")}})
    assert isinstance(rtl_key, Rejection)
    _assert_plain(rtl_key.reason)


# --- property tests: the validator -----------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
stamps = st.builds(
    lambda ts, tz: datetime.fromtimestamp(ts, tz).isoformat(),
    st.floats(min_value=946_771_200.0, max_value=NOW + 86_000),
    offsets,
)
ids = st.text(min_size=1, max_size=128)


@st.composite
def valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Events the schema allows: any text in free fields, flat scalar properties."""
    doc: dict[str, Any] = {
        "event_id": draw(ids),
        "occurred_at": draw(stamps),
        "channel": draw(st.sampled_from(DEFAULT_CHANNELS)),
        "event_type": draw(st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)),
        "schema_version": 1,
    }
    for name in draw(
        st.sampled_from([("customer_id",), ("anonymous_id",), ("customer_id", "anonymous_id")])
    ):
        doc[name] = draw(ids)
    for name in ("touchpoint", "source"):
        if draw(st.booleans()):
            doc[name] = draw(st.text(max_size=128))
    if draw(st.booleans()):
        doc["properties"] = draw(
            st.dictionaries(
                st.text(min_size=1, max_size=20),
                st.none()
                | st.booleans()
                | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=50),
                max_size=8,
            )
        )
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid event, then one to three breakages: fields, values or raw bytes."""
    doc = draw(valid_docs())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "set", "add", "bytes"]))
        if kind == "drop" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif kind in ("set", "add"):
            name = (
                draw(st.sampled_from(sorted(doc)))
                if kind == "set" and doc
                else draw(st.text(max_size=12))
            )
            doc[name] = draw(json_values)
    raw = bytearray(orjson.dumps(doc))
    if draw(st.booleans()) and raw:
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(raw) - 1))
            op = draw(st.sampled_from(["flip", "insert", "delete"]))
            if op == "flip":
                raw[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "insert":
                raw[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif len(raw) > 1:
                del raw[at]
    return bytes(raw)


def _check(validator: Validator, raw: bytes) -> Event | Rejection:
    result = validator.decode(raw, now=NOW)
    if isinstance(result, Rejection):
        assert result.code in REJECTION_CODES
        _assert_plain(result.reason)
        assert result.raw == raw
    else:
        assert validator.decode(orjson.dumps(result.to_dict()), now=NOW) == result
    return result


_SHARED: list[Validator] = []


def _validator() -> Validator:
    """Hypothesis forbids function-scoped fixtures in @given tests; share one instance."""
    if not _SHARED:
        _SHARED.append(Validator())
    return _SHARED[0]


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=1024))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    _check(_validator(), raw)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_never_raises_on_arbitrary_json(value: Any) -> None:
    _check(_validator(), orjson.dumps(value))


@settings(max_examples=800, deadline=None)
@given(mutated())
def test_never_raises_on_mutated_events(raw: bytes) -> None:
    _check(_validator(), raw)


@settings(max_examples=400, deadline=None)
@given(valid_docs())
def test_valid_events_round_trip(doc: dict[str, Any]) -> None:
    """Any schema-valid event is accepted unless its ids are placeholders; to_dict re-validates."""
    result = _check(_validator(), orjson.dumps(doc))
    if isinstance(result, Rejection):
        assert result.code == "identity", result.reason
        return
    assert result.event_id == doc["event_id"]
    assert result.customer_id == doc.get("customer_id")
    assert result.anonymous_id == doc.get("anonymous_id")
    assert dict(result.properties) == doc.get("properties", {})
    assert _validator().validate_dict(result.to_dict(), now=NOW) == result


# --- property tests: the pure engine on fuzzed streams ----------------------------------

QUICK = parse_journeys(
    """\
journeys:
  - name: quick
    allow_regression: true
    stages:
      - name: awareness
        events: [page_view, store_visit]
        max_dwell: 40s
      - name: consideration
        events: [search, add_to_cart]
        max_dwell: 60s
      - name: purchase
        events: [order_completed]
        max_dwell: 90s
      - name: retention
        events: [repeat_purchase]
        max_dwell: 30s
        dwell_from: last_activity
      - name: advocacy
        events:
          - review_submitted: {rating: {gte: 4}}
          - referral_sent
"""
)
EVENT_TYPES = sorted(
    {r.event_type for j in (*default_journeys(), *QUICK) for s in j.stages for r in s.rules}
    | {"email_open", "login"}
)
CUSTOMERS = ["c1", "c2", "c3", "null", SQL_DROP, RESP_DEL]
DEVICES = ["d1", "d2", "undefined", RTL]


@st.composite
def streams(draw: st.DrawFn) -> list[Event]:
    """Accepted events of a few customers and devices: skips, loops, merges, late and repeated."""
    validator = _validator()
    out: list[Event] = []
    start = NOW - 60 * 86_400
    span = draw(st.sampled_from([300.0, 40 * 86_400.0]))  # seconds (QUICK) or weeks (default)
    for i in range(draw(st.integers(1, 30))):
        doc: dict[str, Any] = {
            "event_id": f"e{draw(st.integers(0, i))}" if draw(st.integers(0, 9)) == 0 else f"e{i}",
            "occurred_at": iso(start + draw(st.floats(0, span))),
            "channel": draw(st.sampled_from(DEFAULT_CHANNELS)),
            "event_type": draw(st.sampled_from(EVENT_TYPES)),
            "schema_version": 1,
            "properties": draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "rating": st.integers(0, 6),
                        "nps": st.integers(-1, 11) | st.floats(-1, 11),
                        "csat": st.integers(0, 6) | st.text(max_size=3),
                    },
                )
            ),
        }
        who = draw(st.sampled_from(["customer", "device", "both"]))
        if who != "device":
            doc["customer_id"] = draw(st.sampled_from(CUSTOMERS))
        if who != "customer":
            doc["anonymous_id"] = draw(st.sampled_from(DEVICES))
        result = validator.validate_dict(doc, now=NOW)
        if isinstance(result, Event):
            out.append(result)
    return out


def _population_step_by_step(
    events: Sequence[Event], journeys: Sequence[Journey]
) -> tuple[Counter[tuple[str, str]], dict[Ref, engine.Slot]]:
    """The population gauge as the worker keeps it: deltas of each changed profile."""
    slots: dict[Ref, engine.Slot] = {}
    links: dict[str, str] = {}
    seen: set[str] = set()
    gauge: Counter[tuple[str, str]] = Counter()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        resolution = resolve([event], links)
        links.update(resolution.links)
        resolved = resolution.events[0]
        touched = [r for r in (resolved.target, resolved.absorb) if r is not None]
        before: dict[Ref, Profile | None] = {
            r: slots[r].profile if r in slots else None for r in touched
        }
        outcome = engine.run_events(slots, [(event, resolved)], journeys)
        for ref in outcome.changed:
            gauge.update(stage_deltas(before.get(ref), slots[ref].profile))
        assert all(n >= 0 for n in gauge.values()), gauge
        now_in = engine.Reference(slots, outcome, 0).stage_customers()
        assert +gauge == now_in
    return gauge, slots


def _check_engine(events: Sequence[Event], journeys: Sequence[Journey]) -> None:
    until = max((e.ts for e in events), default=NOW) + 200 * 86_400
    reference = engine.replay(events, journeys, until=until)
    again = engine.replay(events, journeys, until=until)
    assert again.outcome.transitions == reference.outcome.transitions  # replay is deterministic

    # Population: the incrementally kept gauge equals the customers actually in a stage.
    gauge, _ = _population_step_by_step(events, journeys)
    assert +gauge == engine.replay(events, journeys).stage_customers()
    counted = reference.stage_customers()
    in_stage = Counter(
        (j, p.stage)
        for s in reference.slots.values()
        if s.profile is not None
        for j, p in s.profile.positions.items()
        if p.stage is not None
    )
    assert counted == in_stage
    assert all(s.profile is None for s in reference.slots.values() if s.linked_to is not None)

    # Every drop happens at a deadline: an event time (entry or last activity) + max_dwell.
    times = {e.ts for e in events}
    by_name = {j.name: j for j in journeys}
    for t in reference.outcome.transitions:
        assert t.seconds_in_previous >= 0.0
        if t.kind != DROPPED:
            assert t.event_id  # caused by an event; only a merge may land in no stage
            assert t.to_stage is not None or t.kind == "merged", t
            continue
        stage = by_name[t.journey].stage(t.from_stage or "")
        assert stage.max_dwell is not None, t  # nobody drops from the last stage
        assert (t.to_stage, t.event_id) == (None, "")
        assert t.occurred_at in {ts + stage.max_dwell for ts in times}, t
        assert t.occurred_at < until
        if stage.dwell_from != "last_activity":
            assert t.seconds_in_previous == pytest.approx(stage.max_dwell), t
    # After the final sweep, nobody is left past a deadline.
    for slot in reference.slots.values():
        if slot.profile is not None:
            due = next_deadline(slot.profile, journeys)
            assert due is None or due >= until


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.sampled_from(["default", "quick"]))
def test_engine_keeps_its_invariants_on_fuzzed_streams(events: list[Event], which: str) -> None:
    _check_engine(events, default_journeys() if which == "default" else QUICK)


def test_engine_over_the_accepted_catalogue(validator: Validator) -> None:
    """The inert hostile events go through the engine like any others."""
    events: Iterable[Event | Rejection] = (validator.decode(c.raw, now=NOW) for c in ACCEPTED)
    accepted = sorted((e for e in events if isinstance(e, Event)), key=lambda e: e.ts)
    assert len(accepted) == len(ACCEPTED)
    for journeys in (default_journeys(), QUICK):
        _check_engine(accepted, journeys)
