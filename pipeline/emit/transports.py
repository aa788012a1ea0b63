"""Where batches go: straight to Kafka, or to the HTTP collector.

A transport takes one batch and answers, per event, what happened: sent,
rejected by the collector (permanent, never resent), or failed after the
retry budget (handed back to the caller through ``flush()``/``close()``).
It raises only on a bug; every expected failure is in the result.
"""

from __future__ import annotations

import gzip
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

import aiohttp
import orjson
from aiokafka.errors import KafkaError, KafkaTimeoutError

from pipeline.producer import start_producer
from pipeline.settings import EVENTS_TOPIC, KafkaAuth

from .builder import Outgoing
from .retry import RetryPolicy, Transient

__all__ = [
    "BatchResult",
    "HttpTransport",
    "KafkaTransport",
    "Rejected",
    "Transport",
]

log = logging.getLogger(__name__)

EVENTS_PATH: Final = "/v1/events"
USER_AGENT: Final = "journey-emit/1"


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event the collector refused for good (``code``: see ``events.REJECTION_CODES``)."""

    item: Outgoing
    code: str
    reason: str


@dataclass
class BatchResult:
    """What became of one batch; ``sent + len(rejected) + len(failed)`` is the batch size."""

    sent: int = 0
    retried: int = 0  # events sent again after a transient failure (one per event per retry)
    rejected: list[Rejected] = field(default_factory=list)
    failed: list[Outgoing] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def fail(self, items: Sequence[Outgoing], error: BaseException) -> None:
        self.failed.extend(items)
        self.errors.append(error)


class Transport(Protocol):
    """What the emitter needs of a destination. One emitter calls ``send`` one batch at a time."""

    async def start(self) -> None:
        """Connect now, so a wrong address fails at start-up (``send`` connects lazily too)."""

    async def send(self, batch: Sequence[Outgoing]) -> BatchResult:
        """Deliver ``batch`` within the retry budget and report per event; raise only on a bug."""
        ...

    async def close(self) -> None:
        """Release connections; called once, after the last ``send``."""


class _Permanent(Exception):
    """A failure that retrying cannot fix (400, 401, 415, an unknown topic...)."""


class _TooLarge(Exception):
    """413: the request must be split; ``limit`` is the collector's limit when it says one."""

    def __init__(self, message: str, limit: int | None) -> None:
        super().__init__(message)
        self.limit = limit


# --------------------------------------------------------------------------- Kafka


def _retriable_kafka(error: BaseException) -> bool:
    """Kafka errors a later attempt can fix; a delivery timeout counts (the broker may return)."""
    return isinstance(error, KafkaError) and bool(
        getattr(error, "retriable", False) or isinstance(error, KafkaTimeoutError)
    )


class KafkaTransport:
    """Produce each event to ``journey.events`` with acks=all, keyed as the worker keys it.

    Only records the broker did not acknowledge are sent again, so a retry adds as
    few duplicates as possible (the worker drops the rest by ``event_id``).
    Producer settings are :func:`pipeline.producer.start_producer`'s: one place
    owns them, idempotence off because Tansu refuses it.
    """

    def __init__(
        self,
        kafka_url: str,
        *,
        topic: str = EVENTS_TOPIC,
        retry: RetryPolicy | None = None,
        linger_ms: int = 5,
        auth: KafkaAuth | None = None,
    ) -> None:
        self._url = kafka_url
        self._auth = auth  # SASL/TLS, as JOURNEY_KAFKA_* configure the worker's
        self._topic = topic
        self._retry = retry or RetryPolicy()
        self._linger_ms = linger_ms  # the emitter batches already; this only coalesces a batch
        self._producer: Any = None

    async def start(self) -> None:
        if self._producer is None:
            self._producer = await start_producer(self._url, self._linger_ms, self._auth)

    async def send(self, batch: Sequence[Outgoing]) -> BatchResult:
        result = BatchResult()
        try:
            await self.start()
        except Exception as exc:  # the broker stayed unreachable for the start-up budget
            result.fail(batch, exc)
            return result
        pending = list(batch)

        def on_retry(_: BaseException) -> None:
            result.retried += len(pending)

        try:
            async for attempt in self._retry.retrying(on_retry):
                with attempt:
                    pending, error = await self._produce(pending, result)
                    if pending:
                        raise Transient(
                            f"{len(pending)} records not acknowledged by Kafka: {error!r}"
                        ) from error
        except Transient as exc:
            result.fail(pending, exc.__cause__ or exc)
        return result

    async def _produce(
        self, items: list[Outgoing], result: BatchResult
    ) -> tuple[list[Outgoing], BaseException | None]:
        """Send ``items`` and wait for every ack; return those to try again (in order), and why.

        Acknowledged records and permanent failures go to ``result`` at once.
        """
        producer = self._producer
        futures: list[tuple[Outgoing, Any]] = []
        outcomes: list[tuple[Outgoing, BaseException | None]] = []
        unsent: list[tuple[Outgoing, BaseException | None]] = []
        for i, item in enumerate(items):
            try:
                futures.append((item, await producer.send(self._topic, item.payload, key=item.key)))
            except Exception as exc:  # e.g. no metadata in time: this and the rest are unsent
                unsent = [(rest, exc) for rest in items[i:]]
                break
        for item, future in futures:
            try:
                await future
                outcomes.append((item, None))
            except Exception as exc:
                outcomes.append((item, exc))
        outcomes.extend(unsent)
        again: list[Outgoing] = []
        first: BaseException | None = None
        for item, error in outcomes:
            if error is None:
                result.sent += 1
            elif _retriable_kafka(error):
                again.append(item)
                first = first or error
            else:
                result.fail([item], error)
        return again, first

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()


# --------------------------------------------------------------------------- HTTP collector


def _endpoint(url: str) -> str:
    """The collector's base URL (``http://host:6067``) or its full events URL, as given."""
    url = url.rstrip("/")
    return url if url.endswith(EVENTS_PATH) else url + EVENTS_PATH


def _retry_after(header: str | None, body: Any) -> float | None:
    """Seconds the server asked us to wait: Retry-After (seconds or HTTP date), else the body's."""
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    hint = body.get("retry_after") if isinstance(body, dict) else None
    if isinstance(hint, int | float) and not isinstance(hint, bool):
        return max(0.0, float(hint))
    return None


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _detail(status: int, body: Any, raw: bytes) -> str:
    if isinstance(body, dict):
        error, detail = body.get("error"), body.get("detail")
        if error or detail:
            return f"{status} {error or ''}: {detail or ''}".strip()
    return f"{status}: {raw[:200].decode('utf-8', 'replace')}"


def _rejections(chunk: Sequence[Outgoing], body: Any) -> list[Rejected]:
    """The per-event rejections of a 200 answer; an answer we cannot read is a failure."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise _Permanent(f"collector answered 200 without a results list: {str(body)[:200]}")
    rejected: list[Rejected] = []
    for entry in results:
        if not isinstance(entry, dict) or entry.get("status") != "rejected":
            continue
        index = entry.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(chunk):
            raise _Permanent(f"collector answered 200 with a bad result index: {entry!r}")
        code = entry.get("code")
        reason = entry.get("reason")
        rejected.append(
            Rejected(chunk[index], str(code or "unknown"), str(reason or "no reason given"))
        )
    return rejected


class HttpTransport:
    """POST batches to the collector (``/v1/events``), gzipped, with the source's API key.

    Retry policy, from the collector's contract: 429 (after its Retry-After), 5xx
    and connection errors are retried with back-off; 400, 401, 415 and other 4xx
    never are (the batch fails at once); 413 splits the batch in halves, or to
    the event limit the collector names, and remembers that limit. A 503 may
    have written part of the batch: resending it whole is safe because the worker
    deduplicates on ``event_id``.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        compress: bool = True,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._endpoint = _endpoint(url)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        if compress:
            self._headers["Content-Encoding"] = "gzip"
        self._compress = compress
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        self._max_events: int | None = None  # learnt from a 413 that names an event limit

    @property
    def endpoint(self) -> str:
        return self._endpoint

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def send(self, batch: Sequence[Outgoing]) -> BatchResult:
        await self.start()
        result = BatchResult()
        size = self._max_events or len(batch) or 1
        queue = deque(batch[i : i + size] for i in range(0, len(batch), size))
        while queue:
            chunk = queue.popleft()
            try:
                rejected = await self._post_retrying(chunk, result)
            except _TooLarge as exc:
                if len(chunk) == 1:
                    result.fail(chunk, _Permanent(f"a single event is too large: {exc}"))
                    continue
                queue.extendleft(reversed(self._split(chunk, exc.limit)))
                continue
            except (_Permanent, Transient) as exc:
                result.fail(chunk, exc)
                continue
            result.rejected.extend(rejected)
            result.sent += len(chunk) - len(rejected)
        return result

    def _split(self, chunk: Sequence[Outgoing], limit: int | None) -> list[Sequence[Outgoing]]:
        """Smaller requests after a 413: the collector's event limit if it gave one, else halves."""
        if limit is not None and 0 < limit < len(chunk):
            self._max_events = limit
            return [chunk[i : i + limit] for i in range(0, len(chunk), limit)]
        half = (len(chunk) + 1) // 2
        return [chunk[:half], chunk[half:]]

    async def _post_retrying(
        self, chunk: Sequence[Outgoing], result: BatchResult
    ) -> list[Rejected]:
        def on_retry(_: BaseException) -> None:
            result.retried += len(chunk)

        body = b"[" + b",".join(item.payload for item in chunk) + b"]"
        if self._compress:
            body = gzip.compress(body, compresslevel=6)
        async for attempt in self._retry.retrying(on_retry):
            with attempt:
                return await self._post(chunk, body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, chunk: Sequence[Outgoing], body: bytes) -> list[Rejected]:
        session = self._session
        assert session is not None
        try:
            async with session.post(self._endpoint, data=body, headers=self._headers) as resp:
                status = resp.status
                raw = await resp.read()
                retry_header = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(f"collector unreachable at {self._endpoint}: {exc!r}") from exc
        doc = _json(raw)
        if status == 200:
            return _rejections(chunk, doc)
        detail = _detail(status, doc, raw)
        if status == 429 or status >= 500:
            raise Transient(f"collector answered {detail}", _retry_after(retry_header, doc))
        if status == 413:
            limit = doc.get("limit") if isinstance(doc, dict) else None
            ok = isinstance(limit, int) and not isinstance(limit, bool)
            raise _TooLarge(f"collector answered {detail}", limit if ok else None)
        raise _Permanent(f"collector answered {detail}")

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            session, self._session = self._session, None
            await session.close()
