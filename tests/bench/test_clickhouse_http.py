"""bench/clickhouse_http.py answers clickhouse-connect as a ClickHouse server would."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from pathlib import Path

import clickhouse_connect
import lz4.frame
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from bench import clickhouse_http
from pipeline.sinks.clickhouse import ClickHouseSink, transition_row
from pipeline.stages import Transition


def test_the_statement_is_the_query_parameter_then_the_body() -> None:
    insert = {"query": ["INSERT INTO t FORMAT JSONCompactEachRow"]}
    assert clickhouse_http.statement(insert, b"[1]\n[2]") == (
        b"INSERT INTO t FORMAT JSONCompactEachRow\n[1]\n[2]"
    )
    assert clickhouse_http.statement({}, b"SELECT 1") == b"SELECT 1"
    assert clickhouse_http.statement({"query": ["SELECT 2"]}, b"") == b"SELECT 2"


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [(None, bytes), ("lz4", lz4.frame.compress), ("gzip", gzip.compress)],
)
def test_bodies_are_decompressed_as_their_encoding_says(
    encoding: str | None, compress: Callable[[bytes], bytes]
) -> None:
    body = b'[1,"a"]\n' * 100
    assert clickhouse_http.decompress(compress(body), encoding) == body


def test_query_parameters_are_taken_from_param_fields() -> None:
    params = {"param_who": ["c-1"], "database": ["journey"], "query": ["SELECT 1"]}
    assert clickhouse_http.bound(params) == {"who": "c-1"}


def test_an_unknown_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="brotli"):
        clickhouse_http.decompress(b"x", "brotli")


@pytest.mark.services
@pytest.mark.timeout(120)
def test_the_worker_sink_migrates_inserts_and_reads_through_it(tmp_path: Path) -> None:
    service = clickhouse_http.start(tmp_path / "chdb", tmp_path)
    try:
        transitions = [
            Transition(
                journey="retail",
                customer=f"c-{n}",
                from_stage=None,
                to_stage="awareness",
                kind="entered",
                channel="web",
                event_id=f"e-{n}",
                occurred_at=1_765_000_000.123,
                seconds_in_previous=0.0,
            )
            for n in range(3)
        ]

        async def run() -> list[tuple[object, ...]]:
            sink = ClickHouseSink(service.url)
            await sink.start()  # every DDL file, as against a server
            sink.add_transitions([transition_row(t) for t in transitions])
            await sink.flush()
            rows = await sink.query(
                "SELECT customer, to_stage, toUnixTimestamp64Milli(occurred_at) "
                "FROM journey.transitions ORDER BY customer"
            )
            await sink.close()
            return rows

        assert asyncio.run(run()) == [(f"c-{n}", "awareness", 1_765_000_000_123) for n in range(3)]

        client = clickhouse_connect.get_client(dsn=service.url)
        assert client.command("SELECT 40 + 2") == 42
        picked = client.query(
            "SELECT count() FROM journey.transitions WHERE customer = {who:String}",
            parameters={"who": "c-1"},
        )
        assert picked.result_rows == [(1,)]
        every = client.query(  # an empty value is a value (report.py's "every channel")
            "SELECT count() FROM journey.transitions "
            "WHERE {who:String} = '' OR customer = {who:String}",
            parameters={"who": ""},
        )
        assert every.result_rows == [(3,)]
        with pytest.raises(DatabaseError, match="Code: 47"):
            client.query("SELECT no_such_column FROM journey.transitions")
        assert client.query("SELECT count() FROM journey.transitions").result_rows == [(3,)]
        client.close()
    finally:
        service.stop()
