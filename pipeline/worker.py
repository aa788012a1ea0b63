"""The Faust app: wires the Kafka topics, the batch processor and the web endpoints.

Values are read as raw bytes (never Faust's JSON serializer) so that any
payload reaches the validator and, if bad, the dead-letter path. Agent
concurrency stays 1: above that Faust can commit an offset past an event still
in flight (faust-streaming #606).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import faust
import mode.loop
import orjson
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.events import Validator
from pipeline.health import Health
from pipeline.journeys import Journey, load_journeys
from pipeline.kafka_probe import KafkaProbe, KafkaProbeService
from pipeline.metrics import Metrics
from pipeline.processor import BatchProcessor, RawMessage
from pipeline.producer import BatchPublisher, ssl_context, start_producer
from pipeline.report import (
    REPORT_END,
    REPORT_START,
    Consistency,
    consistency,
    journey_report,
)
from pipeline.scorecard import LiveValues, live_scores, scorecard
from pipeline.settings import (
    EVENTS_TOPIC,
    KafkaAuth,
    Settings,
    redact_url,
)
from pipeline.sinks.clickhouse import ClickHouseSink
from pipeline.state.redis_store import RedisStore

log = logging.getLogger(__name__)

GAUGE_REFRESH_SECONDS = 2.0
# How long a scrape waits for the gauges' fresh values before answering with the last ones.
SCRAPE_READ_TIMEOUT_SECONDS = 2.0
# How long a rebalance or a shutdown waits for owed rows to be written out.
DRAIN_TIMEOUT_SECONDS = 10.0
# Bytes of one record batch of transitions or dead letters (per partition and request):
# a second of transitions in a few batches, well under a broker's 1 MB message limit.
PUBLISH_BATCH_BYTES = 512 * 1024


class Runtime:
    """The adapters of one worker process, started once before the first batch."""

    def __init__(self, settings: Settings, journeys: tuple[Journey, ...]) -> None:
        self.settings = settings
        self.journeys = journeys
        self.metrics = Metrics(self.stage_labels)
        self.store = RedisStore(settings.redis_url, settings.dedupe_ttl_seconds)
        self.health = Health()
        self.metrics.dependencies.health = self.health
        self.sink = ClickHouseSink(settings.clickhouse_dsn, settings.retry_max_seconds)
        self.sink.on_error = lambda op, exc: self._sink_error("clickhouse", op, exc)
        self.sink.on_ok = lambda: self.health.ok("clickhouse")
        self.processor = BatchProcessor(
            Validator(settings.channels),
            journeys,
            self.store,
            self.sink,
            self.metrics,
            settings.retry_max_seconds,
            settings.allowed_lateness_seconds,
            health=self.health,
            max_events=settings.batch_size,
            flush_seconds=settings.flush_seconds,
            flush_rows=settings.flush_rows,
        )
        self.producer: Any = None  # started with the rest, in start()
        self.ready = asyncio.Event()
        self._starting = asyncio.Lock()
        self.last_batch_at: float | None = None

    def stage_labels(self) -> Iterator[tuple[str, str]]:
        for journey in self.journeys:
            for stage in journey.stages:
                yield journey.name, stage.name

    def _sink_error(self, sink: str, op: str, exc: BaseException) -> None:
        self.metrics.sink_errors.labels(sink, op).inc()
        self.health.failed(sink, exc)
        log.warning("%s %s failed (%s: %s); retrying", sink, op, type(exc).__name__, exc)

    async def start(self) -> None:
        async with self._starting:
            if self.ready.is_set():
                return
            while True:
                try:
                    await self.store.ping()
                    self.health.ok("redis")
                    break
                except Exception as exc:  # Redis not up yet: wait, do not consume.
                    self._sink_error("redis", "ping", exc)
                    await asyncio.sleep(1.0)
            await self.sink.start()
            await self._start_producer()
            self.ready.set()
            log.info(
                "worker ready: journeys %s, Redis %s, ClickHouse %s",
                ", ".join(j.name for j in self.journeys),
                redact_url(self.settings.redis_url),
                redact_url(self.settings.clickhouse_dsn),
            )

    async def _start_producer(self) -> None:
        """The producer of transitions and dead letters (Faust's own sends one message at a time).

        It publishes what the write-out owes Kafka, as record batches; waits for the
        broker like the other services rather than failing the agent.
        """
        settings = self.settings
        while True:
            try:
                producer = await start_producer(
                    settings.kafka_url, 0, settings.kafka_auth, PUBLISH_BATCH_BYTES
                )
                break
            except Exception as exc:
                self._sink_error("kafka", "start producer", exc)
                await asyncio.sleep(1.0)
        self.producer = producer
        self.processor.publish = BatchPublisher(producer)

    async def refresh_consistency(self) -> None:
        """The consistency and score gauges over the last window of event time, from ClickHouse."""
        partitions = await self.store.known_partitions("jt:clock:")
        clocks = await self.store.clocks(partitions)
        if not clocks:
            return
        server_now = await self.store.server_time()
        until_ts = max(c.now(server_now) for c in clocks.values())
        until = datetime.fromtimestamp(until_ts, UTC)
        since = datetime.fromtimestamp(until_ts - self.settings.consistency_window_seconds, UTC)
        min_exits = self.settings.consistency_min_exits

        def run(client: Any) -> tuple[list[Consistency], LiveValues]:
            return (
                [consistency(client, j, since, until, min_exits) for j in self.journeys],
                live_scores(client, self.journeys, since, until),
            )

        results, scores = await self.sink.run(run)
        index: dict[tuple[str, str], float] = {}
        ratios: dict[tuple[str, str, str], float] = {}
        for result in results:
            for stage in result.stages:
                if stage.index is not None:
                    index[(result.journey, stage.stage)] = stage.index
                for channel, ratio in stage.ratios.items():
                    ratios[(result.journey, stage.stage, channel)] = ratio
        self.metrics.consistency.index = index
        self.metrics.consistency.ratios = ratios
        self.metrics.scores.scores = scores.scores
        self.metrics.scores.components = scores.components
        self.metrics.scores.channels = scores.channels


def faust_credentials(auth: KafkaAuth) -> dict[str, Any]:
    """Faust's ``broker_credentials`` for JOURNEY_KAFKA_* (none: plaintext).

    Faust picks SASL_SSL when the SASL credentials carry a TLS context, SASL_PLAINTEXT otherwise.
    """
    context = ssl_context(auth) if auth.tls else None
    if auth.sasl:
        credentials: Any = faust.SASLCredentials(
            username=auth.username,
            password=str(auth.password),
            ssl_context=context,
            mechanism=auth.sasl_mechanism,
        )
        return {"broker_credentials": credentials}
    if context is not None:
        return {"broker_credentials": faust.SSLCredentials(context)}
    return {}


def create_app(settings: Settings, journeys: tuple[Journey, ...] | None = None) -> faust.App:
    journeys = journeys if journeys is not None else load_journeys(settings.journeys_path)
    runtime = Runtime(settings, journeys)
    app = faust.App(
        settings.app_id,
        broker=settings.kafka_url,
        store="memory://",
        web_port=settings.web_port,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        producer_acks=-1,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_seconds / 3),
        key_serializer="raw",
        value_serializer="raw",
        **faust_credentials(settings.kafka_auth),
    )
    app.runtime = runtime  # type: ignore[attr-defined]
    events = app.topic(EVENTS_TOPIC, key_serializer="raw", value_serializer="raw")

    @app.agent(events, concurrency=1)
    async def process(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        await runtime.start()
        batches = stream.take_events(  # type: ignore[attr-defined]
            settings.batch_size, within=settings.batch_seconds
        )
        async for batch in batches:
            messages = [
                RawMessage(
                    e.message.topic,
                    e.message.partition,
                    e.message.offset,
                    e.message.value or b"",
                    e.message.timestamp,
                )
                for e in batch
            ]
            try:
                await runtime.processor.process(messages)
            except Exception:
                # Adapters retry service errors themselves, so this is a bug. Faust
                # would ack the batch if the agent raised; exiting at once instead
                # leaves the offsets uncommitted, and a restart replays the batch.
                log.exception(
                    "batch of %d events (partition %s, from offset %s) failed; exiting so "
                    "that nothing is acknowledged. Restart the worker once fixed.",
                    len(messages),
                    messages[0].partition,
                    messages[0].offset,
                )
                logging.shutdown()
                os._exit(70)
            runtime.last_batch_at = time.time()
            yield None

    async def drain(why: str) -> None:
        """Write out what committed chunks owe, so a partition's next owner need not recover it.

        Bounded: with ClickHouse or the broker down this would wait forever, and the
        outbox entries are safe in Redis anyway (the next owner writes them out).
        """
        try:
            await asyncio.wait_for(runtime.processor.drain(), DRAIN_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning(
                "%s: rows of committed batches still owed after %.0fs; they stay in the Redis "
                "outbox and the partitions' next owner writes them out",
                why,
                DRAIN_TIMEOUT_SECONDS,
            )

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        if runtime.ready.is_set():
            await drain("partitions revoked")

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        if runtime.ready.is_set():
            await drain("shutting down")
            # The producer stays open: a batch still in the agent may owe Kafka after
            # this, and the process exits right after (it closes the connections).

    def owned() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == EVENTS_TOPIC}

    async def read_gauges() -> None:
        """Population of the partitions owned now, and (owner of partition 0) the ledger totals.

        Off the batch path: a few reads, on a timer and at each scrape, so what
        /metrics shows is what Redis holds at that moment.
        """
        if not runtime.ready.is_set():
            return
        partitions = owned()
        runtime.metrics.assigned_partitions.set(len(partitions))
        exporting = 0 in partitions
        try:
            snapshot = await runtime.store.stage_customers(partitions)
            pending = await runtime.store.pending_deadlines(partitions)
            totals = await runtime.store.ledger() if exporting else {}
        except Exception as exc:
            runtime._sink_error("redis", "stage_customers", exc)
            return
        runtime.health.ok("redis")
        runtime.metrics.stage_customers.snapshot = snapshot
        runtime.metrics.pending_deadlines.set(pending)
        runtime.metrics.ledger.totals = totals
        runtime.metrics.ledger.exporting = exporting
        runtime.metrics.consumer_lag.set(await _consumer_lag(app))

    @app.timer(GAUGE_REFRESH_SECONDS)  # type: ignore[untyped-decorator]
    async def refresh_gauges() -> None:
        await read_gauges()

    @app.timer(settings.sweep_seconds)  # type: ignore[untyped-decorator]
    async def sweep() -> None:
        """Drop customers past their deadline on the partitions this worker owns.

        Deadlines and partition clocks are in Redis, so after a rebalance the
        new owner's first sweep picks up what the old owner left.
        """
        if not runtime.ready.is_set():
            return
        try:
            partitions = owned()
            await runtime.processor.recover(partitions)
            await runtime.processor.sweep(partitions, await _idle(app, partitions))
        except Exception:
            log.exception("drop-off sweep failed; the next one retries")

    @app.timer(settings.consistency_refresh_seconds)  # type: ignore[untyped-decorator]
    async def refresh_consistency() -> None:
        """The consistency and score gauges over the last window of event time, from ClickHouse.

        Every worker computes the same global values from the shared tables.
        """
        if not runtime.ready.is_set():
            return
        try:
            await runtime.refresh_consistency()
        except Exception as exc:
            runtime._sink_error("clickhouse", "consistency", exc)

    # A child service of the app, not an @app.timer: Faust starts timers only after the
    # first partition assignment, and a worker cut off before it must say so too.
    app.add_dependency(KafkaProbeService(KafkaProbe.for_settings(settings, runtime.health)))

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            # Fresh from Redis, within a bound: a scrape must answer even while Redis is away.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read_gauges(), SCRAPE_READ_TIMEOUT_SECONDS)
            body = generate_latest(runtime.metrics.registry)
            # aiohttp refuses a charset inside content_type=, so pass the header whole.
            return self.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/healthz")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            waiting = runtime.health.waiting_for()
            status = "degraded" if waiting else "ok"
            if not runtime.ready.is_set():
                status = "starting"
            body: dict[str, Any] = {
                "status": status,
                "journeys": [j.name for j in runtime.journeys],
                "last_batch_at": runtime.last_batch_at,
                # Services the worker is retrying: consumption waits until they answer.
                "waiting_for": waiting,
            }
            return self.json(body, status=200 if status == "ok" else 503)

    @app.page("/report")
    class ReportView(View):
        """Answers `journey report` while this worker holds an embedded chDB."""

        async def get(self, request: Request) -> Response:
            until = _parse_time(request.query.get("until"), REPORT_END)
            since = _parse_time(request.query.get("since"), REPORT_START)
            with_scorecard = request.query.get("scorecard") == "1"
            now = datetime.now(UTC)

            def run(client: Any) -> list[dict[str, Any]]:
                reports = []
                for j in runtime.journeys:
                    report = journey_report(client, j, since, until)
                    if with_scorecard:
                        report["scorecard"] = scorecard(client, j, since, until, now)
                    reports.append(report)
                return reports

            body = await runtime.sink.run(run)
            return self.bytes(orjson.dumps(body), content_type="application/json")

    return app


async def _lags(app: faust.App) -> dict[int, int]:
    """Messages not consumed yet per owned partition; absent while the broker cannot say."""
    lags: dict[int, int] = {}
    consumer = app.consumer
    for tp in consumer.assignment():
        if tp.topic != EVENTS_TOPIC:
            continue
        try:
            highwater = consumer.highwater(tp)
            position = await consumer.position(tp)
        except Exception:  # not fetched yet, or rebalancing
            continue
        if highwater is not None and position is not None:
            lags[tp.partition] = int(highwater) - int(position)
    return lags


async def _consumer_lag(app: faust.App) -> int:
    return sum(max(0, lag) for lag in (await _lags(app)).values())


async def _idle(app: faust.App, partitions: set[int]) -> set[int]:
    """Owned partitions consumed to the end: only their clocks may run on with wall time."""
    return {p for p, lag in (await _lags(app)).items() if lag <= 0 and p in partitions}


def _parse_time(raw: str | None, default: datetime) -> datetime:
    return datetime.fromisoformat(raw) if raw else default


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run until SIGTERM/SIGINT; Faust handles the signals and commits offsets."""
    # uvloop: the event loop itself was the largest part of the worker's time (README).
    mode.loop.use("uvloop")
    app = create_app(settings)
    # The web port comes from the App's settings (web_port/web_bind above).
    worker = faust.Worker(app, loglevel=loglevel)
    # At --loglevel warning or above Faust's terminal spinner turns the root logger to
    # DEBUG so that every record spins it: aiokafka then builds a debug record per
    # message sent, 3% of the worker's time. The worker logs for operators, not a TTY.
    worker.spinner = None
    worker.execute_from_commandline()
