"""The ClickHouse sink against embedded chDB (same client API and SQL as a server)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import pytest

from pipeline.events import Rejection, Validator
from pipeline.sinks.clickhouse import (
    ClickHouseSink,
    event_row,
    rejected_row,
    split_statements,
    transition_row,
)
from pipeline.stages import Transition

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
