"""The Kafka probe: how its outcomes reach Health, and how it fails without a broker.

No broker here: the I/O tests aim the probe at a port nobody listens on, or at a
peer that accepts and never answers (tests/integration/test_kafka_probe.py runs
it against Tansu).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import pytest

from pipeline.embedded import free_port
from pipeline.health import Health
from pipeline.kafka_probe import (
    PROBE_INTERVAL_SECONDS,
    PROBE_TIMEOUT_SECONDS,
    SERVICE,
    KafkaProbe,
    ProbeReport,
    probe_order,
)
from pipeline.producer import client_options
from pipeline.settings import KafkaAuth, Secret, Settings

# Steps: what the probe or the publish path (pipeline.processor) reports, and
# whether Kafka is up in Health afterwards.
PROBE_FAILS, PROBE_OK, PUBLISH_FAILS, PUBLISH_OK = "probe ✗", "probe ✓", "publish ✗", "publish ✓"


def run(report: ProbeReport, step: str, now: float) -> None:
    if step == PROBE_FAILS:
        report.failed(ConnectionRefusedError(), now)
    elif step == PROBE_OK:
        report.answered()
    elif step == PUBLISH_FAILS:
        report.health.failed(SERVICE, TimeoutError(), now)
    else:
        report.health.ok(SERVICE)


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(
            [(PROBE_FAILS, False), (PROBE_FAILS, False), (PROBE_OK, True)],
            id="idle worker: the probe alone sees the outage and its end",
        ),
        pytest.param(
            [(PUBLISH_FAILS, False), (PROBE_OK, False), (PROBE_OK, False), (PUBLISH_OK, True)],
            id="a publish failure stands until a publish succeeds",
        ),
        pytest.param(
            [(PUBLISH_FAILS, False), (PROBE_FAILS, False), (PUBLISH_OK, True), (PROBE_OK, True)],
            id="shared outage ended by a publish",
        ),
        pytest.param(
            [(PUBLISH_FAILS, False), (PROBE_FAILS, False), (PROBE_OK, True)],
            id="shared outage ended by the probe",
        ),
        pytest.param(
            [
                (PROBE_FAILS, False),
                (PUBLISH_FAILS, False),
                (PROBE_OK, True),  # the one blip the module docstring admits
                (PUBLISH_FAILS, False),
                (PROBE_OK, False),
                (PROBE_OK, False),
                (PUBLISH_OK, True),
            ],
            id="publish keeps failing after the broker answers: no flapping",
        ),
        pytest.param(
            [(PROBE_FAILS, False), (PUBLISH_OK, True), (PROBE_FAILS, False), (PROBE_OK, True)],
            id="a second outage after a publish ended the first",
        ),
    ],
)
def test_who_clears_a_kafka_failure(steps: list[tuple[str, bool]]) -> None:
    report = ProbeReport(Health())
    for i, (step, up) in enumerate(steps):
        run(report, step, now=float(i))
        assert report.health.up(SERVICE) is up, (i, step)


def test_an_outage_keeps_the_date_of_its_first_failure() -> None:
    """Repeated probe failures do not move `since`, so alerts with `for:` can fire."""
    report = ProbeReport(Health())
    report.health.failed(SERVICE, TimeoutError(), now=10.0)
    report.failed(ConnectionRefusedError(), now=15.0)
    report.failed(ConnectionResetError(), now=20.0)
    assert report.health.waiting_for() == {SERVICE: {"since": 10.0, "error": "TimeoutError"}}


def test_news_is_reported_once_per_outage() -> None:
    """The probe logs a lost broker once and its return once, not on every tick."""
    report = ProbeReport(Health())
    assert report.failed(OSError()) is True
    assert report.failed(OSError()) is False
    assert report.answered() is True
    assert report.answered() is False
    assert report.failed(OSError()) is True
    report.health.ok(SERVICE)  # a publish went through first
    assert report.failed(OSError()) is True  # a new outage
    report.health.ok(SERVICE)
    assert report.answered() is True  # the probe still logs that the broker is back
    assert report.answered() is False


@pytest.mark.parametrize(
    ("nodes", "last", "first"),
    [([1, 2, 3], 2, 2), ([1, 2, 3], None, None), ([1, 3], 2, None), ([5], 5, 5)],
)
def test_the_broker_that_answered_last_is_asked_first(
    nodes: list[int], last: int | None, first: int | None
) -> None:
    for seed in range(20):
        order = probe_order(nodes, last, random.Random(seed))
        assert sorted(order) == sorted(nodes)
        if first is not None:
            assert order[0] == first


def test_a_probe_ends_before_the_next_is_due() -> None:
    assert PROBE_TIMEOUT_SECONDS < PROBE_INTERVAL_SECONDS
    # /healthz must name Kafka within ~15 s of the broker going away.
    assert PROBE_INTERVAL_SECONDS + PROBE_TIMEOUT_SECONDS <= 15


async def test_a_refused_connection_is_reported_and_no_credential_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = KafkaAuth(protocol="SASL_PLAINTEXT", username="probe", password=Secret("s3cret-pw"))
    settings = Settings(kafka_url=f"kafka://127.0.0.1:{free_port()}", kafka_auth=auth)
    health = Health()
    probe = KafkaProbe.for_settings(settings, health)
    caplog.set_level(logging.DEBUG)
    try:
        assert await probe.check() is False
        assert await probe.check() is False
    finally:
        await probe.close()
    assert health.waiting_for()[SERVICE]["error"] == "KafkaConnectionError"
    warnings = [r for r in caplog.records if r.name == "pipeline.kafka_probe"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "s3cret-pw" not in caplog.text
    assert "s3cret-pw" not in repr(health.waiting_for())


@pytest.fixture
async def silent_peer() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a hung broker, a black hole)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_broker_that_never_answers_fails_within_the_timeout(silent_peer: int) -> None:
    health = Health()
    probe = KafkaProbe(health, f"127.0.0.1:{silent_peer}", client_options(KafkaAuth()), 0.5)
    started = time.monotonic()
    try:
        assert await probe.check() is False
    finally:
        await probe.close()
    assert time.monotonic() - started < 0.5 + 1.0
    assert not health.up(SERVICE)


async def test_a_closed_probe_does_nothing() -> None:
    health = Health()
    probe = KafkaProbe(health, f"127.0.0.1:{free_port()}", client_options(KafkaAuth()))
    await probe.close()
    assert await probe.check() is None
    assert health.up(SERVICE)
