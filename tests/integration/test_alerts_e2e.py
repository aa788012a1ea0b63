"""The proof end to end: an incident on one channel pages for that channel, a healthy run does not.

The real stack: Tansu, redis-server, chDB, `journey worker`, Debian's
Prometheus scraping the worker and evaluating the project's generated rules,
and `journey simulate` with an injected incident. The journey is the default
one with dwell times of seconds and the simulated customers ten times quicker,
so a run takes a couple of minutes; the rules are the same, with windows
scaled down the same way.

One run, two phases: healthy traffic first (no customer alert may fire, and
the drop-off ratios must exist, so the silence is not for want of data), then
from INCIDENT_AT every app checkout fails. App customers in consideration stop
converting: the drop-off alert for consideration and the channel-divergence
alert must fire, both naming app, and no customer alert may name another channel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline import rehearsal
from pipeline.alerting import render_rules
from pipeline.embedded import (
    Service,
    free_port,
    prometheus_binary,
    start_prometheus,
)
from pipeline.journeys import load_journeys
from pipeline.settings import Settings
from tests.integration.workers import WorkerProcess, broker, total, wait_until

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(prometheus_binary() is None, reason="Debian prometheus not installed"),
]

HEALTHY_SECONDS = 60.0
INCIDENT_SECONDS = 75.0
INCIDENT = f"app:purchase:1.0@{HEALTHY_SECONDS:.0f}s"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with broker(tmp_path_factory.mktemp("kafka"), partitions=2) as service:
        yield service


def api(prometheus: Service, path: str, **params: str) -> Any:
    url = f"{prometheus.url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = orjson.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def customer_alerts(prometheus: Service) -> list[dict[str, str]]:
    """Customer alerts pending or firing now, as their label sets."""
    return [
        a["labels"] | {"state": a["state"]}
        for a in api(prometheus, "/api/v1/alerts")["alerts"]
        if a["labels"].get("category") == "customers"
    ]


def test_app_checkout_incident_pages_for_app_and_a_healthy_run_pages_nobody(
    kafka: Service, redis_service: Service, redis_client: object, tmp_path: Path
) -> None:
    journeys_path = rehearsal.REHEARSAL_JOURNEY
    rules = tmp_path / "journey.rules.yml"
    rules.write_text(render_rules(load_journeys(journeys_path), rehearsal.WINDOWS))
    settings = Settings(
        kafka_url=kafka.url,
        redis_url=redis_service.url,
        clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}",
        journeys_path=journeys_path,
        web_port=free_port(),
        batch_seconds=0.2,
        allowed_lateness_seconds=rehearsal.ALLOWED_LATENESS_SECONDS,
        sweep_seconds=rehearsal.SWEEP_SECONDS,
        app_id="alerts-e2e",
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    simulator: subprocess.Popen[bytes] | None = None
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
            simulator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "simulate",
                    f"--rate={rehearsal.RATE}",
                    f"--duration={HEALTHY_SECONDS + INCIDENT_SECONDS}",
                    f"--incident={INCIDENT}",
                    f"--time-scale={rehearsal.TIME_SCALE}",
                    "--seed=7",
                ],
                env={**os.environ, **settings.to_env()},
                stdout=(tmp_path / "simulate.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            started = time.monotonic()

            # Healthy phase: up to the incident (the simulator starts its clock a little
            # after `started`, so stopping short of HEALTHY_SECONDS is on the safe side).
            seen_healthy: list[dict[str, str]] = []
            while time.monotonic() - started < HEALTHY_SECONDS - 2:
                seen_healthy.extend(customer_alerts(prometheus))
                time.sleep(2)
            assert seen_healthy == [], seen_healthy  # pending counts too: not even close
            ratios = api(
                prometheus,
                "/api/v1/query",
                query='journey:stage_dropoff_ratio:30s{stage="consideration"}',
            )["result"]
            channels = {r["metric"]["channel"] for r in ratios}
            assert {"web", "app"} <= channels, ratios  # there was data to alert on

            # Incident phase: both alerts fire for app within the bound.
            def both_fire() -> bool:
                firing = {
                    (a["alertname"], a.get("stage"), a.get("channel"))
                    for a in customer_alerts(prometheus)
                    if a["state"] == "firing"
                }
                return {
                    ("JourneyStageDropoffHigh", "consideration", "app"),
                    ("JourneyChannelDiverging", "consideration", "app"),
                } <= firing

            wait_until(both_fire, timeout=70, what="the app drop-off and divergence alerts")
            fired_after = time.monotonic() - started - HEALTHY_SECONDS
            print(f"both alerts firing {fired_after:.0f} s after the incident started")
            alerts = customer_alerts(prometheus)
            named = {a.get("channel") for a in alerts}
            assert named <= {"app", None}, alerts
            samples = worker.metrics()
            assert (
                total(samples, "journey_dropoffs_total", stage="consideration", channel="app") > 0
            )
        finally:
            if simulator is not None:
                simulator.kill()
                simulator.wait()
            worker.stop()
