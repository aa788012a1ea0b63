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
DROPPED = "dropped"
REENGAGED = "reengaged"
MERGED = "merged"
# Kinds that put a customer into a stage (counted as entries, and in the funnel).
ENTRY_KINDS = (ENTERED, ADVANCED, REGRESSED, REENGAGED)
# Kinds that take a customer out of a stage they spent time in (time in stage).
DWELL_KINDS = (ADVANCED, DROPPED, REGRESSED)

PROFILE_FORMAT = 2  # Profile.to_json; format 1 is still read

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
    """Where a customer is in one journey.

    ``stage`` None means in no stage right now: ``dropped_from`` then names the
    stage they dropped at, and ``entered_at`` is the time of the drop.
    ``handoff`` is the last channel hand-off made while in this stage.
    """

    stage: str | None
    entered_at: float
    last_event_at: float
    last_channel: str
    dropped_from: str | None = None
    handoff: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """A customer's (or an unlinked device's) state across all journeys: one Redis hash."""

    customer: str
    positions: Mapping[str, Position]
    channels: frozenset[str] = frozenset()
    last_channel: str | None = None
    last_event_at: float | None = None
    anonymous: bool = False

    @classmethod
    def empty(cls, customer: str, anonymous: bool = False) -> Profile:
        return cls(customer, {}, frozenset(), None, None, anonymous)

    def to_json(self) -> bytes:
        """Compact and deterministic, so equal profiles store as equal bytes.

        Positional (format 2), because field names cost more than the values and
        Redis holds one of these per customer:
        ``[2, customer, anonymous, last_event_at, last_channel, [channels],
        {journey: [stage, entered_at, last_event_at, last_channel, dropped_from,
        handoff]}]``, a position's trailing nulls left out. Times stay exact
        floats: a replay must compute the same seconds in stage as the live run.
        """
        positions: dict[str, list[Any]] = {}
        for j, p in self.positions.items():
            row: list[Any] = [
                p.stage,
                float(p.entered_at),
                float(p.last_event_at),
                p.last_channel,
                p.dropped_from,
                None if p.handoff is None else list(p.handoff),
            ]
            while row[-1] is None:
                row.pop()
            positions[j] = row
        return orjson.dumps(
            [
                PROFILE_FORMAT,
                self.customer,
                1 if self.anonymous else 0,
                None if self.last_event_at is None else float(self.last_event_at),
                self.last_channel,
                sorted(self.channels),
                positions,
            ],
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Profile:
        doc = orjson.loads(data)
        if isinstance(doc, dict):
            return cls._from_v1(doc)
        version, customer, anonymous, last_event_at, last_channel, channels, rows = doc
        if version != PROFILE_FORMAT:
            raise ValueError(f"unsupported profile format {version!r}")
        positions: dict[str, Position] = {}
        for j, row in rows.items():
            stage, entered_at, last_at, channel, *rest = row
            dropped_from = rest[0] if rest else None
            handoff = rest[1] if len(rest) > 1 else None
            positions[j] = Position(
                stage=stage,
                entered_at=float(entered_at),
                last_event_at=float(last_at),
                last_channel=channel,
                dropped_from=dropped_from,
                handoff=None if handoff is None else (handoff[0], handoff[1]),
            )
        return cls(
            customer=customer,
            positions=positions,
            channels=frozenset(channels),
            last_channel=last_channel,
            last_event_at=None if last_event_at is None else float(last_event_at),
            anonymous=bool(anonymous),
        )

    @classmethod
    def _from_v1(cls, doc: dict[str, Any]) -> Profile:
        """Format 1 (an object with named fields), as stored before format 2: still read."""
        version = doc.get("v", 1)
        if version != 1:
            raise ValueError(f"unsupported profile format {version!r}")
        last_event_at = doc.get("last_event_at")
        positions: dict[str, Position] = {}
        for j, p in doc["positions"].items():
            handoff = p.get("handoff")
            positions[j] = Position(
                stage=p["stage"],
                entered_at=float(p["entered_at"]),
                last_event_at=float(p["last_event_at"]),
                last_channel=p["last_channel"],
                dropped_from=p.get("dropped_from"),
                handoff=None if handoff is None else (handoff[0], handoff[1]),
            )
        return cls(
            customer=doc["customer"],
            positions=positions,
            channels=frozenset(doc.get("channels", ())),
            last_channel=doc.get("last_channel"),
            last_event_at=None if last_event_at is None else float(last_event_at),
            anonymous=bool(doc.get("anonymous", False)),
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
    # On an exit (advanced, dropped, regressed): the last channel hand-off the
    # customer made while in the stage left, so "did hand-offs go on?" is countable.
    handoff_from: str | None = None
    handoff_to: str | None = None

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
            "handoff_from": self.handoff_from,
            "handoff_to": self.handoff_to,
        }


@dataclass(frozen=True, slots=True)
class Handoff:
    """Two consecutive accepted events of one customer on different channels.

    Recorded for each journey the customer is in a stage of (``stage``) when
    the second event arrives.
    """

    journey: str
    customer: str
    stage: str
    from_channel: str
    to_channel: str
    event_id: str
    occurred_at: float


@dataclass(frozen=True, slots=True)
class Feedback:
    """A survey answer (``csat`` 1–5, ``nps`` 0–10) with the stage the customer is in."""

    journey: str
    stage: str  # "" when the customer is in no stage of this journey
    channel: str
    customer: str
    event_id: str
    occurred_at: float
    csat: float | None
    nps: float | None


@dataclass(frozen=True, slots=True)
class Applied:
    """What one step of the engine produced."""

    profile: Profile
    transitions: list[Transition]
    handoffs: list[Handoff]


def _later(old: float | None, ts: float) -> float:
    """Activity time never runs backwards, so a late event cannot pull a deadline earlier."""
    return ts if old is None else max(old, ts)


def deadline(journey: Journey, position: Position) -> float | None:
    """When a customer in ``position`` drops if nothing moves them out first."""
    if position.stage is None or not journey.has_stage(position.stage):
        return None
    stage = journey.stage(position.stage)
    if stage.max_dwell is None:
        return None
    since = position.last_event_at if stage.dwell_from == "last_activity" else position.entered_at
    return since + stage.max_dwell


def next_deadline(profile: Profile, journeys: Sequence[Journey]) -> float | None:
    """The earliest deadline over all journeys: the score the sweep index keeps."""
    found = [
        d
        for j in journeys
        if (p := profile.positions.get(j.name)) is not None and (d := deadline(j, p)) is not None
    ]
    return min(found) if found else None


def _drop(
    journey: Journey, position: Position, customer: str, now: float
) -> tuple[Position, Transition | None]:
    """Drop the customer if their deadline passed strictly before ``now``."""
    due = deadline(journey, position)
    if due is None or due >= now:
        return position, None
    assert position.stage is not None
    handoff = position.handoff
    dropped = Transition(
        journey=journey.name,
        customer=customer,
        from_stage=position.stage,
        to_stage=None,
        kind=DROPPED,
        channel=position.last_channel,
        event_id="",
        occurred_at=due,
        seconds_in_previous=max(0.0, due - position.entered_at),
        handoff_from=handoff[0] if handoff else None,
        handoff_to=handoff[1] if handoff else None,
    )
    return replace(
        position, stage=None, entered_at=due, dropped_from=position.stage, handoff=None
    ), (dropped)


def expire(
    profile: Profile, journeys: Sequence[Journey], now: float
) -> tuple[Profile, list[Transition]]:
    """Drop the customer from every journey whose deadline passed before ``now``.

    The sweep calls this with the partition's watermark; ``apply_event`` with
    the event's time, so both paths drop at the same deadline.
    """
    positions = dict(profile.positions)
    dropped: list[Transition] = []
    for journey in journeys:
        position = positions.get(journey.name)
        if position is None:
            continue
        positions[journey.name], transition = _drop(journey, position, profile.customer, now)
        if transition is not None:
            dropped.append(transition)
    if not dropped:
        return profile, []
    return replace(profile, positions=positions), dropped


def _touch(position: Position, event: EventLike) -> Position:
    """Activity in place: the latest event (by event time) names the channel."""
    if event.ts >= position.last_event_at:
        # The constructor, not dataclasses.replace: this runs for most events, and
        # replace() costs several times as much.
        return Position(
            position.stage,
            position.entered_at,
            event.ts,
            event.channel,
            position.dropped_from,
            position.handoff,
        )
    return position


def _move(
    journey: Journey, position: Position | None, event: EventLike, customer: str
) -> tuple[Position | None, Transition | None]:
    ts = event.ts
    stage = journey.match(event.event_type, event.properties)
    if stage is None:
        return (None if position is None else _touch(position, event)), None

    def transition(kind: str, old: Position | None, since: float | None) -> Transition:
        handoff = old.handoff if old is not None and kind != REENGAGED else None
        return Transition(
            journey=journey.name,
            customer=customer,
            from_stage=None if old is None else (old.stage or old.dropped_from),
            to_stage=stage.name,
            kind=kind,
            channel=event.channel,
            event_id=event.event_id,
            occurred_at=ts,
            seconds_in_previous=0.0 if since is None else max(0.0, ts - since),
            handoff_from=handoff[0] if handoff else None,
            handoff_to=handoff[1] if handoff else None,
        )

    last = ts if position is None else _later(position.last_event_at, ts)
    moved = Position(stage.name, ts, last, event.channel)
    if position is None:
        return moved, transition(ENTERED, None, None)
    if position.stage is None:
        if position.dropped_from is None:  # never in a stage of this journey
            return moved, transition(ENTERED, None, None)
        return moved, transition(REENGAGED, position, position.entered_at)
    # A stage the journey file no longer has counts as no stage: the customer enters afresh.
    if not journey.has_stage(position.stage):
        return moved, transition(ENTERED, None, None)
    current = journey.stage(position.stage).index
    if stage.index > current:
        return moved, transition(ADVANCED, position, position.entered_at)
    if stage.index < current and journey.allow_regression:
        return moved, transition(REGRESSED, position, position.entered_at)
    return _touch(position, event), None


def apply_event(profile: Profile, event: EventLike, journeys: Sequence[Journey]) -> Applied:
    """One event applied to one customer in every journey, in the order events arrive.

    First any drop whose deadline passed before the event (at the deadline),
    then the hand-off if the channel changed, then the move the event makes.
    """
    profile, transitions = expire(profile, journeys, event.ts)
    positions = dict(profile.positions)
    handoffs: list[Handoff] = []
    switched = profile.last_channel is not None and profile.last_channel != event.channel
    for journey in journeys:
        position = positions.get(journey.name)
        if switched and position is not None and position.stage is not None:
            assert profile.last_channel is not None
            pair = (profile.last_channel, event.channel)
            handoffs.append(
                Handoff(
                    journey.name,
                    profile.customer,
                    position.stage,
                    pair[0],
                    pair[1],
                    event.event_id,
                    event.ts,
                )
            )
            position = replace(position, handoff=pair)
        position, transition = _move(journey, position, event, profile.customer)
        if position is not None:
            positions[journey.name] = position
        if transition is not None:
            transitions.append(transition)
    channels = profile.channels
    updated = Profile(  # not replace(): see _touch
        profile.customer,
        positions,
        channels if event.channel in channels else channels | {event.channel},
        event.channel,
        _later(profile.last_event_at, event.ts),
        profile.anonymous,
    )
    return Applied(updated, transitions, handoffs)


def _rank(journey: Journey, position: Position) -> tuple[int, int, float]:
    """Order for merging: in a stage beats dropped, further beats earlier, then earlier entry."""
    name = position.stage or position.dropped_from
    index = journey.stage(name).index if name is not None and journey.has_stage(name) else -1
    return (0 if position.stage is None else 1, index, -position.entered_at)


def merge(
    into: Profile, device: Profile, event: EventLike, journeys: Sequence[Journey]
) -> tuple[Profile, list[Transition]]:
    """Fold an anonymous device's history into a customer (DESIGN: identity stitching).

    Per journey the further stage wins with its entry time (a tie goes to the
    earlier entry); channels unite. One ``merged`` transition per journey the
    device had a position in. Call ``expire`` on both at the event's time
    first, so a merge never revives a customer whose deadline had passed.
    """
    positions = dict(into.positions)
    transitions: list[Transition] = []
    for journey in journeys:
        theirs = device.positions.get(journey.name)
        if theirs is None:
            continue
        ours = positions.get(journey.name)
        better = ours is None or _rank(journey, theirs) > _rank(journey, ours)
        winner = theirs if better or ours is None else ours
        if ours is not None:
            latest = theirs if theirs.last_event_at > ours.last_event_at else ours
            winner = replace(
                winner,
                last_event_at=max(ours.last_event_at, theirs.last_event_at),
                last_channel=latest.last_channel,
            )
        positions[journey.name] = winner
        transitions.append(
            Transition(
                journey=journey.name,
                customer=into.customer,
                from_stage=theirs.stage,
                to_stage=winner.stage,
                kind=MERGED,
                channel=event.channel,
                event_id=event.event_id,
                occurred_at=event.ts,
                seconds_in_previous=0.0,
            )
        )
    newer = device if (device.last_event_at or 0.0) > (into.last_event_at or 0.0) else into
    merged = replace(
        into,
        positions=positions,
        channels=into.channels | device.channels,
        last_channel=newer.last_channel or into.last_channel,
        last_event_at=max(
            (t for t in (into.last_event_at, device.last_event_at) if t is not None), default=None
        ),
    )
    return merged, transitions


def replay(
    events: Iterable[EventLike], journeys: Sequence[Journey], until: float | None = None
) -> tuple[dict[str, Profile], list[Transition], int]:
    """The reference result for a stream of one identity each (no stitching).

    Profiles by customer, transitions, duplicates skipped; with ``until``, every
    deadline before it is swept at the end, as an idle partition's clock would.
    See ``pipeline.reference`` for the full reference with identity stitching.
    """
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
        step = apply_event(profiles.get(key) or Profile.empty(key), event, journeys)
        profiles[key] = step.profile
        transitions.extend(step.transitions)
    if until is not None:
        for key, profile in profiles.items():
            profiles[key], dropped = expire(profile, journeys, until)
            transitions.extend(dropped)
    return profiles, transitions, duplicates


__all__ = [
    "ADVANCED",
    "DROPPED",
    "DWELL_KINDS",
    "ENTERED",
    "ENTRY_KINDS",
    "MERGED",
    "REENGAGED",
    "REGRESSED",
    "Applied",
    "EventLike",
    "Feedback",
    "Handoff",
    "Position",
    "Profile",
    "Transition",
    "apply_event",
    "deadline",
    "expire",
    "merge",
    "next_deadline",
    "replay",
]
