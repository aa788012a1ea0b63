"""Channel-event model and validator (schema v1).

Why this module exists: every stage must agree on what a valid event is, and a
bad payload must become a :class:`Rejection` for the dead-letter path — never an
exception, because an exception inside a Faust agent acks the message and loses
it. The JSON Schema packaged at ``pipeline/data/event.v1.json`` is the single
source of truth; this module adds only what a schema cannot express (the
configurable channel set and the time window).

Two checks come from that one schema. A compiled one (fastjsonschema) decides
whether an event is valid, in a few microseconds; only when it says no does
jsonschema run, to find the error and build the same reason it always has.
Tests prove the two agree, and a schema using a keyword the compiled check is
not proven on falls back to jsonschema alone.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

import fastjsonschema
import orjson
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

from pipeline.identity import routing_key, usable_ids

__all__ = [
    "DEFAULT_CHANNELS",
    "MAX_ENVELOPE_BYTES",
    "MAX_ENVELOPE_EVENTS",
    "MAX_EVENT_BYTES",
    "REJECTION_CODES",
    "SCHEMA_VERSION",
    "Decoded",
    "Event",
    "PropertyValue",
    "Rejection",
    "Validator",
    "load_schema",
]

DEFAULT_CHANNELS: tuple[str, ...] = ("web", "app", "store", "email", "call_center", "social")
MAX_EVENT_BYTES = 64 * 1024
# An envelope stays under Kafka's default message.max.bytes (1,048,588).
MAX_ENVELOPE_BYTES = 1_000_000
SCHEMA_VERSION: Final = 1
SCHEMA_RESOURCE: Final = "data/event.v1.json"
ENVELOPE_RESOURCE: Final = "data/envelope.v1.json"

#: Bounded label set for metrics (``Rejection.code``).
REJECTION_CODES: Final = frozenset(
    {
        "too_large",
        "not_utf8",
        "not_json",
        "not_object",
        "schema",
        "channel",
        "timestamp",
        "identity",
        "envelope",
    }
)

PropertyValue = str | int | float | bool | None

_MIN_TS: Final = 946_684_800.0  # 2000-01-01T00:00:00Z
_MAX_FUTURE_S: Final = 86_400.0  # clock skew we tolerate from producers
_MAX_REASON: Final = 400  # reasons land in Kafka headers / ClickHouse: keep them small
_INT_MIN: Final = -(2**63)  # what orjson (and ClickHouse) can carry
_INT_MAX: Final = 2**64 - 1
_MAX_DEPTH: Final = 32  # far deeper than any valid event: properties is flat
#: Keywords the compiled check evaluates exactly as jsonschema does (tests/test_events_fast.py
#: proves it on each); a schema with any other keyword is checked by jsonschema alone.
_FAST_KEYWORDS: Final = frozenset(
    {
        "type",
        "required",
        "anyOf",
        "properties",
        "additionalProperties",
        "propertyNames",
        "minLength",
        "maxLength",
        "maxProperties",
        "pattern",
        "const",
        "$ref",
    }
)
_ANNOTATIONS: Final = frozenset({"$schema", "$id", "title", "description"})
# fastjsonschema maps "array" to list or tuple and treats "integer" its own way; jsonschema
# takes a list only. The types below mean the same to both (Decimal is a number to both).
_FAST_TYPES: Final = frozenset({"object", "string", "number", "boolean", "null"})
_JSON_TYPES: Final[dict[type, str]] = {
    dict: "object",
    list: "array",
    tuple: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def load_schema(resource: str = SCHEMA_RESOURCE) -> dict[str, Any]:
    """Return a fresh copy of a packaged schema (callers may mutate it)."""
    try:
        data = resources.files("pipeline").joinpath(resource).read_bytes()
    except OSError:
        # Python 3.11 + a setuptools editable install made while pipeline/ had no
        # __init__.py: `pipeline` imports as a namespace package whose path holds a
        # non-directory hook entry, and importlib.resources raises NotADirectoryError.
        data = (Path(__file__).parent / resource).read_bytes()
    schema: dict[str, Any] = orjson.loads(data)
    return schema


_ENVELOPE_SCHEMA: Final = load_schema(ENVELOPE_RESOURCE)
MAX_ENVELOPE_EVENTS: Final[int] = _ENVELOPE_SCHEMA["properties"]["events"]["maxItems"]


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event; immutable so it can be shared between sinks safely."""

    event_id: str
    occurred_at: datetime
    ts: float
    channel: str
    event_type: str
    customer_id: str | None
    anonymous_id: str | None
    touchpoint: str | None
    properties: Mapping[str, PropertyValue]
    schema_version: int
    source: str | None = None

    @property
    def key(self) -> str:
        """Kafka key: the known customer first, else the device; placeholders never count."""
        key = routing_key(self.customer_id, self.anonymous_id)
        assert key is not None  # the validator rejects events with no usable id
        return key

    def to_dict(self) -> dict[str, Any]:
        """JSON form that validates against the same schema (unset optionals omitted)."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at.isoformat(),
            "channel": self.channel,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "properties": dict(self.properties),
        }
        for name in ("customer_id", "anonymous_id", "touchpoint", "source"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload was refused; carries the raw bytes for the dead-letter topic."""

    reason: str
    code: str
    raw: bytes


#: One event of a Kafka message: its index in the envelope (None for a message
#: holding a single event) and the event or why it was refused.
Decoded = tuple[int | None, Event | Rejection]


def _short(value: object, limit: int = 80) -> str:
    """Quote a user value for a reason without letting it blow up the message."""
    text = repr(value) if isinstance(value, str) else _json_text(value)
    if not text.isprintable():  # JSON keeps U+202E, U+2028…: a reason stays one plain line
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _name(key: object) -> str:
    """A field or property name as it appears in a reason: bare if plain, else quoted."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 128 else _short(key)


def _json_text(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return repr(value)


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


@lru_cache(maxsize=64)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """Compile a schema pattern so a trailing ``$`` means end of string, as in ECMA 262.

    Python's ``$`` also matches before a final newline, so ``"click\\n"`` would pass
    ``^[a-z]+$``; ``\\Z`` closes that gap. Only a trailing anchor is rewritten, which is
    all our schema uses.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern_keyword(
    validator: Any, pattern: str, instance: object, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_StrictValidator: Any = validators.extend(  # type: ignore[no-untyped-call]  # untyped in stubs
    Draft202012Validator, {"pattern": _pattern_keyword}
)


def _field(error: ValidationError) -> str:
    return ".".join(_name(part) for part in error.absolute_path)


def _describe(error: ValidationError, schema: Mapping[str, Any]) -> str:
    """Turn a jsonschema error into "field: what was wrong" for humans and the DLQ."""
    field = _field(error)
    where = field or "event"
    kind = error.validator
    value: Any = error.validator_value
    instance = error.instance
    schema_path = list(error.absolute_schema_path)
    if schema_path[:1] == ["anyOf"]:
        return "customer_id or anonymous_id: at least one is required"
    if "propertyNames" in schema_path:
        return f"{where}: key {_short(instance)} must be 1–128 characters"
    if kind == "required" and isinstance(instance, dict):
        missing = [name for name in value if name not in instance]
        name = missing[0] if missing else "?"
        return f"{field + '.' if field else ''}{name}: is required"
    if kind == "additionalProperties" and isinstance(instance, dict):
        known = schema.get("properties", {})
        extra = next((k for k in instance if k not in known), "?")
        return f"{_short(extra)}: is not an allowed field in schema v{SCHEMA_VERSION}"
    if kind == "type":
        expected = " or ".join(value) if isinstance(value, list) else str(value)
        return f"{where}: expected {expected}, got {_json_type(instance)}"
    if kind == "pattern" and field == "occurred_at":
        return (
            f"{where}: {_short(instance)} is not an RFC 3339 date-time with offset"
            " (e.g. 2024-05-01T12:00:00Z)"
        )
    if kind == "pattern":
        return f"{where}: {_short(instance)} does not match {value}"
    if kind == "minLength":
        return f"{where}: must not be empty"
    if kind == "maxLength" and isinstance(instance, str):
        return f"{where}: {len(instance)} characters, over the {value}-character limit"
    if kind == "maxProperties" and isinstance(instance, dict):
        return f"{where}: {len(instance)} keys, over the {value}-key limit"
    if kind == "const":
        return f"{where}: must be {_short(value)}, got {_short(instance)}"
    return f"{where}: {error.message}"


def _parse(raw: bytes) -> object:
    """JSON → Python, or the Rejection saying why the bytes are not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson validates UTF-8 itself; decode only on this slow path to classify.
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return Rejection(f"not valid UTF-8: byte {uexc.start}: {uexc.reason}", "not_utf8", raw)
        return Rejection(_clip(f"not valid JSON: {exc}"), "not_json", raw)


def _too_large(raw: bytes, limit: int = MAX_EVENT_BYTES) -> Rejection:
    return Rejection(f"payload is {len(raw)} bytes, over the {limit}-byte limit", "too_large", raw)


def _clip(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


class Validator:
    """Decode and validate raw event payloads; build once, reuse for every message.

    Compiling the schema is the expensive part, so one instance serves a worker.
    ``decode`` never raises: every failure is a :class:`Rejection`.
    """

    __slots__ = ("_channel_list", "_channels", "_envelope", "_fast", "_schema", "_validator")

    def __init__(self, channels: Collection[str] = DEFAULT_CHANNELS, *, fast: bool = True) -> None:
        """``fast=False`` leaves jsonschema alone to decide: the reference the tests compare to."""
        self._schema = load_schema()
        _StrictValidator.check_schema(self._schema)
        self._validator: Any = _StrictValidator(self._schema)
        self._fast = _compile_fast_check(self._schema) if fast else None
        self._envelope: Any = _StrictValidator(_ENVELOPE_SCHEMA)
        self._channels = frozenset(channels)
        self._channel_list = ", ".join(dict.fromkeys(channels))  # keep configured order

    @property
    def channels(self) -> frozenset[str]:
        """The configured channel set events are checked against."""
        return self._channels

    def decode(self, raw: bytes, now: float | None = None) -> Event | Rejection:
        """Bytes of one event → Event, or Rejection with a readable reason."""
        if not isinstance(raw, bytes):
            # Kafka tombstones arrive as None; bytearray/memoryview from other clients.
            raw = b"" if raw is None else bytes(raw)
        size = len(raw)
        if size > MAX_EVENT_BYTES:
            return _too_large(raw)
        parsed = _parse(raw)
        if isinstance(parsed, Rejection):
            return parsed
        return self._guarded(parsed, raw, now)

    def decode_message(self, raw: bytes, now: float | None = None) -> list[Decoded]:
        """A Kafka message → its events: one plain event, or every event of an envelope.

        A message that is not JSON, or an envelope that breaks envelope.v1.json, is
        refused whole (index None). Inside a valid envelope each event is judged on
        its own, with the same rules and reasons as a plain one; its raw bytes for
        the dead-letter path are the event re-serialised, as sent but for spacing.
        """
        if not isinstance(raw, bytes):
            raw = b"" if raw is None else bytes(raw)
        size = len(raw)
        if size > MAX_ENVELOPE_BYTES:
            return [(None, _too_large(raw, MAX_ENVELOPE_BYTES))]
        parsed = _parse(raw)
        if isinstance(parsed, Rejection):
            return [(None, parsed)]
        if not (isinstance(parsed, dict) and "envelope" in parsed):
            if size > MAX_EVENT_BYTES:
                return [(None, _too_large(raw))]
            return [(None, self._guarded(parsed, raw, now))]
        items = parsed.get("events")
        version = parsed.get("envelope")
        if not (
            version == 1
            and type(version) is not bool  # true == 1 in Python, not in JSON Schema
            and len(parsed) == 2
            and type(items) is list
            and 1 <= len(items) <= MAX_ENVELOPE_EVENTS
        ):
            return [(None, self._bad_envelope(parsed, raw))]
        at = time.time() if now is None else now
        decoded: list[Decoded] = []
        for index, item in enumerate(items):
            try:
                item_raw = orjson.dumps(item)
            except TypeError:  # orjson reads 1024 levels deep but writes only 254
                reason = f"events[{index}]: nested too deep to carry alone; raw is the envelope"
                decoded.append((index, Rejection(reason, "schema", raw)))
                continue
            if len(item_raw) > MAX_EVENT_BYTES:
                decoded.append((index, _too_large(item_raw)))
            else:
                decoded.append((index, self._guarded(item, item_raw, at)))
        return decoded

    def _bad_envelope(self, obj: dict[str, Any], raw: bytes) -> Rejection:
        error = best_match(self._envelope.iter_errors(obj))
        if error is None:  # pragma: no cover - the hand check and the schema agree (tested)
            return Rejection("envelope: not a valid envelope v1", "envelope", raw)
        where = ".".join(_name(part) for part in error.absolute_path) or "envelope"
        if error.validator == "const":
            reason = f"envelope: version must be 1, got {_short(error.instance)}"
        elif error.validator == "additionalProperties":
            extra = next((k for k in obj if k not in ("envelope", "events")), "?")
            reason = f"envelope: {_short(extra)} is not an allowed field (envelope, events)"
        elif error.validator in ("minItems", "maxItems"):
            count = len(obj["events"])
            reason = f"envelope: {count} events, it must hold 1 to {MAX_ENVELOPE_EVENTS}"
        elif error.validator == "required":
            reason = "envelope: events is required"
        elif error.validator == "type":
            reason = f"envelope {where}: expected an array, got {_json_type(error.instance)}"
        else:
            reason = f"envelope {where}: {error.message}"
        return Rejection(_clip(reason), "envelope", raw)

    def validate_dict(self, obj: object, now: float | None = None) -> Event | Rejection:
        """Validate an already-parsed object (e.g. from tests or a JSON API)."""
        try:
            raw = orjson.dumps(obj)
        except (TypeError, orjson.JSONEncodeError):
            raw = repr(obj).encode("utf-8", "backslashreplace")
        return self._guarded(obj, raw, now)

    def _guarded(self, obj: object, raw: bytes, now: float | None) -> Event | Rejection:
        """Last line of defence: a validator bug must reach the DLQ, not kill the agent."""
        try:
            return self._validate(obj, raw, time.time() if now is None else now)
        except Exception as exc:  # pragma: no cover - only a bug gets here
            return Rejection(_clip(f"internal validator error: {exc!r}"), "schema", raw)

    def _nested(self, obj: Mapping[Any, object], raw: bytes) -> Rejection:
        """The rejection for a value too deeply nested to describe (events are flat)."""
        deep = _too_deep(obj)
        name, key = deep if deep is not None else ("event", None)
        where = _name(name) if key is None else f"{_name(name)}.{_name(key)}"
        return Rejection(
            _clip(f"{where}: nested more than {_MAX_DEPTH} levels deep (events are flat)"),
            "timestamp" if name == "occurred_at" else "schema",
            raw,
        )

    def _validate(self, obj: object, raw: bytes, now: float) -> Event | Rejection:
        if not isinstance(obj, dict):
            return Rejection(
                f"event: expected a JSON object, got {_json_type(obj)}", "not_object", raw
            )
        if self._fast is not None and self._fast(obj):
            error, reason = None, None
        else:
            try:
                error = best_match(self._validator.iter_errors(obj))
                reason = None if error is None else _describe(error, self._schema)
            except RecursionError:
                # jsonschema quotes repr(value) in its messages, which recurses: a value nested
                # ~1000 levels deep (orjson parses up to 1024) overflows it. Name the field.
                return self._nested(obj, raw)
        if error is not None and reason is not None:
            path = error.absolute_path
            code = "timestamp" if path and path[0] == "occurred_at" else "schema"
            return Rejection(_clip(reason), code, raw)

        channel: str = obj["channel"]
        if channel not in self._channels:
            return Rejection(
                _clip(
                    f"channel: {_short(channel)} is not a configured channel ({self._channel_list})"
                ),
                "channel",
                raw,
            )

        ids = usable_ids(obj.get("customer_id"), obj.get("anonymous_id"))
        if ids.empty:
            given = ", ".join(
                f"{name} {_short(obj[name])}"
                for name in ("customer_id", "anonymous_id")
                if name in obj
            )
            return Rejection(
                _clip(f"{given}: placeholder ids only, so this event names nobody"),
                "identity",
                raw,
            )

        props: dict[str, PropertyValue] = dict(obj.get("properties", {}))
        bad = _bad_property(props)
        if bad is not None:
            return Rejection(_clip(bad), "schema", raw)

        stamp: str = obj["occurred_at"]
        try:
            # RFC 3339 allows lower-case t/z; fromisoformat (3.11) does not.
            occurred_at = datetime.fromisoformat(stamp.upper())
            ts = occurred_at.timestamp()
        except (ValueError, OverflowError) as exc:
            return Rejection(
                _clip(f"occurred_at: {_short(stamp)} is not a valid date-time ({exc})"),
                "timestamp",
                raw,
            )
        if occurred_at.utcoffset() is None:  # pragma: no cover - the pattern requires one
            return Rejection(f"occurred_at: {_short(stamp)} has no UTC offset", "timestamp", raw)
        if ts < _MIN_TS:
            return Rejection(
                f"occurred_at: {_short(stamp)} is before 2000-01-01T00:00:00Z", "timestamp", raw
            )
        if ts > now + _MAX_FUTURE_S:
            return Rejection(
                f"occurred_at: {_short(stamp)} is more than 1 day in the future", "timestamp", raw
            )

        return Event(
            event_id=obj["event_id"],
            occurred_at=occurred_at,
            ts=ts,
            channel=channel,
            event_type=obj["event_type"],
            customer_id=obj.get("customer_id"),
            anonymous_id=obj.get("anonymous_id"),
            touchpoint=obj.get("touchpoint"),
            properties=props,
            schema_version=int(obj["schema_version"]),
            source=obj.get("source"),
        )


def _fast_compatible(schema: object) -> bool:
    """True when every keyword of ``schema`` is one the compiled check is proven on.

    A conservative walk: an unknown keyword, an ``array`` or ``integer`` type, a ``$``
    anywhere but at the end of a pattern (fastjsonschema rewrites every ``$``,
    ``_ecma_regex`` only a trailing one), a ``$ref`` with siblings or outside ``$defs``,
    or a ``const`` other than a string or number all mean "let jsonschema decide".
    """
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict):
        return False
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _FAST_KEYWORDS and key != "$defs":
            return False
        if key in ("properties", "$defs"):
            if not isinstance(value, dict) or not all(map(_fast_compatible, value.values())):
                return False
        elif key in ("additionalProperties", "propertyNames"):
            if not _fast_compatible(value):
                return False
        elif key == "anyOf":
            if not isinstance(value, list) or not all(map(_fast_compatible, value)):
                return False
        elif key == "type":
            names = value if isinstance(value, list) else [value]
            if not set(names) <= _FAST_TYPES:
                return False
        elif key == "pattern":
            if not isinstance(value, str) or "$" in value[:-1]:
                return False
        elif key == "$ref":
            if not (isinstance(value, str) and value.startswith("#/$defs/")):
                return False
            if set(schema) - _ANNOTATIONS - {"$ref"}:
                return False
        elif key == "const" and (
            isinstance(value, bool) or not isinstance(value, str | int | float)
        ):
            return False
    return True


def _compile_fast_check(schema: dict[str, Any]) -> Callable[[object], bool] | None:
    """A compiled "is this event schema-valid?" check, or None when it cannot be trusted.

    Its True is final; on False (or anything it raises) jsonschema runs and decides, so a
    value it cannot judge (a Decimal ``schema_version`` from ``validate_dict``) costs time,
    not a verdict. What must hold is that it never says True where jsonschema says no:
    tests/test_events_fast.py proves that on the catalogues and on mutated events.
    """
    if not _fast_compatible(schema):
        return None
    try:
        # use_default=False: fastjsonschema would otherwise write schema defaults into the
        # event. detailed_exceptions stays on: off, 2.22.3 fails to compile a "const".
        compiled = fastjsonschema.compile(schema, handlers={}, use_default=False, use_formats=False)
    except Exception:  # a schema it cannot compile is still one jsonschema can check
        return None

    def check(obj: object) -> bool:
        try:
            compiled(obj)
        except Exception:  # JsonSchemaValueException, or a Python-only value it trips on
            return False
        return True

    return check


def _too_deep(obj: Mapping[Any, object]) -> tuple[object, object] | None:
    """(field, key inside it or None) of a value nested deeper than ``_MAX_DEPTH``.

    A loop, not recursion, for the same reason as the check itself.
    """
    for name, value in obj.items():
        parts = value.items() if isinstance(value, dict) else [(None, value)]
        for key, child in parts:
            if not isinstance(child, dict | list):
                continue
            stack: list[tuple[dict[Any, object] | list[object], int]] = [
                (child, 1 if key is None else 2)
            ]
            while stack:
                item, depth = stack.pop()
                if depth > _MAX_DEPTH:
                    return name, key
                children = item.values() if isinstance(item, dict) else item
                stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return None


def _bad_property(props: Mapping[Any, object]) -> str | None:
    """Checks JSON Schema cannot express; only reachable through ``validate_dict``."""
    for key, value in props.items():
        if not isinstance(key, str):
            return f"properties: key {_short(key)} is not a string"
        if isinstance(value, float) and not math.isfinite(value):
            return f"properties.{_name(key)}: {value} is not a finite number"
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and not _INT_MIN <= value <= _INT_MAX
        ):
            return f"properties.{_name(key)}: integer out of the 64-bit range"
    return None
