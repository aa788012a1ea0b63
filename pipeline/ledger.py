"""The counts behind the business metrics, committed to Redis with the state they describe.

In-process counters lose their counts when a worker dies, and a batch replayed
after the crash would count again. So every count a dashboard or an alert
adds up (events by outcome, entries, exits, drop-offs, transitions, hand-offs,
identity merges, rejections) is a *tally*: a field → increment map that the
Redis commit script adds to ``jt:ledger:<partition>`` in the same atomic step
as the state change it counts. A replayed message is recognised before it is
tallied (its event mark, or for a rejected or duplicate message the
``jt:x:<partition>:<offset>`` mark written with its tally), so each message is
counted exactly once. The worker that owns partition 0 exports the totals
(see :class:`pipeline.metrics.LedgerCollector`).

Pure: no I/O. Histograms (lag, lateness, time in stage) stay per process:
they describe this process's work, and a replay does not change a customer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Final

from pipeline.engine import Outcome
from pipeline.stages import DROPPED, DWELL_KINDS, ENTRY_KINDS, REGRESSED

SEP: Final = "\x1f"

#: family → (Prometheus name without ``_total``, label names, help)
FAMILIES: Final[dict[str, tuple[str, tuple[str, ...], str]]] = {
    "events": ("journey_events", ("channel", "outcome"), "Events by channel and outcome"),
    "rejected": ("journey_rejected_events", ("reason",), "Rejected events by reason code"),
    "entries": (
        "journey_stage_entries",
        ("journey", "stage", "channel"),
        "Entries into a stage",
    ),
    "exits": (
        "journey_stage_exits",
        ("journey", "stage", "channel", "outcome"),
        "Exits from a stage",
    ),
    "transitions": ("journey_transitions", ("journey", "kind"), "Transitions by journey and kind"),
    "dropoffs": (
        "journey_dropoffs",
        ("journey", "stage", "channel"),
        "Customers dropped at a stage, by the channel of their last event there",
    ),
    "handoffs": (
        "journey_channel_handoffs",
        ("journey", "from_channel", "to_channel"),
        "Consecutive events of one customer on different channels",
    ),
    "handoff_outcomes": (
        "journey_handoff_outcomes",
        ("journey", "from_channel", "to_channel", "outcome"),
        "How the stage exit after a hand-off went (advanced or dropped)",
    ),
    "merges": (
        "journey_identity_merges",
        ("result",),
        "Events carrying both ids, by what the link did (merged, linked, already_linked) "
        "or why it was refused (claimed, placeholder)",
    ),
}

# Rejected events carry no trustworthy channel; this label keeps the series bounded.
UNKNOWN_CHANNEL: Final = "unknown"


def series(family: str, *labels: str) -> str:
    """The ledger field of one metric series: the family, then its label values."""
    assert len(labels) == len(FAMILIES[family][1]), (family, labels)
    return SEP.join((family, *labels))


def parse(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(family, label values) of a ledger field; None for one this version does not know."""
    family, *labels = name.split(SEP)
    spec = FAMILIES.get(family)
    if spec is None or len(labels) != len(spec[1]):
        return None
    return family, tuple(labels)


def accepted(channels: Iterable[str]) -> Counter[str]:
    return Counter(series("events", c, "accepted") for c in channels)


def duplicate(channel: str) -> Counter[str]:
    return Counter({series("events", channel, "duplicate"): 1})


def rejected(code: str) -> Counter[str]:
    return Counter({series("events", UNKNOWN_CHANNEL, "rejected"): 1, series("rejected", code): 1})


def outcome(result: Outcome) -> Counter[str]:
    """What a group's (or a sweep's) transitions, hand-offs and merges add to the metrics."""
    tally: Counter[str] = Counter()
    for t in result.transitions:
        tally[series("transitions", t.journey, t.kind)] += 1
        if t.kind in ENTRY_KINDS and t.to_stage is not None:
            tally[series("entries", t.journey, t.to_stage, t.channel)] += 1
        if t.kind in DWELL_KINDS and t.from_stage is not None and t.kind != REGRESSED:
            tally[series("exits", t.journey, t.from_stage, t.channel, t.kind)] += 1
            if t.handoff_from is not None and t.handoff_to is not None:
                tally[
                    series("handoff_outcomes", t.journey, t.handoff_from, t.handoff_to, t.kind)
                ] += 1
        if t.kind == DROPPED and t.from_stage is not None:
            tally[series("dropoffs", t.journey, t.from_stage, t.channel)] += 1
    for h in result.handoffs:
        tally[series("handoffs", h.journey, h.from_channel, h.to_channel)] += 1
    for result_name, n in result.merge_results.items():
        tally[series("merges", result_name)] += n
    return tally
