"""Identity stitching: which profile an event belongs to, and which links it makes.

Pure, like the stage engine. An event carrying both a ``customer_id`` and an
``anonymous_id`` links the device to the customer: the anonymous history is
merged into the customer once, and later events under either id reach the
customer. The first customer to claim an anonymous id keeps it; a second
claim is refused and counted, never silently re-pointed, because re-pointing
would move history between two real people.

Broken clients send placeholder ids (``"null"``, ``"undefined"``, ``0``...).
Linking on them would merge every such visitor into one customer, so they
never link anyone and never name a profile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Lower-cased, quotes and surrounding space removed. All-zero ids ("0000",
# "00000000-0000-0000-0000-000000000000") are caught by a rule, not listed.
PLACEHOLDER_IDS = frozenset(
    {
        "",
        "anonymous",
        "anon",
        "null",
        "nil",
        "none",
        "undefined",
        "nan",
        "-1",
        "[object object]",
        "unknown",
        "n/a",
    }
)

# Outcomes of an event that carries both ids (``journey_identity_merges_total{result}``).
MERGED = "merged"  # the anonymous profile had history and was merged into the customer
LINKED = "linked"  # first link, the anonymous id had no history yet
ALREADY_LINKED = "already_linked"  # the same link again: nothing to do
REFUSED_CLAIMED = "claimed"  # the anonymous id already belongs to another customer
REFUSED_PLACEHOLDER = "placeholder"  # one of the two ids is a placeholder
MERGE_RESULTS = (MERGED, LINKED, ALREADY_LINKED, REFUSED_CLAIMED, REFUSED_PLACEHOLDER)


def is_placeholder(raw: str | None) -> bool:
    """True for ids that broken clients send instead of a real one."""
    if raw is None:
        return True
    text = raw.strip().strip("\"'`").strip().lower()
    # Or all zeros once "-", "_", " " and ":" are ignored (a nil UUID, "0000-00"):
    # stripping those characters leaves nothing only when they are all there is.
    return text in PLACEHOLDER_IDS or ("0" in text and not text.strip("0-_ :"))


@dataclass(frozen=True, slots=True, order=True)
class Ref:
    """A profile: a known customer, or an anonymous device not linked (yet)."""

    anonymous: bool
    id: str

    def __str__(self) -> str:
        return f"{'a' if self.anonymous else 'c'}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Ref:
        kind, _, ident = text.partition(":")
        if kind not in ("a", "c") or not ident:
            raise ValueError(f"not a profile reference: {text!r}")
        return cls(kind == "a", ident)


def customer(ident: str) -> Ref:
    return Ref(False, ident)


def anonymous(ident: str) -> Ref:
    return Ref(True, ident)


class Identified(Protocol):
    @property
    def event_id(self) -> str: ...
    @property
    def customer_id(self) -> str | None: ...
    @property
    def anonymous_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Usable:
    """An event's ids with placeholders removed."""

    customer_id: str | None
    anonymous_id: str | None
    placeholder: bool  # an id was present but a placeholder

    @property
    def empty(self) -> bool:
        return self.customer_id is None and self.anonymous_id is None


def usable_ids(customer_id: str | None, anonymous_id: str | None) -> Usable:
    c = None if is_placeholder(customer_id) else customer_id
    a = None if is_placeholder(anonymous_id) else anonymous_id
    placeholder = (customer_id is not None and c is None) or (
        anonymous_id is not None and a is None
    )
    return Usable(c, a, placeholder)


def routing_key(customer_id: str | None, anonymous_id: str | None) -> str | None:
    """The Kafka key a producer should use: the customer if known, else the device."""
    ids = usable_ids(customer_id, anonymous_id)
    return ids.customer_id if ids.customer_id is not None else ids.anonymous_id


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where one event goes: ``target`` always; ``absorb`` when it merges a device in."""

    target: Ref
    absorb: Ref | None = None
    result: str | None = None  # one of MERGE_RESULTS when the event carried both ids


@dataclass
class Resolution:
    """A batch resolved in arrival order."""

    events: list[Resolved] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # anonymous id -> customer, new here


def resolve(events: Sequence[Identified], links: Mapping[str, str]) -> Resolution:
    """Resolve a batch's events to profiles, in arrival order.

    ``links`` are the anonymous ids already linked (anonymous id → customer).
    An event seen later in the batch sees the links made earlier in it, so an
    anonymous event after a login in the same batch reaches the customer, as
    it would one batch later.
    """
    known = dict(links)
    out = Resolution()
    for event in events:
        ids = usable_ids(event.customer_id, event.anonymous_id)
        c, a = ids.customer_id, ids.anonymous_id
        both_given = event.customer_id is not None and event.anonymous_id is not None
        if c is not None and a is not None:
            owner = known.get(a)
            if owner is None:
                known[a] = c
                out.links[a] = c
                out.events.append(Resolved(customer(c), anonymous(a), MERGED))
            elif owner == c:
                out.events.append(Resolved(customer(c), None, ALREADY_LINKED))
            else:
                out.events.append(Resolved(customer(c), None, REFUSED_CLAIMED))
        elif c is not None:
            result = REFUSED_PLACEHOLDER if both_given else None
            out.events.append(Resolved(customer(c), None, result))
        elif a is not None:
            owner = known.get(a)
            target = customer(owner) if owner is not None else anonymous(a)
            result = REFUSED_PLACEHOLDER if both_given else None
            out.events.append(Resolved(target, None, result))
        else:
            # The validator rejects these; resolving them anyway must not link anyone.
            raise ValueError(f"event {event.event_id!r} has no usable customer or anonymous id")
    return out


def groups(resolved: Iterable[Resolved]) -> list[list[int]]:
    """Indexes of events that must be computed together, each list in arrival order.

    Events of one profile belong together, and a merge joins the customer's
    and the device's events into one group, since the merge reads both.
    """
    items = list(resolved)
    parent: dict[Ref, Ref] = {}

    def find(r: Ref) -> Ref:
        parent.setdefault(r, r)
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for item in items:
        root = find(item.target)
        if item.absorb is not None:
            other = find(item.absorb)
            if other != root:
                parent[other] = root
    by_root: dict[Ref, list[int]] = {}
    for i, item in enumerate(items):
        by_root.setdefault(find(item.target), []).append(i)
    return list(by_root.values())


__all__ = [
    "ALREADY_LINKED",
    "LINKED",
    "MERGED",
    "MERGE_RESULTS",
    "PLACEHOLDER_IDS",
    "REFUSED_CLAIMED",
    "REFUSED_PLACEHOLDER",
    "Ref",
    "Resolution",
    "Resolved",
    "Usable",
    "anonymous",
    "customer",
    "groups",
    "is_placeholder",
    "resolve",
    "routing_key",
    "usable_ids",
]
