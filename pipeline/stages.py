"""The stage engine: profile + event + journeys → new profile + transitions.

Pure on purpose — no I/O, no clock — so the live worker, a replay of the
Kafka topic and the tests all compute the same answer from the same events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from pipeline.journeys import Journey

ENTERED = "entered"
ADVANCED = "advanced"
REGRESSED = "regressed"

PROFILE_FORMAT = 1

Scalar = str | int | float | bool | None


class EventLike(Protocol):
    """What the engine reads from an event; the validated ``pipeline.events.Event`` fits it."""

    @property
    def event_id(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def channel(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def properties(self) -> Mapping[str, Scalar]: ...
    @property
    def key(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Position:
    """Where a customer is in one journey; ``stage`` None means in no stage right now."""

    stage: str | None
    entered_at: float
    last_event_at: float
    last_channel: str


@dataclass(frozen=True, slots=True)
class Profile:
    """A customer's state across all journeys: what Redis stores per customer."""

    customer: str
    positions: Mapping[str, Position]
    channels: frozenset[str] = frozenset()
    last_channel: str | None = None
    last_event_at: float | None = None

    @classmethod
    def empty(cls, customer: str) -> Profile:
        return cls(customer, {}, frozenset(), None, None)

    def to_json(self) -> bytes:
        """Compact and deterministic, so equal profiles store as equal bytes."""
        doc: dict[str, Any] = {
            "v": PROFILE_FORMAT,
            "customer": self.customer,
            "positions": {
                j: {
                    "stage": p.stage,
                    "entered_at": float(p.entered_at),
                    "last_event_at": float(p.last_event_at),
                    "last_channel": p.last_channel,
                }
                for j, p in self.positions.items()
            },
            "channels": sorted(self.channels),
            "last_channel": self.last_channel,
            "last_event_at": None if self.last_event_at is None else float(self.last_event_at),
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes | str) -> Profile:
        doc = orjson.loads(data)
        version = doc.get("v", PROFILE_FORMAT)
        if version != PROFILE_FORMAT:
            raise ValueError(f"unsupported profile format {version!r}")
        last_event_at = doc.get("last_event_at")
        return cls(
            customer=doc["customer"],
            positions={
                j: Position(
                    stage=p["stage"],
                    entered_at=float(p["entered_at"]),
                    last_event_at=float(p["last_event_at"]),
                    last_channel=p["last_channel"],
                )
                for j, p in doc["positions"].items()
            },
            channels=frozenset(doc.get("channels", ())),
            last_channel=doc.get("last_channel"),
            last_event_at=None if last_event_at is None else float(last_event_at),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A customer's move between stages: a row in ClickHouse and a message on Kafka."""

    journey: str
    customer: str
    from_stage: str | None
    to_stage: str | None
    kind: str
    channel: str
    event_id: str
    occurred_at: float
    seconds_in_previous: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "journey": self.journey,
            "customer": self.customer,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "kind": self.kind,
            "channel": self.channel,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "seconds_in_previous": self.seconds_in_previous,
        }


def _later(old: float | None, ts: float) -> float:
    """Activity time never runs backwards, so a late event cannot pull a deadline earlier."""
    return ts if old is None else max(old, ts)


def _move(
    journey: Journey, position: Position | None, event: EventLike, customer: str
) -> tuple[Position | None, Transition | None]:
    ts = event.ts
    stage = journey.match(event.event_type, event.properties)
    if stage is None:
        if position is None:
            return None, None
        return replace(
            position, last_event_at=_later(position.last_event_at, ts), last_channel=event.channel
        ), None

    def transition(kind: str, old: Position | None) -> Transition:
        return Transition(
            journey=journey.name,
            customer=customer,
            from_stage=old.stage if old is not None else None,
            to_stage=stage.name,
            kind=kind,
            channel=event.channel,
            event_id=event.event_id,
            occurred_at=ts,
            seconds_in_previous=0.0 if old is None else max(0.0, ts - old.entered_at),
        )

    last = ts if position is None else _later(position.last_event_at, ts)
    moved = Position(stage.name, ts, last, event.channel)
    # A stage the journey file no longer has counts as no stage: the customer enters afresh.
    if position is None or position.stage is None or not journey.has_stage(position.stage):
        return moved, transition(ENTERED, None)
    current = journey.stage(position.stage).index
    if stage.index > current:
        return moved, transition(ADVANCED, position)
    if stage.index < current and journey.allow_regression:
        return moved, transition(REGRESSED, position)
    return replace(position, last_event_at=last, last_channel=event.channel), None


def apply_event(
    profile: Profile, event: EventLike, journeys: Sequence[Journey]
) -> tuple[Profile, list[Transition]]:
    """One event applied to one customer in every journey, in the order events arrive."""
    positions = dict(profile.positions)
    transitions: list[Transition] = []
    for journey in journeys:
        position, transition = _move(journey, positions.get(journey.name), event, profile.customer)
        if position is not None:
            positions[journey.name] = position
        if transition is not None:
            transitions.append(transition)
    updated = Profile(
        customer=profile.customer,
        positions=positions,
        channels=profile.channels | {event.channel},
        last_channel=event.channel,
        last_event_at=_later(profile.last_event_at, event.ts),
    )
    return updated, transitions


def replay(
    events: Iterable[EventLike], journeys: Sequence[Journey]
) -> tuple[dict[str, Profile], list[Transition], int]:
    """The reference result for a stream: profiles by customer, transitions, duplicates skipped."""
    profiles: dict[str, Profile] = {}
    transitions: list[Transition] = []
    seen: set[str] = set()
    duplicates = 0
    for event in events:
        if event.event_id in seen:
            duplicates += 1
            continue
        seen.add(event.event_id)
        key = event.key
        profile = profiles.get(key) or Profile.empty(key)
        profiles[key], moved = apply_event(profile, event, journeys)
        transitions.extend(moved)
    return profiles, transitions, duplicates


__all__ = [
    "ADVANCED",
    "ENTERED",
    "REGRESSED",
    "EventLike",
    "Position",
    "Profile",
    "Transition",
    "apply_event",
    "replay",
]
