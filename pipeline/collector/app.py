"""The HTTP collector: the front door for systems that hold no Kafka client.

``POST /v1/events`` takes one event, a JSON array or JSON Lines (gzip allowed),
validates each event with the worker's own :class:`~pipeline.events.Validator`,
and answers per event only after Kafka has acknowledged every record of the
request, so an accepted event survives a collector crash right after the answer.

Every event of an accepted request goes to ``journey.events``: valid ones keyed
as the worker keys them, invalid ones unkeyed, so the worker dead-letters them
(topic and ClickHouse table) exactly as it does for any other producer. The
sender learns the same reason at once; Kafka stays the only way in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pipeline.collector.body import BodyError, Item, decompress, split_events, too_large
from pipeline.collector.keys import ApiKeys
from pipeline.collector.ratelimit import RateLimiter
from pipeline.envelope import Outgoing, Packer
from pipeline.events import Event, Rejection, Validator
from pipeline.producer import bootstrap_servers, start_producer
from pipeline.settings import EVENTS_TOPIC, Settings

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"
PRODUCER_LINGER_MS = 5  # an HTTP client is waiting: do not hold records back long
HEALTH_PROBE_SECONDS = 5.0
_ALLOWED_HEADERS = "Authorization, Content-Type, Content-Encoding, X-Journey-Key"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CollectorMetrics:
    """The collector's own registry: it runs apart from the worker and exports only this."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "journey_collector_requests_total",
            "HTTP requests to the collector, by answer status",
            ["status"],
            registry=self.registry,
        )
        self.events = Counter(
            "journey_collector_events_total",
            "Events received, by source system and outcome (accepted, rejected)",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "journey_collector_rejections_total",
            "Rejected events by source system and reason code",
            ["source", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "journey_collector_request_seconds",
            "Time from request received to answer sent (includes the Kafka acknowledgement)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.kafka_up = Gauge(
            "journey_collector_kafka_up",
            "1 while the collector's Kafka producer is connected and acknowledging",
            registry=self.registry,
        )


def json_response(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def presented_key(request: web.Request) -> str | None:
    """The API key, from Authorization: Bearer, X-Journey-Key, or ?key= (sendBeacon)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-Journey-Key") or request.query.get("key") or None


class Collector:
    """One collector process: its producer, limits and metrics; ``app()`` wires the routes."""

    def __init__(self, settings: Settings, keys: ApiKeys, validator: Validator) -> None:
        if settings.collector_burst < settings.collector_max_events:
            raise ValueError(
                f"JOURNEY_COLLECTOR_BURST ({settings.collector_burst}) is below "
                f"JOURNEY_COLLECTOR_MAX_EVENTS ({settings.collector_max_events}): a full batch "
                "could never pass the rate limit; raise the burst or lower the batch limit"
            )
        if not len(keys):
            raise ValueError(
                "no API keys configured: set JOURNEY_COLLECTOR_KEYS=SOURCE:SHA256 or "
                "JOURNEY_COLLECTOR_KEYS_FILE; `journey collector-key SOURCE` makes one"
            )
        self.settings = settings
        self.keys = keys
        self.validator = validator
        self.metrics = CollectorMetrics()
        self.limiter = RateLimiter(settings.collector_rate, settings.collector_burst)
        self.cors = frozenset(settings.collector_cors_origins)
        self.producer: Any = None
        self.kafka_status = "connecting"
        self._tasks: list[asyncio.Task[None]] = []

    # -- wiring ---------------------------------------------------------------

    def app(self) -> web.Application:
        # Bodies are inflated by body.decompress, which bounds the inflated size and
        # names the problem; aiohttp's own inflating would hide both.
        app = web.Application(middlewares=[self._observe], handler_args={"auto_decompress": False})
        app.router.add_post(EVENTS_PATH, self.post_events)
        app.router.add_route("OPTIONS", EVENTS_PATH, self.preflight)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self._tasks.append(asyncio.create_task(self._connect(), name="collector-connect"))
        log.info(
            "collector on http://%s:%d%s for sources %s, producing to %s at %s",
            self.settings.collector_host,
            self.settings.collector_port,
            EVENTS_PATH,
            ", ".join(self.keys.sources),
            EVENTS_TOPIC,
            bootstrap_servers(self.settings.kafka_url),
        )

    async def _on_cleanup(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if self.producer is not None:
            await self.producer.stop()

    async def _connect(self) -> None:
        """Start the producer, retrying for as long as it takes; requests get 503 meanwhile."""
        while self.producer is None:
            try:
                self.producer = await start_producer(
                    self.settings.kafka_url, PRODUCER_LINGER_MS, self.settings.kafka_auth
                )
            except Exception as exc:
                self._kafka_down(f"unreachable ({type(exc).__name__}); retrying")
                await asyncio.sleep(HEALTH_PROBE_SECONDS)
        self._kafka_up()
        while True:  # keep /healthz true while no traffic flows
            await asyncio.sleep(HEALTH_PROBE_SECONDS)
            try:
                await asyncio.wait_for(
                    self.producer.client.fetch_all_metadata(), HEALTH_PROBE_SECONDS
                )
                self._kafka_up()
            except (TimeoutError, KafkaError) as exc:
                self._kafka_down(f"unreachable ({type(exc).__name__})")

    def _kafka_up(self) -> None:
        if self.kafka_status != "ok":
            log.info("Kafka is acknowledging; collecting")
        self.kafka_status = "ok"
        self.metrics.kafka_up.set(1)

    def _kafka_down(self, status: str) -> None:
        if self.kafka_status != status:
            log.warning("Kafka at %s: %s", bootstrap_servers(self.settings.kafka_url), status)
        self.kafka_status = status
        self.metrics.kafka_up.set(0)

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """CORS headers on every answer, JSON bodies for aiohttp's own errors, the counters."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404 and 405 from the router
            response = json_response(
                exc.status,
                {"error": exc.reason.lower().replace(" ", "_"), "detail": exc.text or exc.reason},
                **{k: v for k, v in exc.headers.items() if k == "Allow"},
            )
        origin = request.headers.get("Origin")
        if origin and self._origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        if request.path == EVENTS_PATH and request.method == "POST":
            self.metrics.latency.observe(time.perf_counter() - started)
            self.metrics.requests.labels(str(response.status)).inc()
        return response

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors or origin in self.cors

    # -- routes ---------------------------------------------------------------

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not origin or not self._origin_allowed(origin):
            return json_response(
                403,
                {
                    "error": "forbidden",
                    "detail": f"origin {origin!r} is not in JOURNEY_COLLECTOR_CORS_ORIGINS",
                },
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    async def healthz(self, _request: web.Request) -> web.Response:
        ok = self.kafka_status == "ok"
        body = {"status": "ok" if ok else "degraded", "kafka": self.kafka_status}
        return json_response(200 if ok else 503, body)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def post_events(self, request: web.Request) -> web.Response:
        source = self.keys.source_of(presented_key(request))
        if source is None:
            return json_response(
                401,
                {
                    "error": "unauthorized",
                    "detail": "missing or unknown API key: send 'Authorization: Bearer <key>' "
                    "(or X-Journey-Key, or ?key= for sendBeacon)",
                },
                **{"WWW-Authenticate": "Bearer"},
            )
        try:
            items = await self._read_items(request)
        except BodyError as exc:
            return json_response(exc.status, exc.body())
        wait = self.limiter.take(source, len(items), time.monotonic())
        if wait > 0:
            retry_after = max(1, round(wait + 0.5))
            return json_response(
                429,
                {
                    "error": "rate_limited",
                    "detail": f"source {source!r} is over {self.settings.collector_rate:g} "
                    f"events/s; retry after {retry_after} s",
                    "retry_after": retry_after,
                },
                **{"Retry-After": str(retry_after)},
            )
        if self.producer is None or self.kafka_status.startswith("unreachable"):
            return self._unavailable(f"Kafka is {self.kafka_status}")

        now = time.time()
        checked = [self._check(item, source, now) for item in items]
        try:
            await asyncio.wait_for(
                self._produce(checked), self.settings.collector_ack_timeout_seconds
            )
        except (TimeoutError, KafkaError) as exc:
            self._kafka_down(f"unreachable ({type(exc).__name__})")
            timeout = self.settings.collector_ack_timeout_seconds
            return self._unavailable(f"Kafka did not acknowledge within {timeout:g} s")
        self._kafka_up()
        return json_response(200, self._answer(checked, source))

    # -- steps ----------------------------------------------------------------

    async def _read_items(self, request: web.Request) -> list[Item]:
        limit = self.settings.collector_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(f"body is {request.content_length} bytes, over {limit}", limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise too_large(f"body is over {limit} bytes", limit)
            chunks.append(chunk)
        body = decompress(b"".join(chunks), request.headers.get("Content-Encoding", ""), limit)
        return split_events(
            body, request.headers.get("Content-Type", ""), self.settings.collector_max_events
        )

    def _check(self, item: Item, source: str, now: float) -> tuple[bytes, Event | Rejection]:
        """The record to forward (the source system stamped in) and the validator's verdict."""
        obj = item
        if isinstance(item, bytes):
            try:
                obj = orjson.loads(item)
            except orjson.JSONDecodeError:
                return item, self.validator.decode(item, now)  # not JSON: forwarded as sent
        if isinstance(obj, dict):
            obj["source"] = source
        raw = orjson.dumps(obj)
        return raw, self.validator.decode(raw, now)

    async def _produce(self, checked: list[tuple[bytes, Event | Rejection]]) -> None:
        """Accepted events packed into envelopes per partition; rejected ones alone, unkeyed."""
        partitions = await self.producer.partitions_for(EVENTS_TOPIC)
        packer = Packer(len(partitions), self.settings.collector_envelope)
        out: list[Outgoing] = []
        for raw, verdict in checked:
            key = verdict.key.encode() if isinstance(verdict, Event) else None
            out.extend(packer.add(key, raw))
        out.extend(packer.flush())
        pending = [
            await self.producer.send(EVENTS_TOPIC, o.value, key=o.key, partition=o.partition)
            for o in out
        ]
        for future in pending:
            # Retrieve every outcome, even after a timeout, so none is left unobserved.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.gather(*pending)

    def _answer(
        self, checked: list[tuple[bytes, Event | Rejection]], source: str
    ) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        accepted = 0
        for index, (raw, verdict) in enumerate(checked):
            if isinstance(verdict, Event):
                accepted += 1
                results.append({"index": index, "event_id": verdict.event_id, "status": "accepted"})
                continue
            self.metrics.rejections.labels(source, verdict.code).inc()
            results.append(
                {
                    "index": index,
                    "event_id": _event_id(raw),
                    "status": "rejected",
                    "code": verdict.code,
                    "reason": verdict.reason,
                }
            )
        rejected = len(checked) - accepted
        self.metrics.events.labels(source, "accepted").inc(accepted)
        self.metrics.events.labels(source, "rejected").inc(rejected)
        return {"accepted": accepted, "rejected": rejected, "results": results}

    def _unavailable(self, detail: str) -> web.Response:
        retry_after = str(round(HEALTH_PROBE_SECONDS))
        return json_response(
            503,
            {
                "error": "unavailable",
                "detail": f"{detail}; resend the whole batch later (duplicates are dropped by "
                "event_id)",
                "retry_after": int(retry_after),
            },
            **{"Retry-After": retry_after},
        )


def _event_id(raw: bytes) -> str | None:
    """The event id of a rejected event, when it has a usable one (so the sender can match it)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("event_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


def run(collector: Collector) -> None:
    """Serve until SIGINT/SIGTERM; aiohttp drains in-flight requests on the way out."""
    web.run_app(
        collector.app(),
        host=collector.settings.collector_host,
        port=collector.settings.collector_port,
        print=None,
        access_log=None,
    )
