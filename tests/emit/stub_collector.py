"""A loopback stand-in for the HTTP collector, speaking its contract's status codes.

It validates with the worker's validator, as the real collector does, and can
be told to answer a script of failures first (429 with Retry-After, 5xx, a
dropped connection) or to cap events per request (413).
"""

from __future__ import annotations

import gzip
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from pipeline.events import Rejection, Validator

KEY = "test-key"


@dataclass
class Request:
    headers: dict[str, str]
    events: list[dict[str, Any]]
    status: int
    size: int = 0  # decompressed body bytes


@dataclass
class StubCollector:
    channels: tuple[str, ...] = ("web", "app", "store", "email", "call_center", "social")
    max_events: int | None = None  # over this: 413 with the limit
    max_bytes: int | None = None  # decompressed body over this: 413 without an event limit
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)  # answered first
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [e for r in self.requests if r.status == 200 for e in r.events if e.get("_ok")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = dict(request.headers)
        if raw[:2] == b"\x1f\x8b":  # aiohttp inflates gzip bodies itself; older versions did not
            raw = gzip.decompress(raw)
        try:
            events = orjson.loads(raw)
        except orjson.JSONDecodeError:
            events = None
        record = Request(headers, events if isinstance(events, list) else [], 0, len(raw))
        self.requests.append(record)
        response = self._answer(request, raw, record)
        record.status = response.status
        return response

    def _answer(self, request: web.Request, raw: bytes, record: Request) -> web.StreamResponse:
        if self.script:
            status, extra = self.script.popleft()
            if status == 0:  # drop the connection without an answer
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=599)
            body: dict[str, Any] = {
                "error": {
                    401: "unauthorized",
                    400: "bad_request",
                    415: "unsupported_media_type",
                    429: "rate_limited",
                }.get(status, "unavailable"),
                "detail": "scripted",
            }
            if status == 413:
                body = {"error": "too_large", "detail": "scripted", "limit": 1_000_000}
            return web.json_response(body, status=status, headers=extra)
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": "unauthorized", "detail": "unknown key"}, status=401)
        events = record.events
        if not events:
            return web.json_response({"error": "bad_request", "detail": "empty batch"}, status=400)
        if self.max_events is not None and len(events) > self.max_events:
            limit = {"error": "too_large", "detail": "too many events", "limit": self.max_events}
            return web.json_response(limit, status=413)
        if self.max_bytes is not None and len(raw) > self.max_bytes:
            size = {"error": "too_large", "detail": "body too large", "limit": self.max_bytes}
            return web.json_response(size, status=413)
        validator = Validator(self.channels)
        results: list[dict[str, Any]] = []
        for i, event in enumerate(events):
            verdict = validator.validate_dict(event)
            if isinstance(verdict, Rejection):
                results.append(
                    {
                        "index": i,
                        "event_id": event.get("event_id"),
                        "status": "rejected",
                        "code": verdict.code,
                        "reason": verdict.reason,
                    }
                )
            else:
                event["_ok"] = True
                results.append({"index": i, "event_id": event["event_id"], "status": "accepted"})
        accepted = sum(r["status"] == "accepted" for r in results)
        return web.json_response(
            {"accepted": accepted, "rejected": len(results) - accepted, "results": results}
        )


@asynccontextmanager
async def stub_collector(**kwargs: Any) -> AsyncIterator[StubCollector]:
    stub = StubCollector(**kwargs)
    app = web.Application()
    app.router.add_post("/v1/events", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    stub.url = f"http://{host}:{port}"
    try:
        yield stub
    finally:
        await runner.cleanup()
