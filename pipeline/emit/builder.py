"""Build schema-valid events and check them exactly as the worker will.

Pure: no I/O, the clock is passed in. A caller mistake (unknown channel, bad
event type, no usable id) becomes an :class:`InvalidEvent` in the caller's own
stack, rather than a dead letter found hours later.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from pipeline.events import DEFAULT_CHANNELS, MAX_EVENT_BYTES, SCHEMA_VERSION, Rejection, Validator
from pipeline.identity import is_placeholder

from .errors import InvalidEvent

__all__ = ["IDENTIFY", "EventBuilder", "Outgoing", "format_time"]

#: The event type of :meth:`EventBuilder.identify`; no stage lists it, so it moves nobody
#: and only links the device to the customer.
IDENTIFY: Final = "identify"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One validated event ready for any transport: its JSON, the bytes sent, the Kafka key."""

    event: Mapping[str, Any]
    payload: bytes
    key: bytes

    @property
    def event_id(self) -> str:
        event_id: str = self.event["event_id"]
        return event_id


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds (``2026-05-01T12:00:00.123Z``).

    A naive datetime is refused: guessing its zone would shift events by hours
    and silently distort time in stage.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidEvent(
            f"occurred_at: {moment.isoformat()} has no time zone; pass an aware datetime"
            " (e.g. datetime.now(UTC))",
            "timestamp",
        )
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventBuilder:
    """Turns ``track``/``identify`` arguments into an :class:`Outgoing`, or raises.

    Holds a compiled :class:`~pipeline.events.Validator` (compiling is the slow
    part), so build one per emitter. Safe to use from several threads.
    """

    __slots__ = ("_clock", "_source", "_validator")

    def __init__(
        self,
        channels: Collection[str] = DEFAULT_CHANNELS,
        *,
        source: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._validator = Validator(channels)
        self._source = source
        self._clock = clock

    @property
    def channels(self) -> frozenset[str]:
        return self._validator.channels

    def track(
        self,
        event_type: str,
        *,
        channel: str,
        customer_id: str | None = None,
        anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> Outgoing:
        """An event of ``event_type``; ids, time and properties as given, the rest generated."""
        now = self._clock()
        if occurred_at is None:
            stamp = format_time(datetime.fromtimestamp(now, UTC))
        elif isinstance(occurred_at, datetime):
            stamp = format_time(occurred_at)
        else:
            stamp = occurred_at  # a string is the caller's RFC 3339 text: the validator checks it
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()) if event_id is None else event_id,
            "occurred_at": stamp,
            "channel": channel,
            "event_type": event_type,
            "schema_version": SCHEMA_VERSION,
        }
        if customer_id is not None:
            event["customer_id"] = customer_id
        if anonymous_id is not None:
            event["anonymous_id"] = anonymous_id
        if touchpoint is not None:
            event["touchpoint"] = touchpoint
        if properties:
            # a non-mapping goes through as is, so the validator names the mistake
            event["properties"] = (
                dict(properties) if isinstance(properties, Mapping) else properties
            )
        if self._source is not None:
            event["source"] = self._source
        return self._checked(event, now)

    def identify(
        self,
        customer_id: str,
        anonymous_id: str,
        *,
        channel: str,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> Outgoing:
        """An ``identify`` event carrying both ids: the worker links the device to the customer.

        Both ids must be real: a placeholder (``"null"``, ``"0"``…) never links, so
        asking for that link is a mistake worth raising now.
        """
        for name, value in (("customer_id", customer_id), ("anonymous_id", anonymous_id)):
            if isinstance(value, str) and is_placeholder(value):
                raise InvalidEvent(
                    f"{name}: {value!r} is a placeholder id; identify needs real ids to link",
                    "identity",
                )
        return self.track(
            IDENTIFY,
            channel=channel,
            customer_id=customer_id,
            anonymous_id=anonymous_id,
            properties=properties,
            touchpoint=touchpoint,
            occurred_at=occurred_at,
            event_id=event_id,
        )

    def _checked(self, event: dict[str, Any], now: float) -> Outgoing:
        verdict = self._validator.validate_dict(event, now)
        if isinstance(verdict, Rejection):
            raise InvalidEvent(verdict.reason, verdict.code)
        payload = orjson.dumps(event)
        if len(payload) > MAX_EVENT_BYTES:  # the worker's decode() checks this; validate_dict not
            raise InvalidEvent(
                f"event is {len(payload)} bytes as JSON, over the {MAX_EVENT_BYTES}-byte limit",
                "too_large",
            )
        return Outgoing(event, payload, verdict.key.encode())
