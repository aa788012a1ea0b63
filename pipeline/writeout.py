"""What committed chunks owe ClickHouse and Kafka, written out together.

A chunk's state and its outbox entry reach Redis in one step
(pipeline/state/redis_store.py); its rows and transitions wait here until
``max_seconds`` have passed since the oldest waiting chunk, or ``max_rows``
rows wait, then go out as one insert per table and one publish, and the
outbox entries are forgotten. An insert into ClickHouse (or chDB) costs about
15 ms whatever its size, so one per chunk of a thousand events was most of
the worker's ClickHouse time; ClickHouse's own advice is a few large inserts a
second.

Nothing is lost if the process dies meanwhile: the outbox entries are in
Redis, and the partition's owner writes them out
(``BatchProcessor.recover``). So Kafka offsets may be committed before the
rows are out.

One write runs at a time, in the order chunks were added, so transitions keep
their order on Kafka. While writes fall behind (ClickHouse or the broker slow,
or down: their calls retry until they succeed), ``add`` holds its caller once
twice ``max_rows`` are owed: back-pressure rather than an unbounded buffer. A
write that fails with anything but a retried service error is a bug: it is
logged at once and raised from the next ``add`` or ``drain``, so the worker
stops instead of carrying on with rows it will never write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# (topic, key, value) for Kafka
OutMessage = tuple[str, bytes | None, bytes]


class RowSink(Protocol):
    """What the write-out needs of pipeline/sinks/clickhouse.py's ClickHouseSink."""

    def add_rows(self, rows: Mapping[str, Sequence[list[Any]]]) -> None: ...

    async def flush(self) -> None: ...


@dataclass
class Owed:
    """What one committed chunk (a sweep step, a recovered outbox entry) owes."""

    rows: Mapping[str, Sequence[list[Any]]]  # by table, as ClickHouseSink.add_rows takes them
    messages: Sequence[OutMessage] = ()
    outbox: tuple[int, str] | None = None  # (partition, token) of its entry, forgotten once out
    event_times: Sequence[float] = ()  # event times of its events: how stale the rows were
    added_at: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.rows.values())


class WriteOut:
    def __init__(
        self,
        sink: RowSink,
        publish: Callable[[Sequence[OutMessage]], Awaitable[None]],
        forget: Callable[[list[tuple[int, str]]], Awaitable[None]],
        max_rows: int = 50_000,
        max_seconds: float = 1.0,
    ) -> None:
        self.sink = sink
        self.publish = publish
        self.forget = forget
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        # Called after each write with what it wrote and how long the insert took.
        self.written: Callable[[Sequence[Owed], float], None] = lambda owed, seconds: None
        self._waiting: list[Owed] = []
        self._rows = 0  # rows in _waiting
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failed: BaseException | None = None

    @property
    def owed_rows(self) -> int:
        """Rows waiting, not counting those being written now."""
        return self._rows

    async def add(self, owed: Owed) -> None:
        """Owe these; returns at once unless twice ``max_rows`` are waiting already."""
        self._raise_failure()
        self._waiting.append(owed)
        self._rows += owed.size
        if self._rows >= self.max_rows:
            self._start()
        elif self._timer is None and self._task is None:
            self._schedule(self.max_seconds)
        while self._rows >= 2 * self.max_rows and self._task is not None:
            await asyncio.shield(self._task)
            self._raise_failure()

    async def drain(self) -> None:
        """Write everything owed now, and return once it is out."""
        while self._waiting or self._task is not None:
            self._raise_failure()
            self._start()
            if self._task is not None:
                await asyncio.shield(self._task)
        self._raise_failure()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.shield(self._task)

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise RuntimeError("writing committed rows out failed (see the log)") from self._failed

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None or not self._waiting or self._failed is not None:
            return
        batch, self._waiting, self._rows = self._waiting, [], 0
        self._task = asyncio.create_task(self._write(batch))

    async def _write(self, batch: list[Owed]) -> None:
        try:
            for owed in batch:
                self.sink.add_rows(owed.rows)
            began = time.monotonic()
            await self.sink.flush()
            inserted = time.monotonic() - began
            await self.publish([m for owed in batch for m in owed.messages])
            await self.forget([owed.outbox for owed in batch if owed.outbox is not None])
            self.written(batch, inserted)
        except asyncio.CancelledError:
            self._failed = RuntimeError("the write-out was cancelled")
            raise
        except Exception as exc:  # kept for the next add() or drain() to raise
            log.exception("writing %d committed chunks out failed", len(batch))
            self._failed = exc
        finally:
            self._task = None
            if self._waiting and self._failed is None:
                due = self._waiting[0].added_at + self.max_seconds - time.monotonic()
                if self._rows >= self.max_rows or due <= 0:
                    self._start()
                else:
                    self._schedule(due)
