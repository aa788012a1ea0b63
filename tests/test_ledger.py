"""The business metrics' tallies: what each outcome adds, and how they are exported."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import ledger
from pipeline.engine import Outcome
from pipeline.metrics import Metrics
from pipeline.stages import Handoff, Transition


def transition(kind: str, from_stage: str | None, to_stage: str | None, **kw: str) -> Transition:
    return Transition(
        "retail", "c1", from_stage, to_stage, kind, kw.get("channel", "web"), "e1", 0.0, 5.0,
        kw.get("handoff_from"), kw.get("handoff_to"),
    )  # fmt: skip


def test_each_kind_adds_what_the_metric_contract_says() -> None:
    result = Outcome(
        transitions=[
            transition("entered", None, "awareness"),
            transition(
                "advanced",
                "awareness",
                "purchase",
                channel="app",
                handoff_from="web",
                handoff_to="app",
            ),
            transition("dropped", "purchase", None, channel="app"),
            transition("reengaged", None, "purchase", channel="store"),
            transition("regressed", "purchase", "awareness"),
            transition("merged", None, "purchase"),
        ],
        handoffs=[Handoff("retail", "c1", "awareness", "web", "app", "e1", 0.0)],
        merge_results=Counter({"merged": 1, "claimed": 2}),
    )
    s = ledger.series
    assert ledger.outcome(result) == Counter(
        {
            s("transitions", "retail", "entered"): 1,
            s("transitions", "retail", "advanced"): 1,
            s("transitions", "retail", "dropped"): 1,
            s("transitions", "retail", "reengaged"): 1,
            s("transitions", "retail", "regressed"): 1,
            s("transitions", "retail", "merged"): 1,
            s("entries", "retail", "awareness", "web"): 2,  # entered, regressed into it
            s("entries", "retail", "purchase", "app"): 1,
            s("entries", "retail", "purchase", "store"): 1,
            s("exits", "retail", "awareness", "app", "advanced"): 1,
            s("exits", "retail", "purchase", "app", "dropped"): 1,
            s("handoff_outcomes", "retail", "web", "app", "advanced"): 1,
            s("dropoffs", "retail", "purchase", "app"): 1,
            s("handoffs", "retail", "web", "app"): 1,
            s("merges", "merged"): 1,
            s("merges", "claimed"): 2,
        }
    )


@given(
    st.sampled_from(sorted(ledger.FAMILIES)),
    st.lists(st.text(st.characters(blacklist_characters="\x1f"), max_size=12), max_size=4),
)
def test_series_and_parse_round_trip(family: str, values: list[str]) -> None:
    arity = len(ledger.FAMILIES[family][1])
    labels = (values + [""] * arity)[:arity]
    assert ledger.parse(ledger.series(family, *labels)) == (family, tuple(labels))


def test_fields_of_another_version_are_ignored() -> None:
    assert ledger.parse("no_such_family\x1fx") is None
    assert ledger.parse("events\x1fonly_one_label") is None


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_only_the_exporting_worker_shows_the_totals() -> None:
    """Summing over workers counts once: the others export the families with no series."""
    metrics = Metrics(lambda: iter(()))
    metrics.ledger.totals = {
        ledger.series("events", "web", "accepted"): 7,
        ledger.series("dropoffs", "retail", "purchase", "app"): 2,
        "from_a_newer_version\x1fx": 1,
    }
    assert not any(name.startswith("journey_events") for name, _ in samples(metrics))
    metrics.ledger.exporting = True
    got = samples(metrics)
    assert got[("journey_events_total", (("channel", "web"), ("outcome", "accepted")))] == 7
    key = (("channel", "app"), ("journey", "retail"), ("stage", "purchase"))
    assert got[("journey_dropoffs_total", key)] == 2
