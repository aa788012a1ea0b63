"""`journey report` computed by ClickHouse (chDB) from hand-made rows with hand-computed answers.

Rows go in through ``ClickHouseSink`` (start, add_*, flush) exactly as the
worker writes them; the queries run on the sink's own client (``sink.run``),
since chDB holds one data directory per process.
"""

from __future__ import annotations

import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
from click.testing import CliRunner
from rich.console import Console

from pipeline.cli import cli
from pipeline.consistency import consistency_index
from pipeline.embedded import free_port
from pipeline.journeys import Journey, default_journeys
from pipeline.report import (
    CONSISTENCY_SQL,
    REPORT_END,
    REPORT_START,
    consistency,
    consistency_sql,
    dropoff,
    feedback,
    funnel,
    handoffs,
    human_duration,
    journey_report,
    render,
    time_in_stage,
)
from pipeline.sinks.clickhouse import (
    DDL_DIR,
    ClickHouseSink,
    feedback_row,
    handoff_row,
    transition_row,
)
from pipeline.stages import Feedback, Handoff, Transition

T0 = 1_700_000_000.0
HOUR = 3_600.0
DAY = 86_400.0
(RETAIL,) = default_journeys()
STAGES = RETAIL.stage_names


def t(customer: str, from_stage: str | None, to_stage: str, kind: str, channel: str,
      at: float) -> Transition:  # fmt: skip
    return Transition("retail", customer, from_stage, to_stage, kind, channel, f"{customer}-{at}",
                      at, 0.0)  # fmt: skip


def exit_(
    customer: str,
    from_stage: str,
    kind: str,
    channel: str,
    at: float,
    seconds: float,
    handoff: tuple[str, str] | None = None,
    journey: str = "retail",
) -> Transition:
    """An exit as the engine writes it: a drop has no to_stage and no event."""
    to_stage = None if kind == "dropped" else _next(from_stage, kind)
    return Transition(
        journey,
        customer,
        from_stage,
        to_stage,
        kind,
        channel,
        "" if kind == "dropped" else f"{customer}-{at}",
        at,
        seconds,
        handoff[0] if handoff else None,
        handoff[1] if handoff else None,
    )


def _next(stage: str, kind: str) -> str:
    i = STAGES.index(stage)
    return STAGES[i - 1] if kind == "regressed" else STAGES[min(i + 1, len(STAGES) - 1)]


async def _sink(chdb_path: Path) -> ClickHouseSink:
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    return sink


@pytest.mark.services
async def test_funnel_counts_skips_as_reached_and_splits_by_channel(chdb_path: Path) -> None:
    """A walk-in purchase counts as reaching awareness and consideration too."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    rows = [
        t("a", None, "awareness", "entered", "web", 1_700_000_000),
        t("a", "awareness", "consideration", "advanced", "app", 1_700_000_100),
        t("b", None, "awareness", "entered", "web", 1_700_000_000),
        t("c", None, "purchase", "entered", "store", 1_700_000_000),
        t("d", None, "consideration", "entered", "email", 1_700_000_000),
    ]
    sink.add_transitions([transition_row(r) for r in rows])
    await sink.flush()
    await sink.close()

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}")

    (journey,) = default_journeys()
    result = funnel(client, journey, REPORT_START, REPORT_END)
    by_stage = {s.stage: s for s in result.stages}
    assert [by_stage[n].entered for n in journey.stage_names] == [2, 2, 1, 0, 0]
    assert [by_stage[n].reached for n in journey.stage_names] == [4, 3, 1, 0, 0]
    assert by_stage["awareness"].conversion is None
    assert by_stage["consideration"].conversion == pytest.approx(3 / 4)
    assert by_stage["purchase"].conversion == pytest.approx(1 / 3)
    assert by_stage["retention"].conversion == 0.0
    assert by_stage["consideration"].by_channel == {"app": 1, "email": 1}
    assert by_stage["purchase"].by_channel == {"store": 1}
    client.close()


# Exits of six customers, and moves that are not exits (entered, reengaged, merged,
# another journey) which no exit figure may count.
EXITS = [
    exit_("c1", "awareness", "advanced", "web", T0 + 100, 100),
    exit_("c2", "awareness", "advanced", "web", T0 + 3_700, HOUR, ("app", "web")),
    exit_("c3", "awareness", "dropped", "web", T0 + 7 * DAY, 7 * DAY, ("store", "web")),
    exit_("c4", "awareness", "dropped", "app", T0 + 7 * DAY + 5, 7 * DAY, ("web", "app")),
    exit_("c5", "awareness", "advanced", "app", T0 + 7_300, 2 * HOUR, ("web", "app")),
    exit_("c1", "consideration", "regressed", "app", T0 + 400, 300, ("web", "app")),
    exit_("c2", "consideration", "advanced", "store", T0 + 8_500, 4_800, ("web", "store")),
    exit_("x1", "awareness", "dropped", "web", T0 + 7 * DAY, 7 * DAY, journey="other"),
    Transition("retail", "c6", None, "awareness", "entered", "web", "c6-e", T0, 0.0),
    Transition(
        "retail",
        "c3",
        "awareness",
        "consideration",
        "reengaged",
        "email",
        "c3-r",
        T0 + 8 * DAY,
        DAY,
    ),
    Transition("retail", "c7", "awareness", "consideration", "merged", "web", "c7-m", T0, 0.0),
]
HANDOFFS = [
    Handoff("retail", "c2", "awareness", "app", "web", "c2-h", T0 + 150),
    Handoff("retail", "c3", "awareness", "store", "web", "c3-h", T0 + 50),
    Handoff("retail", "c4", "awareness", "web", "app", "c4-h", T0 + 60),
    Handoff("retail", "c5", "awareness", "web", "app", "c5-h", T0 + 70),
    Handoff("retail", "c2", "consideration", "web", "store", "c2-h2", T0 + 4_000),
    Handoff("other", "x1", "awareness", "web", "app", "x1-h", T0 + 80),
]


async def _insert_exits(sink: ClickHouseSink) -> None:
    sink.add_transitions([transition_row(r) for r in EXITS])
    sink.add_handoffs([handoff_row(h) for h in HANDOFFS])
    await sink.flush()


def _check_exit_figures(client: Any) -> None:
    d = {s.stage: s for s in dropoff(client, RETAIL, REPORT_START, REPORT_END).stages}
    assert list(d) == list(STAGES)
    assert d["awareness"].total.to_dict() == {
        "exits": 5,
        "advanced": 3,
        "dropped": 2,
        "dropoff": pytest.approx(0.4),
    }
    assert {c: (e.exits, e.dropped) for c, e in d["awareness"].by_channel.items()} == {
        "app": (2, 1),
        "web": (3, 1),
    }
    assert d["awareness"].by_channel["web"].dropoff == pytest.approx(1 / 3)
    assert (d["consideration"].total.exits, d["consideration"].total.dropoff) == (1, 0.0)
    # Nobody reached purchase: no exits, no ratio rather than a division by zero.
    assert d["purchase"].total.to_dict() == {
        "exits": 0,
        "advanced": 0,
        "dropped": 0,
        "dropoff": None,
    }
    assert d["purchase"].by_channel == {}

    ts = {s.stage: s for s in time_in_stage(client, RETAIL, REPORT_START, REPORT_END).stages}
    aware = ts["awareness"]
    # overall [100, 3600, 7200, 7d, 7d]: linear interpolation between the sorted values
    assert aware.overall.to_dict() == {"count": 5, "p50": 7_200, "p90": 7 * DAY, "p99": 7 * DAY}
    adv = aware.by_outcome["advanced"]  # [100, 3600, 7200]
    assert (adv.count, adv.p50) == (3, HOUR)
    assert adv.p90 == pytest.approx(HOUR + 0.8 * HOUR)
    assert adv.p99 == pytest.approx(HOUR + 0.98 * HOUR)
    assert aware.by_outcome["dropped"].to_dict() == {
        "count": 2,
        "p50": 7 * DAY,
        "p90": 7 * DAY,
        "p99": 7 * DAY,
    }
    cons = ts["consideration"]  # regressed 300 and advanced 4800
    assert cons.overall.count == 2
    assert (cons.overall.p50, cons.overall.p90) == pytest.approx((2_550, 300 + 0.9 * 4_500))
    assert cons.by_outcome["regressed"].p50 == 300
    assert cons.by_outcome["dropped"].to_dict() == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
    }
    assert ts["purchase"].overall.p50 is None

    h = handoffs(client, RETAIL, REPORT_START, REPORT_END)
    assert [(p.from_channel, p.to_channel, p.handoffs, p.advanced, p.dropped) for p in h.pairs] == [
        ("web", "app", 2, 1, 1),  # the regression with this hand-off is not an exit
        ("app", "web", 1, 1, 0),
        ("store", "web", 1, 0, 1),
        ("web", "store", 1, 1, 0),
    ]
    assert h.pairs[0].progression == 0.5


@pytest.mark.services
async def test_dropoff_time_in_stage_and_handoffs(chdb_path: Path) -> None:
    """Exits, drop-off, dwell percentiles and hand-offs match hand counts, and survive a replay."""
    sink = await _sink(chdb_path)
    await _insert_exits(sink)
    await sink.run(_check_exit_figures)
    await _insert_exits(sink)  # a replayed batch
    await sink.run(_check_exit_figures)

    def by_channel_and_period(client: Any) -> None:
        d = {s.stage: s for s in dropoff(client, RETAIL, REPORT_START, REPORT_END, "app").stages}
        assert (d["awareness"].total.exits, d["awareness"].total.dropped) == (2, 1)
        assert list(d["awareness"].by_channel) == ["app"]
        assert d["consideration"].total.exits == 0
        ts = time_in_stage(client, RETAIL, REPORT_START, REPORT_END, "app").stages
        assert ts[0].overall.p50 == pytest.approx((2 * HOUR + 7 * DAY) / 2)
        assert [
            (p.from_channel, p.to_channel)
            for p in handoffs(client, RETAIL, REPORT_START, REPORT_END, "store").pairs
        ] == [("store", "web"), ("web", "store")]

        # The first day: the drops (at their 7-day deadlines) are not in it yet.
        day1 = datetime.fromtimestamp(T0 + DAY, UTC)
        d = {s.stage: s for s in dropoff(client, RETAIL, REPORT_START, day1).stages}
        assert (d["awareness"].total.exits, d["awareness"].total.dropped) == (3, 0)

        # An empty period: everything zero or absent, nothing raises.
        later = datetime.fromtimestamp(T0 + 30 * DAY, UTC)
        empty = journey_report(client, RETAIL, later, REPORT_END)
        assert all(s["exits"] == 0 and s["dropoff"] is None for s in empty["dropoff"]["stages"])
        assert all(s["count"] == 0 for s in empty["time_in_stage"]["stages"])
        assert empty["handoffs"]["pairs"] == []
        assert all(s["index"] is None for s in empty["consistency"]["stages"])
        assert empty["feedback"]["csat"] is None

    await sink.run(by_channel_and_period)
    await sink.close()


def _exit_rows(
    journey: str, counts: dict[str, dict[str, tuple[int, int]]], at: float = T0
) -> list[Transition]:
    """``advanced`` exits then drops, one customer each, for per-stage (advanced, exits)."""
    rows = []
    for stage, by_channel in counts.items():
        for channel, (advanced, exits) in by_channel.items():
            for i in range(exits):
                kind = "advanced" if i < advanced else "dropped"
                who = f"{stage}-{channel}-{i}"
                rows.append(exit_(who, stage, kind, channel, at + i, 60.0, journey=journey))
    return rows


HAND_MADE = {
    # ratios .75, .25, .8; email under the minimum of 20 → 1 − √(0.185/3)/0.6
    "awareness": {"web": (30, 40), "app": (10, 40), "store": (20, 25), "email": (5, 5)},
    "consideration": {"web": (0, 20), "app": (0, 25)},  # μ = 0 → 1
    "purchase": {"web": (15, 20), "app": (5, 19)},  # one channel left → no index
    "retention": {"web": (10, 20), "app": (15, 30)},  # equal ratios → 1
}
HAND_MADE_INDEX = {
    "awareness": 0.586120433,
    "consideration": 1.0,
    "purchase": None,
    "retention": 1.0,
    "advocacy": None,
}


@pytest.mark.services
async def test_consistency_in_python_and_in_sql_agree(chdb_path: Path) -> None:
    """Both versions of the index give the hand-computed values and agree on random data."""
    clamp = Journey("clamp", False, RETAIL.stages)
    rng = random.Random(4)
    randoms = {
        Journey(f"random-{k}", False, RETAIL.stages): {
            stage: {
                c: (rng.randint(0, n), n)
                for c in ("web", "app", "store", "email")
                for n in [rng.choice([0, 3, 19, 20, 21, 35])]
            }
            for stage in STAGES
        }
        for k in range(4)
    }
    rows = _exit_rows("retail", HAND_MADE)
    rows += _exit_rows("clamp", {"awareness": {"web": (20, 20), "app": (0, 20), "store": (0, 20)}})
    for j, counts in randoms.items():
        rows += _exit_rows(j.name, counts)
    sink = await _sink(chdb_path)
    for _ in range(2):  # the second time is a replay
        sink.add_transitions([transition_row(r) for r in rows])
        await sink.flush()

    def check(client: Any) -> None:
        py = consistency(client, RETAIL, REPORT_START, REPORT_END)
        sql = consistency_sql(client, RETAIL, REPORT_START, REPORT_END)
        for s in py.stages:
            expected = HAND_MADE_INDEX[s.stage]
            for got in (s.index, sql[s.stage]):
                if expected is None:
                    assert got is None, s.stage
                else:
                    assert got == pytest.approx(expected, abs=1e-6), s.stage
        aware = py.stages[0]
        assert aware.counts["email"] == (5, 5)
        assert "email" not in aware.ratios
        assert aware.to_dict()["by_channel"]["email"] == {"advanced": 5, "exits": 5, "ratio": None}
        assert consistency_sql(client, clamp, REPORT_START, REPORT_END)["awareness"] == 0.0
        # With a minimum of 5, email (ratio 1) joins and changes the index.
        with_email = consistency(client, RETAIL, REPORT_START, REPORT_END, min_exits=5)
        assert with_email.stages[0].index == pytest.approx(
            consistency_index(HAND_MADE["awareness"], 5), abs=1e-9
        )
        assert with_email.stages[0].index != pytest.approx(HAND_MADE_INDEX["awareness"])

        for j, counts in randoms.items():
            for minimum in (0, 1, 20, 21, 40):
                py = consistency(client, j, REPORT_START, REPORT_END, minimum)
                sql = consistency_sql(client, j, REPORT_START, REPORT_END, minimum)
                for s in py.stages:
                    truth = consistency_index(counts[s.stage], minimum)
                    assert (s.index is None) == (sql[s.stage] is None) == (truth is None)
                    if truth is not None:
                        assert s.index == pytest.approx(truth, abs=1e-9)
                        assert sql[s.stage] == pytest.approx(truth, abs=1e-6)

    await sink.run(check)
    rows_sql = await sink.query(
        CONSISTENCY_SQL,
        {"journey": "retail", "since": REPORT_START, "until": REPORT_END, "min_exits": 20},
    )
    assert {r[0]: r[1] for r in rows_sql} == {
        "awareness": 3,
        "consideration": 2,
        "purchase": 1,
        "retention": 2,
    }
    await sink.close()


def fb(
    stage: str, channel: str, n: int, csat: float | None, nps: float | None, journey: str = "retail"
) -> Feedback:
    return Feedback(journey, stage, channel, f"f{n}", f"fe{n}", T0 + n, csat, nps)


FEEDBACK = [
    fb("awareness", "web", 1, 4, None),
    fb("awareness", "web", 2, 5, 10),
    fb("awareness", "web", 3, None, 9),
    fb("awareness", "web", 4, None, 3),
    fb("awareness", "app", 5, 2, None),
    fb("awareness", "app", 6, None, 7),  # app has passives only: NPS 0
    fb("awareness", "app", 7, None, 8),
    fb("consideration", "email", 8, None, 0),
    fb("", "web", 9, 3, None),  # answered while in no stage
    fb("awareness", "web", 10, 1, 0, journey="other"),
]


@pytest.mark.services
async def test_csat_and_nps_by_stage_and_channel(chdb_path: Path) -> None:
    """CSAT is the mean answer, NPS % promoters − % detractors; no answers give no score."""
    sink = await _sink(chdb_path)
    for _ in range(2):  # the second time is a replay
        sink.add_feedback([feedback_row(f) for f in FEEDBACK])
        await sink.flush()
    report = await sink.run(lambda c: feedback(c, RETAIL, REPORT_START, REPORT_END))
    stages = {s.stage: s for s in report.stages}
    assert list(stages) == [*STAGES, None]
    aware = stages["awareness"]
    assert (aware.total.csat, aware.total.csat_responses) == (pytest.approx(11 / 3), 3)
    assert (aware.total.nps, aware.total.nps_responses) == (pytest.approx(20.0), 5)
    assert aware.by_channel["web"].to_dict() == {
        "csat": 4.5,
        "csat_responses": 2,
        "nps": pytest.approx(100 / 3),
        "nps_responses": 3,
        "promoters": 2,
        "detractors": 1,
    }
    assert (aware.by_channel["app"].csat, aware.by_channel["app"].nps) == (2.0, 0.0)
    assert "store" not in aware.by_channel  # a channel without surveys has no row
    assert stages["consideration"].by_channel["email"].csat is None
    assert stages["consideration"].by_channel["email"].nps == -100.0
    assert stages["purchase"].total.to_dict()["csat"] is None
    assert stages["purchase"].total.nps is None
    assert stages[None].by_channel["web"].csat == 3.0
    assert {c: (s.csat, s.nps) for c, s in report.by_channel.items()} == {
        "app": (2.0, 0.0),
        "email": (None, -100.0),
        "web": (4.0, pytest.approx(100 / 3)),
    }
    assert (report.total.csat, report.total.nps, report.total.nps_responses) == (3.5, 0.0, 6)
    only_store = await sink.run(lambda c: feedback(c, RETAIL, REPORT_START, REPORT_END, "store"))
    assert only_store.total.csat is None and only_store.by_channel == {}
    await sink.close()


@pytest.mark.services
async def test_journey_report_renders_and_the_command_prints_it(
    chdb_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every section is in the dict, JSON-ready; tables render; `journey report --json` has them."""
    sink = await _sink(chdb_path)
    await _insert_exits(sink)
    sink.add_feedback([feedback_row(f) for f in FEEDBACK])
    await sink.flush()
    report = await sink.run(lambda c: journey_report(c, RETAIL, REPORT_START, REPORT_END))
    await sink.close()

    assert set(report) == {
        "journey",
        "stages",
        "since",
        "until",
        "dropoff",
        "time_in_stage",
        "handoffs",
        "consistency",
        "feedback",
    }
    assert orjson.loads(orjson.dumps(report)) == report
    console = Console(record=True, width=200)
    render([report], ["web", "app", "store", "email"], console)
    text = console.export_text()
    for title in ("Funnel", "Drop-off", "Time in stage", "hand-offs", "consistency", "NPS"):
        assert title.lower() in text.lower(), title
    assert "7d 0h" in text and "1h 0m" in text
    assert "web → app" in text
    assert "40.0%" in text  # awareness drop-off

    monkeypatch.setenv("JOURNEY_CLICKHOUSE_DSN", f"chdb://{chdb_path}")
    monkeypatch.setenv("JOURNEY_WEB_PORT", str(free_port()))  # no worker there to ask
    monkeypatch.delenv("JOURNEY_JOURNEYS", raising=False)
    result = CliRunner().invoke(cli, ["report", "--json"])
    assert result.exit_code == 0, result.output
    (printed,) = orjson.loads(result.stdout)
    assert printed["dropoff"] == report["dropoff"]
    assert printed["feedback"] == report["feedback"]
    table = CliRunner().invoke(cli, ["report", "--since", "2099-01-01"])
    assert table.exit_code == 0, table.output
    assert "No transitions in this period yet." in table.output
    assert "no hand-offs in this period" in table.output
    assert "no survey answers in this period" in table.output


def test_render_copes_with_a_funnel_only_report_and_empty_sections() -> None:
    """An older worker's funnel-only answer and a period without data both render cleanly."""
    stages = [
        {"stage": s, "entered": 0, "reached": 0, "conversion": None, "by_channel": {}}
        for s in STAGES
    ]
    console = Console(record=True, width=160)
    render([{"journey": "retail", "stages": stages}], ["web"], console)
    assert "No transitions in this period yet." in console.export_text()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "–"),
        (0, "0s"),
        (0.4, "0s"),
        (59.6, "1m 0s"),
        (75, "1m 15s"),
        (3 * HOUR + 12 * 60 + 40, "3h 12m"),
        (DAY, "1d 0h"),
        (9 * DAY + 5 * HOUR + 59, "9d 5h"),
    ],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    """Durations show their two largest units; no value shows a dash."""
    assert human_duration(seconds) == text


@pytest.mark.services
async def test_report_on_tables_of_an_older_version_says_what_to_do(
    chdb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database without the 002 tables gets a readable error, not a traceback."""
    only_001 = tmp_path / "ddl"
    only_001.mkdir()
    shutil.copy(DDL_DIR / "001_core_tables.sql", only_001)
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start(only_001)
    await sink.close()
    monkeypatch.setenv("JOURNEY_CLICKHOUSE_DSN", f"chdb://{chdb_path}")
    monkeypatch.setenv("JOURNEY_WEB_PORT", str(free_port()))
    result = CliRunner().invoke(cli, ["report"])
    assert result.exit_code == 1
    assert "start a worker once" in result.output
