"""ClickHouse sink: buffer rows with ``add_*``, write them with ``flush``.

One code path for a ClickHouse server (``http://…``) and embedded chDB
(``chdb:///path``): both are clickhouse-connect clients. chDB calls block, so
every call runs on one dedicated thread, which also serialises access to the
embedded engine. If ``flush`` fails it retries with back-off until it
succeeds: the caller (the agent) waits, which stops consumption instead of
dropping rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, wait_exponential

from pipeline.events import Event, Rejection
from pipeline.settings import redact_url
from pipeline.stages import Feedback, Handoff, Transition

log = logging.getLogger(__name__)

DDL_DIR = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse"

EVENT_COLUMNS = (
    "event_id",
    "occurred_at",
    "received_at",
    "customer",
    "customer_id",
    "anonymous_id",
    "channel",
    "event_type",
    "touchpoint",
    "properties",
    "source",
    "schema_version",
)
TRANSITION_COLUMNS = (
    "journey",
    "customer",
    "from_stage",
    "to_stage",
    "kind",
    "channel",
    "event_id",
    "occurred_at",
    "seconds_in_previous",
    "handoff_from",
    "handoff_to",
)
HANDOFF_COLUMNS = (
    "journey",
    "customer",
    "stage",
    "from_channel",
    "to_channel",
    "event_id",
    "occurred_at",
)
FEEDBACK_COLUMNS = (
    "journey",
    "stage",
    "channel",
    "customer",
    "event_id",
    "occurred_at",
    "csat",
    "nps",
)
REJECTED_COLUMNS = (
    "received_at",
    "topic",
    "partition",
    "offset",
    "item",
    "code",
    "reason",
    "raw",
)

T = TypeVar("T")

# What a down or refusing server raises; worth waiting for. Anything else (a
# TypeError in our row building, say) is a bug and must not be retried forever.
SERVICE_ERRORS: tuple[type[BaseException], ...] = (ClickHouseError, OSError)


TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": EVENT_COLUMNS,
    "transitions": TRANSITION_COLUMNS,
    "rejected": REJECTED_COLUMNS,
    "handoffs": HANDOFF_COLUMNS,
    "feedback": FEEDBACK_COLUMNS,
}


def epoch_ms(ts: float) -> int:
    """Unix time in whole milliseconds, as a ``DateTime64(3)`` column stores it.

    Rounded to the microsecond first, as ``datetime.fromtimestamp`` does, then
    truncated: the same value the rows had when they went in as datetimes, so
    a row written by this version and its replay from an older outbox entry
    collapse onto one another (the time is part of the tables' keys).
    """
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1_000_000)  # round half to even, as fromtimestamp
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return int(whole) * 1000 + micros // 1000


def _at(ts: float) -> float:
    """A ``DateTime64(3)`` value for JSON input: seconds with the exact milliseconds.

    orjson writes the shortest text that reads back as the same float, which for
    ``ms / 1000`` is the decimal ``S.mmm`` itself, and ClickHouse reads that text
    as those milliseconds exactly (tests/sinks/test_clickhouse.py).
    """
    return epoch_ms(ts) / 1000


def _datetime_at(value: datetime) -> float:
    """``_at`` of an aware datetime, from its own microseconds (a float may lose one)."""
    return (math.floor(value.timestamp()) * 1000 + value.microsecond // 1000) / 1000


def from_outbox(rows: Mapping[str, list[list[Any]]]) -> dict[str, list[list[Any]]]:
    """Rows by table as they come back from an outbox entry's JSON, ready for ``add_rows``.

    Entries written before rows went in as JSON hold RFC 3339 text in the
    ``*_at`` columns, and rejected rows from before envelopes have no ``item``:
    both are brought to the current form.
    """
    out: dict[str, list[list[Any]]] = {}
    for table, table_rows in rows.items():
        stamps = [i for i, c in enumerate(TABLE_COLUMNS[table]) if c.endswith("_at")]
        for row in table_rows:
            if table == "rejected" and len(row) == len(REJECTED_COLUMNS) - 1:
                row.insert(REJECTED_COLUMNS.index("item"), 0)  # written before envelopes
            for i in stamps:
                if isinstance(row[i], str):
                    row[i] = _datetime_at(datetime.fromisoformat(row[i]))
        out[table] = table_rows
    return out


def encode_rows(rows: Sequence[list[Any]]) -> bytes:
    """A ``JSONCompactEachRow`` body: one JSON array per row, built in C by orjson.

    ClickHouse parses it natively, so inserting costs no per-value Python work.
    """
    return b"\n".join(map(orjson.dumps, rows))


def event_row(event: Event, received_at: float) -> list[Any]:
    return [
        event.event_id,
        _datetime_at(event.occurred_at),
        _at(received_at),
        event.key,
        event.customer_id or "",
        event.anonymous_id or "",
        event.channel,
        event.event_type,
        event.touchpoint or "",
        orjson.dumps(dict(event.properties)).decode(),
        event.source or "",
        event.schema_version,
    ]


def transition_row(t: Transition) -> list[Any]:
    return [
        t.journey,
        t.customer,
        t.from_stage or "",
        t.to_stage or "",
        t.kind,
        t.channel,
        t.event_id,
        _at(t.occurred_at),
        t.seconds_in_previous,
        t.handoff_from or "",
        t.handoff_to or "",
    ]


def handoff_row(h: Handoff) -> list[Any]:
    return [
        h.journey,
        h.customer,
        h.stage,
        h.from_channel,
        h.to_channel,
        h.event_id,
        _at(h.occurred_at),
    ]


def feedback_row(f: Feedback) -> list[Any]:
    # None stays NULL: "no answer" must not average in as a score of 0.
    return [
        f.journey,
        f.stage,
        f.channel,
        f.customer,
        f.event_id,
        _at(f.occurred_at),
        f.csat,
        f.nps,
    ]


def rejected_row(
    rejection: Rejection,
    topic: str,
    partition: int,
    offset: int,
    received_at: float,
    item: int | None = None,
) -> list[Any]:
    """``item``: the event's index in its envelope (0 for a plain message, as for the first)."""
    raw = rejection.raw.decode("utf-8", errors="backslashreplace")
    return [
        _at(received_at),
        topic,
        partition,
        offset,
        item or 0,
        rejection.code,
        rejection.reason,
        raw,
    ]


def split_statements(sql: str) -> list[str]:
    """Split a DDL file on ``;`` at line ends; our DDL has no semicolons in strings."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


class ClickHouseSink:
    def __init__(self, dsn: str, retry_max_seconds: float = 30.0) -> None:
        self.dsn = dsn
        self.retry_max_seconds = retry_max_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._client: Any = None
        self.events: list[list[Any]] = []
        self.transitions: list[list[Any]] = []
        self.rejected: list[list[Any]] = []
        self.handoffs: list[list[Any]] = []
        self.feedback: list[list[Any]] = []
        self.on_error: Callable[[str, BaseException], None] | None = None
        self.on_ok: Callable[[], None] | None = None  # a call succeeded (an outage is over)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _connect(self) -> Any:
        if self._client is None:
            self._client = clickhouse_connect.get_client(dsn=self.dsn)
        return self._client

    def _migrate(self, ddl_dir: Path) -> list[str]:
        client = self._connect()
        applied = []
        for path in sorted(ddl_dir.glob("*.sql")):
            for statement in split_statements(path.read_text()):
                client.command(statement)
            applied.append(path.name)
        return applied

    async def start(self, ddl_dir: Path = DDL_DIR) -> None:
        """Connect and apply every DDL file in order (they are idempotent)."""
        applied = await self._retrying("migrate", self._migrate, ddl_dir)
        log.info(
            "ClickHouse ready at %s (DDL applied: %s)", redact_url(self.dsn), ", ".join(applied)
        )

    async def _retrying(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.5, max=self.retry_max_seconds),
            retry=retry_if_exception_type(SERVICE_ERRORS),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                try:
                    result = await self._call(fn, *args)
                except SERVICE_ERRORS as exc:
                    if self.on_error is not None:
                        self.on_error(what, exc)
                    # A broken HTTP session or engine handle is rebuilt on the next try.
                    self._client = None
                    raise
                if self.on_ok is not None:
                    self.on_ok()
                return result
        raise AssertionError("unreachable")

    def add_events(self, rows: Sequence[list[Any]]) -> None:
        self.events.extend(rows)

    def add_transitions(self, rows: Sequence[list[Any]]) -> None:
        self.transitions.extend(rows)

    def add_rejected(self, rows: Sequence[list[Any]]) -> None:
        self.rejected.extend(rows)

    def add_handoffs(self, rows: Sequence[list[Any]]) -> None:
        self.handoffs.extend(rows)

    def add_feedback(self, rows: Sequence[list[Any]]) -> None:
        self.feedback.extend(rows)

    def add_rows(self, rows: Mapping[str, Sequence[list[Any]]]) -> None:
        """Rows by table name (``TABLE_COLUMNS`` keys), e.g. from ``from_outbox``."""
        buffers = {
            "events": self.events,
            "transitions": self.transitions,
            "rejected": self.rejected,
            "handoffs": self.handoffs,
            "feedback": self.feedback,
        }
        for table, table_rows in rows.items():
            buffers[table].extend(table_rows)

    def _insert_all(self, batches: list[tuple[str, Sequence[str], list[list[Any]]]]) -> None:
        client = self._connect()
        for table, columns, rows in batches:
            if rows:
                client.raw_insert(table, list(columns), encode_rows(rows), fmt="JSONCompactEachRow")

    async def flush(self) -> None:
        """Write everything buffered; retries until ClickHouse takes it."""
        batches = [
            ("journey.events", EVENT_COLUMNS, self.events),
            ("journey.transitions", TRANSITION_COLUMNS, self.transitions),
            ("journey.rejected_events", REJECTED_COLUMNS, self.rejected),
            ("journey.handoffs", HANDOFF_COLUMNS, self.handoffs),
            ("journey.feedback", FEEDBACK_COLUMNS, self.feedback),
        ]
        if not any(rows for _, _, rows in batches):
            return
        self.events, self.transitions, self.rejected = [], [], []
        self.handoffs, self.feedback = [], []
        await self._retrying("insert", self._insert_all, batches)

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` on the sink's thread: the one safe way to share chDB."""
        return await self._retrying("query", lambda: fn(self._connect()))

    async def query(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        return await self.run(
            lambda client: list(client.query(sql, parameters=parameters).result_rows)
        )

    async def close(self) -> None:
        def close_client() -> None:
            if self._client is not None:
                self._client.close()
                self._client = None

        await self._call(close_client)
        self._executor.shutdown(wait=True)
