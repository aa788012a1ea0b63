"""The ClickHouse sink against embedded chDB (same client API and SQL as a server)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import orjson
import pytest
from clickhouse_connect.datatypes.registry import get_from_name
from hypothesis import given
from hypothesis import strategies as st

from pipeline.events import Rejection, Validator
from pipeline.sinks.clickhouse import (
    DDL_DIR,
    ClickHouseSink,
    encode_rows,
    epoch_ms,
    event_row,
    feedback_row,
    from_outbox,
    handoff_row,
    rejected_row,
    split_statements,
    transition_row,
)
from pipeline.stages import Feedback, Handoff, Transition

pytestmark = pytest.mark.services

EVENT = (
    b'{"event_id":"e1\'; DROP TABLE journey.events; --","occurred_at":"2026-11-01T10:00:00+01:00",'
    b'"customer_id":"c1","channel":"web","event_type":"page_view","schema_version":1,'
    b'"properties":{"campaign":"x\\u0027) OR 1=1"}}'
)


async def test_migrations_are_idempotent_and_rows_land(chdb_path: Path) -> None:
    """DDL applies twice without error; events, transitions and rejects are stored as given."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    await sink.start()
    event = Validator().decode(EVENT, now=datetime(2026, 11, 1, tzinfo=UTC).timestamp())
    assert not isinstance(event, Rejection), event
    sink.add_events([event_row(event, 1.0)])
    sink.add_transitions(
        [
            transition_row(
                Transition(
                    "retail",
                    "c1",
                    None,
                    "awareness",
                    "entered",
                    "web",
                    event.event_id,
                    event.ts,
                    0.0,
                )
            )
        ]
    )
    sink.add_rejected(
        [
            rejected_row(
                Rejection("not valid JSON", "not_json", b"\xff{"), "journey.events", 0, 7, 1.0
            )
        ]
    )
    await sink.flush()
    await sink.flush()  # nothing buffered: a no-op
    rows = await sink.query("SELECT event_id, customer, occurred_at FROM journey.events")
    assert rows == [("e1'; DROP TABLE journey.events; --", "c1", datetime(2026, 11, 1, 9, 0))]
    assert await sink.query("SELECT to_stage, kind FROM journey.transitions") == [
        ("awareness", "entered")
    ]
    assert await sink.query("SELECT offset, raw, code FROM journey.rejected_events") == [
        (7, "\\xff{", "not_json")
    ]
    await sink.close()


async def test_a_replayed_batch_is_not_counted_twice(chdb_path: Path) -> None:
    """The same rows inserted again collapse onto the first ones (FINAL)."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    t = Transition("retail", "c1", "awareness", "purchase", "advanced", "store", "e2", 5.0, 4.0)
    for _ in range(2):
        sink.add_transitions([transition_row(t)])
        await sink.flush()
    assert await sink.query("SELECT count() FROM journey.transitions FINAL") == [(1,)]
    await sink.close()
    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}")
    assert client.query("SELECT count() FROM journey.transitions FINAL").result_rows == [(1,)]


def test_split_statements_ignores_comments() -> None:
    """Comment lines and blank statements are dropped; each statement comes back whole."""
    sql = (
        "-- a comment; with a semicolon\nCREATE DATABASE x;\n\n"
        "CREATE TABLE y (a Int8)\nENGINE = Memory;\n"
    )
    assert split_statements(sql) == [
        "CREATE DATABASE x",
        "CREATE TABLE y (a Int8)\nENGINE = Memory",
    ]


async def test_handoffs_feedback_and_exit_handoffs_land_and_collapse_on_replay(
    chdb_path: Path,
) -> None:
    """Hand-offs, survey answers (NULL for no answer) and an exit's hand-off are stored once."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    exit_ = Transition(
        "retail", "c1", "awareness", None, "dropped", "app", "", 604_800.0, 604_800.0, "web", "app"
    )
    handoff = Handoff("retail", "c1", "awareness", "web", "app", "e2", 60.0)
    answers = [
        Feedback("retail", "awareness", "app", "c1", "e3", 90.0, 4.0, None),
        Feedback("retail", "", "store", "c2", "e4", 95.0, None, 10.0),
    ]
    for _ in range(2):  # the second time is a replayed batch
        sink.add_transitions([transition_row(exit_)])
        sink.add_handoffs([handoff_row(handoff)])
        sink.add_feedback([feedback_row(f) for f in answers])
        await sink.flush()
    assert await sink.query(
        "SELECT from_stage, to_stage, kind, handoff_from, handoff_to FROM journey.transitions FINAL"
    ) == [("awareness", "", "dropped", "web", "app")]
    assert await sink.query(
        "SELECT stage, from_channel, to_channel, event_id, occurred_at FROM journey.handoffs FINAL"
    ) == [("awareness", "web", "app", "e2", datetime(1970, 1, 1, 0, 1))]
    assert await sink.query(
        "SELECT stage, channel, csat, nps FROM journey.feedback FINAL ORDER BY event_id"
    ) == [("awareness", "app", 4.0, None), ("", "store", None, 10.0)]
    await sink.close()


async def test_002_upgrades_a_database_made_by_001(chdb_path: Path, tmp_path: Path) -> None:
    """Transitions stored before the hand-off columns existed read back with empty ones."""
    only_001 = tmp_path / "ddl"
    only_001.mkdir()
    shutil.copy(DDL_DIR / "001_core_tables.sql", only_001)
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start(only_001)
    old_columns = [
        "journey", "customer", "from_stage", "to_stage", "kind", "channel", "event_id",
        "occurred_at", "seconds_in_previous",
    ]  # fmt: skip
    old = transition_row(
        Transition("retail", "c1", "awareness", "purchase", "advanced", "store", "e2", 5.0, 4.0)
    )[: len(old_columns)]
    await sink.run(
        lambda c: c.raw_insert(
            "journey.transitions", old_columns, encode_rows([old]), fmt="JSONCompactEachRow"
        )
    )
    await sink.start()
    await sink.start()
    assert await sink.query(
        "SELECT event_id, handoff_from, handoff_to FROM journey.transitions FINAL"
    ) == [("e2", "", "")]
    assert await sink.query("SELECT count() FROM journey.handoffs") == [(0,)]
    await sink.close()


# From 2000 to 2100, with every microsecond: the times a row can carry.
TIMES = st.floats(min_value=946_684_800.0, max_value=4_102_444_800.0)


@given(TIMES)
def test_epoch_ms_is_what_a_datetime_insert_stored(ts: float) -> None:
    """The milliseconds equal clickhouse-connect's for ``datetime.fromtimestamp(ts, UTC)``.

    Rows used to go in as datetimes; a row written now and its replay from an older
    outbox entry must carry the same time, or ReplacingMergeTree keeps both.
    """
    column = get_from_name("DateTime64(3, 'UTC')")
    assert epoch_ms(ts) == column._datetime64_ticks(datetime.fromtimestamp(ts, UTC))


@given(st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000))
def test_a_time_is_written_as_its_exact_milliseconds(ms: int) -> None:
    """orjson writes ``ms / 1000`` as the decimal S.mmm (trailing zeros dropped), nothing else."""
    text = orjson.dumps(ms / 1000).decode()
    whole, _, fraction = text.partition(".")
    assert int(whole) * 1000 + int(fraction.ljust(3, "0")[:3]) == ms
    assert len(fraction) <= 3 and "e" not in text


async def test_times_land_to_the_millisecond(chdb_path: Path) -> None:
    """Times near millisecond and second boundaries are stored as the datetimes they stand for."""
    sink = ClickHouseSink(f"chdb://{chdb_path}")
    await sink.start()
    stamps = [1_780_000_000.0, 1_780_000_000.0005, 1_780_000_000.9995, 1_780_000_000.9999996]
    stamps += [1_780_000_000.123456, 1_780_000_001.001, 946_684_800.001]
    for i, ts in enumerate(stamps):
        sink.add_handoffs(
            [handoff_row(Handoff("retail", f"c{i}", "awareness", "web", "app", "e", ts))]
        )
    await sink.flush()
    rows = await sink.query(
        "SELECT customer, toUnixTimestamp64Milli(occurred_at) FROM journey.handoffs"
    )
    column = get_from_name("DateTime64(3, 'UTC')")
    assert dict(rows) == {
        f"c{i}": column._datetime64_ticks(datetime.fromtimestamp(ts, UTC))
        for i, ts in enumerate(stamps)
    }
    await sink.close()


def test_an_outbox_entry_from_before_json_rows_reads_as_the_rows_it_held() -> None:
    """RFC 3339 times (rows once held datetimes) and rejected rows without ``item`` are upgraded."""
    t = Transition("retail", "c1", None, "awareness", "entered", "web", "e1", 1_780_000_000.25, 0.0)
    new = transition_row(t)
    old = [*new[:7], datetime.fromtimestamp(t.occurred_at, UTC), *new[8:]]
    rejected = rejected_row(Rejection("bad", "not_json", b"{"), "journey.events", 0, 7, 1.5)
    old_rejected = [datetime.fromtimestamp(1.5, UTC), *rejected[1:4], *rejected[5:]]
    doc = orjson.loads(orjson.dumps({"transitions": [old], "rejected": [old_rejected]}))
    assert from_outbox(doc) == {"transitions": [new], "rejected": [rejected]}
