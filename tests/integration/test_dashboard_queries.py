"""Every query of every dashboard, run for real after simulated traffic.

The real stack, as in the alert test: Tansu, redis-server, `journey worker`
with its own chDB, Debian's Prometheus scraping it every second and
evaluating the generated rules, and `journey simulate` with the rehearsal
settings (dwell times of seconds, customers ten times quicker, an app checkout
incident), plus a few malformed payloads for the dead letters. The dashboards
are generated for the rehearsal's rule windows, exactly as the committed ones
are for the defaults.

Then, as Grafana would: every PromQL target through Prometheus's HTTP API
(range queries for graphs, instant for bars, stats and tables) with the
variables and ``$__range`` & co. expanded, every ``label_values`` variable
through the label API, and, once the worker has released its chDB directory,
every ClickHouse target and variable through chDB with the plugin's macros
expanded, for "All" channels and for a selection. A query that errors fails;
so does one that comes back empty, except the few listed in MAY_BE_EMPTY with
the reason. Three ClickHouse panels must also agree with `journey report`.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest

from pipeline import rehearsal, report
from pipeline.alerting import render_rules
from pipeline.dashboards import (
    ALL,
    JSON,
    clickhouse_query,
    generate_dashboards,
    iter_targets,
    prometheus_query,
)
from pipeline.embedded import (
    Service,
    free_port,
    prometheus_binary,
    start_prometheus,
)
from pipeline.journeys import load_journeys
from pipeline.producer import produce_batches
from pipeline.settings import EVENTS_TOPIC, Settings
from tests.integration.workers import WorkerProcess, broker, total, wait_until


def _have_prometheus() -> bool:
    try:
        prometheus_binary()
    except RuntimeError:
        return False
    return True


pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(not _have_prometheus(), reason="Debian prometheus not installed"),
]

TRAFFIC_SECONDS = 70.0
# Halfway through, every app checkout fails: drop-offs and alerts have something to show.
INCIDENT = "app:purchase:1.0@30s"
JOURNEY = "retail"
# What Grafana would pick for a panel about 1000 px wide over a few minutes, at a 1 s scrape.
INTERVAL = "5s"
RATE_INTERVAL = "20s"
CH_INTERVAL_SECONDS = 30
SELECTED_CHANNELS = ["web", "app"]

# (dashboard uid, panel title, refId) that may come back empty, and why.
MAY_BE_EMPTY: dict[tuple[str, str, str], str] = {
    ("journey-live", "Firing alerts", "A"): "no alert need fire in a short run",
    ("journey-pipeline", "Sink errors per second (retried)", "A"): "healthy services",
    (
        "journey-pipeline",
        "Late events, state conflicts and identity merges per second",
        "A",
    ): "simulated events are rarely behind the watermark",
    (
        "journey-channels",
        "Cross-channel consistency index",
        "B",
    ): "the index from counters needs two channels with the rehearsal's 60 exits in 30 s",
}

BAD_PAYLOADS = [
    b"not json at all",
    b"[1, 2, 3]",
    b'{"event_id": "x1", "channel": "web"}',
    b'{"event_id": "x2", "occurred_at": "2026-01-01T00:00:00+00:00", "customer_id": "c",'
    b' "channel": "fax", "event_type": "page_view", "schema_version": 1}',
]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=2) as service:
        yield service


def api(prometheus: Service, path: str, **params: Any) -> Any:
    """A Prometheus API call; an error (bad PromQL, unknown function) raises with its text."""
    url = f"{prometheus.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(exc.read().decode(errors="replace")) from None
    if body["status"] != "success":
        raise AssertionError(body)
    return body["data"]


def label_values(prometheus: Service, query: str, start: float, end: float) -> list[str]:
    """Grafana's ``label_values(selector, label)`` variable query, through the label API."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert m, f"not a label_values() query: {query}"
    selector, label = m.groups()
    return list(
        api(
            prometheus,
            f"/api/v1/label/{label}/values",
            **{"match[]": selector},
            start=start,
            end=end,
        )
    )


def has_data(result: JSON) -> bool:
    return any(series.get("values") or series.get("value") for series in result["result"])


def send_dead_letters(kafka_url: str) -> None:
    records = [(b"bad", payload) for payload in BAD_PAYLOADS * 10]
    asyncio.run(produce_batches(kafka_url, EVENTS_TOPIC, records))


def run_traffic(
    kafka: Service, settings: Settings, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], float]:
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "simulate",
            f"--rate={rehearsal.RATE}",
            f"--duration={TRAFFIC_SECONDS}",
            f"--incident={INCIDENT}",
            f"--time-scale={rehearsal.TIME_SCALE}",
            "--seed=11",
        ],
        env={**os.environ, **settings.to_env()},
        stdout=(tmp_path / "simulate.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return simulator, time.time()


def prometheus_failures(
    boards: dict[str, JSON], prometheus: Service, start: float, end: float
) -> tuple[list[str], int]:
    """Run every PromQL target and Prometheus variable; the problems found, and how many ran."""
    failures: list[str] = []
    ran = 0
    for selection in (".*", SELECTED_CHANNELS):
        values = {
            "journey": JOURNEY,
            "channel": selection,
            "instance": ".*",
            "__interval": INTERVAL,
            "__rate_interval": RATE_INTERVAL,
            "__range": f"{round(end - start)}s",
        }
        for board in boards.values():
            for var in board["templating"]["list"]:
                if var["datasource"]["type"] != "prometheus":
                    continue
                query = prometheus_query(var["query"], values)
                ran += 1
                try:
                    if not label_values(prometheus, query, start, end):
                        failures.append(f"{board['uid']} variable ${var['name']}: no values")
                except AssertionError as exc:
                    failures.append(f"{board['uid']} variable ${var['name']}: {exc}")
            for panel, target in iter_targets(board):
                if target["datasource"]["type"] != "prometheus":
                    continue
                where = f"{board['uid']} / {panel['title']} / {target['refId']}"
                expr = prometheus_query(target["expr"], values)
                ran += 1
                try:
                    if target["instant"]:
                        data = api(prometheus, "/api/v1/query", query=expr, time=end)
                    else:
                        data = api(
                            prometheus,
                            "/api/v1/query_range",
                            query=expr,
                            start=start,
                            end=end,
                            step=INTERVAL,
                        )
                except AssertionError as exc:
                    failures.append(f"{where}: {exc}\n{expr}")
                    continue
                key = (board["uid"], panel["title"], target["refId"])
                if not has_data(data) and key not in MAY_BE_EMPTY:
                    failures.append(f"{where}: empty (channels {selection})\n{expr}")
    return failures, ran


def clickhouse_failures(
    boards: dict[str, JSON], client: Any, start: datetime, end: datetime
) -> tuple[list[str], int, dict[str, list[dict[str, Any]]]]:
    """Run every ClickHouse target and variable; problems, count, and rows by panel (All)."""
    failures: list[str] = []
    ran = 0
    rows_by_panel: dict[str, list[dict[str, Any]]] = {}
    for selection in (ALL, SELECTED_CHANNELS):
        values = {"journey": JOURNEY, "channel": selection}
        for board in boards.values():
            queries: list[tuple[str, str]] = [
                (f"variable ${v['name']}", v["query"])
                for v in board["templating"]["list"]
                if v["datasource"]["type"] == "grafana-clickhouse-datasource"
            ]
            queries += [
                (f"{panel['title']} / {target['refId']}", target["rawSql"])
                for panel, target in iter_targets(board)
                if target["datasource"]["type"] == "grafana-clickhouse-datasource"
            ]
            for name, raw in queries:
                where = f"{board['uid']} / {name}"
                text = clickhouse_query(raw, values, start, end, CH_INTERVAL_SECONDS)
                ran += 1
                try:
                    result = client.query(text)
                except Exception as exc:
                    failures.append(f"{where}: {exc}\n{text}")
                    continue
                rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
                if not rows:
                    failures.append(f"{where}: empty (channels {selection})\n{text}")
                if selection == ALL:
                    rows_by_panel[name] = rows
    return failures, ran, rows_by_panel


def test_every_dashboard_query_runs_and_shows_data(
    kafka: Service, redis_service: Service, redis_client: object, tmp_path: Path
) -> None:
    journeys_path = rehearsal.REHEARSAL_JOURNEY
    journeys = load_journeys(journeys_path)
    boards = generate_dashboards(journeys, rehearsal.WINDOWS)
    rules = tmp_path / "journey.rules.yml"
    rules.write_text(render_rules(journeys, rehearsal.WINDOWS))
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        journeys_path=journeys_path,
        web_port=free_port(),
        batch_seconds=0.2,
        allowed_lateness_seconds=rehearsal.ALLOWED_LATENESS_SECONDS,
        sweep_seconds=rehearsal.SWEEP_SECONDS,
        consistency_refresh_seconds=2.0,
        app_id="dashboard-queries",
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    simulator: subprocess.Popen[bytes] | None = None
    began = time.monotonic()
    with start_prometheus(
        scrape_targets=[f"127.0.0.1:{settings.web_port}"],
        rule_files=[rules],
        data_dir=tmp_path / "prometheus",
    ) as prometheus:
        try:
            wait_until(
                lambda: total(worker.metrics(), "journey_assigned_partitions") == 2,
                timeout=180,
                what="the worker to own the partitions",
            )
            simulator, traffic_start = run_traffic(kafka, settings, tmp_path)
            send_dead_letters(kafka.url)
            assert simulator.wait(TRAFFIC_SECONDS + 60) == 0, (
                tmp_path / "simulate.log"
            ).read_text()
            # The last windows' rules see the end of the traffic, and the gauges refresh.
            wait_until(
                lambda: (
                    total(worker.metrics(), "journey_rejected_events_total")
                    >= len(BAD_PAYLOADS) * 10
                ),
                timeout=30,
                what="the dead letters",
            )
            time.sleep(3)
            end = time.time()
            prom_failures, prom_ran = prometheus_failures(boards, prometheus, traffic_start, end)
        finally:
            if simulator is not None and simulator.poll() is None:
                simulator.kill()
                simulator.wait()
            worker.stop()

    # The worker let go of its chDB directory: the ClickHouse panels now, as the plugin would.
    period_start = datetime.fromtimestamp(int(traffic_start) - 60, UTC)
    period_end = datetime.fromtimestamp(int(end) + 60, UTC)
    client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
    try:
        ch_failures, ch_ran, rows = clickhouse_failures(boards, client, period_start, period_end)
        journey = next(j for j in journeys if j.name == JOURNEY)
        funnel = report.funnel(client, journey, period_start, period_end)
        dwell = report.time_in_stage(client, journey, period_start, period_end)
        index = report.consistency(client, journey, period_start, period_end)
    finally:
        client.close()
    print(
        f"{prom_ran} Prometheus and {ch_ran} ClickHouse queries; "
        f"{time.monotonic() - began:.0f} s in all"
    )
    failures = prom_failures + ch_failures
    assert not failures, "\n\n".join(failures)

    # The any-period panels say what `journey report` says for the same period.
    panel = rows["Funnel with conversion between stages (period) / A"]
    assert [(r["stage"], r["entered"], r["reached"]) for r in panel] == [
        (s.stage, s.entered, s.reached) for s in funnel.stages
    ]
    for r, s in zip(panel, funnel.stages, strict=True):
        assert r["conversion"] == pytest.approx(s.conversion), r
    panel = rows["Time in stage: p50, p90, p99 of those who left (period) / A"]
    expected = {s.stage: s.overall for s in dwell.stages if s.overall.count}
    assert {r["stage"]: (r["leavers"], r["p50"], r["p90"], r["p99"]) for r in panel} == {
        stage: (d.count, pytest.approx(d.p50), pytest.approx(d.p90), pytest.approx(d.p99))
        for stage, d in expected.items()
    }
    panel = rows["Consistency index per stage (period) / A"]
    by_stage = {s.stage: s.index for s in index.stages}
    for r in panel:
        want = by_stage[r["stage"]]
        assert r["consistency"] == (None if want is None else pytest.approx(want)), r
