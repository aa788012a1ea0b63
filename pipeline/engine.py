"""The whole pure step: resolved events + the profiles they touch → new profiles and records.

``stages`` moves one profile, ``identity`` decides which profile an event
reaches; this module runs them together in arrival order, so the worker (one
group of a batch at a time) and the reference replay (a whole stream) share
one implementation and cannot disagree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from pipeline.identity import LINKED, MERGED, Ref, Resolved, resolve
from pipeline.journeys import Journey
from pipeline.stages import (
    EventLike,
    Feedback,
    Handoff,
    Profile,
    Transition,
    apply_event,
    expire,
    merge,
)


class StitchedEvent(EventLike, Protocol):
    @property
    def customer_id(self) -> str | None: ...
    @property
    def anonymous_id(self) -> str | None: ...


@dataclass
class Slot:
    """One profile's stored state: live data, or a device linked into a customer."""

    profile: Profile | None = None
    linked_to: str | None = None  # anonymous profiles only: the customer that absorbed it


@dataclass
class Outcome:
    transitions: list[Transition] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    merge_results: Counter[str] = field(default_factory=Counter)
    changed: set[Ref] = field(default_factory=set)


def _number(value: object, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if math.isnan(number) or number < low or number > high:
        return None
    return number


def feedback_of(event: EventLike, profile: Profile, journeys: Sequence[Journey]) -> list[Feedback]:
    """Survey answers in ``properties`` (csat 1–5, nps 0–10), placed at the customer's stage."""
    csat = _number(event.properties.get("csat"), 1.0, 5.0)
    nps = _number(event.properties.get("nps"), 0.0, 10.0)
    if csat is None and nps is None:
        return []
    out = []
    for journey in journeys:
        position = profile.positions.get(journey.name)
        stage = position.stage if position is not None and position.stage is not None else ""
        out.append(
            Feedback(
                journey.name,
                stage,
                event.channel,
                profile.customer,
                event.event_id,
                event.ts,
                csat,
                nps,
            )
        )
    return out


def run_events(
    slots: MutableMapping[Ref, Slot],
    items: Iterable[tuple[StitchedEvent, Resolved]],
    journeys: Sequence[Journey],
    outcome: Outcome | None = None,
) -> Outcome:
    """Apply events, already resolved and deduplicated, to ``slots`` in place."""
    out = outcome if outcome is not None else Outcome()
    for event, resolved in items:
        target = resolved.target
        slot = slots.setdefault(target, Slot())
        profile = slot.profile or Profile.empty(target.id, target.anonymous)
        if resolved.absorb is not None:
            device_slot = slots.setdefault(resolved.absorb, Slot())
            device = device_slot.profile
            result = LINKED
            if device is not None:
                device, device_drops = expire(device, journeys, event.ts)
                out.transitions.extend(device_drops)
                profile, own_drops = expire(profile, journeys, event.ts)
                out.transitions.extend(own_drops)
                profile, merged = merge(profile, device, event, journeys)
                out.transitions.extend(merged)
                result = MERGED
            out.merge_results[result] += 1
            slots[resolved.absorb] = Slot(None, target.id)
            out.changed.add(resolved.absorb)
        elif resolved.result is not None:
            out.merge_results[resolved.result] += 1
        step = apply_event(profile, event, journeys)
        slots[target] = Slot(step.profile, slot.linked_to)
        out.changed.add(target)
        out.transitions.extend(step.transitions)
        out.handoffs.extend(step.handoffs)
        out.feedback.extend(feedback_of(event, step.profile, journeys))
    return out


def sweep(
    slots: MutableMapping[Ref, Slot], refs: Iterable[Ref], journeys: Sequence[Journey], now: float
) -> list[Transition]:
    """Drop the given profiles wherever their deadline passed before ``now``."""
    dropped: list[Transition] = []
    for ref in refs:
        slot = slots.get(ref)
        if slot is None or slot.profile is None:
            continue
        profile, transitions = expire(slot.profile, journeys, now)
        if transitions:
            slots[ref] = replace(slot, profile=profile)
            dropped.extend(transitions)
    return dropped


@dataclass
class Reference:
    """What a stream of events must leave behind: the answer the worker is checked against."""

    slots: dict[Ref, Slot]
    outcome: Outcome
    duplicates: int

    def stage_customers(self) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        for slot in self.slots.values():
            if slot.profile is None:
                continue
            for journey, position in slot.profile.positions.items():
                if position.stage is not None:
                    counts[(journey, position.stage)] += 1
        return counts

    def kinds(self) -> Counter[str]:
        return Counter(t.kind for t in self.outcome.transitions)


def replay(
    events: Iterable[StitchedEvent], journeys: Sequence[Journey], until: float | None = None
) -> Reference:
    """Replay a stream one event at a time, with identity stitching.

    With ``until``, every deadline before it is swept at the end, as the
    worker's sweep does once the partition clock passes it.
    """
    slots: dict[Ref, Slot] = {}
    links: dict[str, str] = {}
    seen: set[str] = set()
    outcome = Outcome()
    duplicates = 0
    for event in events:
        if event.event_id in seen:
            duplicates += 1
            continue
        seen.add(event.event_id)
        resolution = resolve([event], links)
        links.update(resolution.links)
        run_events(slots, [(event, resolution.events[0])], journeys, outcome)
    if until is not None:
        outcome.transitions.extend(sweep(slots, list(slots), journeys, until))
    return Reference(slots, outcome, duplicates)


def links_of(slots: Mapping[Ref, Slot]) -> dict[str, str]:
    return {ref.id: s.linked_to for ref, s in slots.items() if s.linked_to is not None}


__all__ = [
    "Outcome",
    "Reference",
    "Slot",
    "feedback_of",
    "links_of",
    "replay",
    "run_events",
    "sweep",
]
