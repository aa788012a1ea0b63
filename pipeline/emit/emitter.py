"""The emitter: ``track``/``identify`` → bounded buffer → batches → a transport.

:class:`AsyncEmitter` is the core and lives on one event loop. :class:`Emitter`
is the same core for sync code, on a background thread with its own loop.

Guarantees, in one place:

* ``track`` returns once the event is validated and buffered; a bad event raises
  :class:`InvalidEvent` there and then.
* The buffer is bounded (``max_buffer`` events waiting or in flight). When full,
  ``track`` waits up to ``buffer_timeout`` and then raises :class:`BufferFull`;
  nothing is dropped to make room.
* Batches go out one at a time, in order, when ``max_batch_size`` events are
  waiting or the oldest has waited ``linger`` seconds, or on ``flush``/``close``.
* Every event ends as sent, rejected (the collector refused it for good:
  ``on_rejected`` and the ``rejected`` counter) or failed after the retry budget
  (raised as :class:`DeliveryError`, with the events, by the next ``flush()`` or
  ``close()`` — or by ``track`` once ``max_buffer`` failed events are held).
* Delivery is at least once: a retry may repeat an event the destination already
  took; the worker drops repeats by ``event_id``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from pipeline.events import DEFAULT_CHANNELS

from .buffer import Entry, EventBuffer
from .builder import EventBuilder, Outgoing
from .errors import DeliveryError, EmitError, EmitterClosed
from .transports import BatchResult, Transport

__all__ = ["AsyncEmitter", "DeliveryStats", "Emitter", "RejectedCallback"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``on_rejected(event, code, reason)``: an event the destination refused for good.
RejectedCallback = Callable[[Mapping[str, Any], str, str], None]


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """Counters since the emitter was built (a snapshot; events, not requests)."""

    tracked: int = 0  # accepted into the buffer
    sent: int = 0  # acknowledged by Kafka or accepted by the collector
    rejected: int = 0  # refused for good by the collector (see on_rejected)
    failed: int = 0  # given up on after the retry budget or a permanent error
    retried: int = 0  # sent again after a transient failure, once per event per retry
    batches: int = 0  # batches handed to the transport
    pending: int = 0  # waiting in the buffer or in flight now


class AsyncEmitter:
    """Validate, buffer and send events from async code; one event loop only.

    Use as ``async with AsyncEmitter(transport) as emitter: await emitter.track(...)``,
    or call :meth:`close` yourself: events still buffered are sent by ``close``, and
    only by it (or :meth:`flush`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        channels: Collection[str] = DEFAULT_CHANNELS,
        source: str | None = None,
        max_batch_size: int = 500,
        linger: float = 0.2,
        max_buffer: int = 10_000,
        buffer_timeout: float | None = 5.0,
        on_rejected: RejectedCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self._transport = transport
        self._builder = EventBuilder(channels, source=source, clock=clock)
        self._buffer = EventBuffer(max_buffer)
        self._max_batch = max_batch_size
        self._linger = linger
        self._buffer_timeout = buffer_timeout
        self._on_rejected = on_rejected
        self._counts: dict[str, int] = dict.fromkeys(
            ("tracked", "sent", "rejected", "failed", "retried", "batches"), 0
        )
        self._failures: list[DeliveryError] = []
        self._failed_held = 0  # events in self._failures, bounded by max_buffer
        self._wakeup = asyncio.Event()
        self._flush_seq = 0  # events up to this sequence number go out without lingering
        self._done_seq = 0  # every event up to this one is sent, rejected or failed
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def builder(self) -> EventBuilder:
        """The event builder: the same validation, without sending (e.g. for a dry run)."""
        return self._builder

    @property
    def stats(self) -> DeliveryStats:
        return DeliveryStats(**self._counts, pending=self._buffer.held)

    async def start(self) -> None:
        """Connect the transport now (fail fast on a wrong address) and start the sender."""
        self._ensure_open()
        await self._transport.start()
        self._ensure_sender()

    async def track(
        self,
        event_type: str,
        *,
        channel: str,
        customer_id: str | None = None,
        anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event; return its ``event_id``.

        Raises InvalidEvent (fix the call), BufferFull (destination not keeping up)
        or EmitterClosed.
        """
        item = self._builder.track(
            event_type,
            channel=channel,
            customer_id=customer_id,
            anonymous_id=anonymous_id,
            properties=properties,
            touchpoint=touchpoint,
            occurred_at=occurred_at,
            event_id=event_id,
        )
        await self.enqueue(item)
        return item.event_id

    async def identify(
        self,
        customer_id: str,
        anonymous_id: str,
        *,
        channel: str,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Link a device to a customer (an ``identify`` event with both ids); return its id."""
        item = self._builder.identify(
            customer_id,
            anonymous_id,
            channel=channel,
            properties=properties,
            touchpoint=touchpoint,
            occurred_at=occurred_at,
            event_id=event_id,
        )
        await self.enqueue(item)
        return item.event_id

    async def enqueue(self, item: Outgoing, timeout: float | None = None) -> None:
        """Buffer an event built by :attr:`builder` (``timeout`` defaults to ``buffer_timeout``).

        Undelivered events wait for ``flush()``/``close()`` to hand them over, but
        at most ``max_buffer`` of them: past that, this call raises the DeliveryError
        instead, so a caller that never flushes cannot grow memory during an outage.
        """
        self._ensure_open()
        if self._failed_held >= self._buffer.capacity:
            self._raise_failures()
        self._ensure_sender()
        await self._buffer.reserve(self._buffer_timeout if timeout is None else timeout)
        if self._closed:  # closed while we waited for space: the sender may be gone already
            self._buffer.unreserve()
            raise EmitterClosed("emitter closed while waiting for buffer space; event not taken")
        self._buffer.append(item)
        self._counts["tracked"] += 1
        size = len(self._buffer)
        if size == 1 or size >= self._max_batch:  # a new linger deadline, or a full batch
            self._wakeup.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything tracked so far, now; raise DeliveryError for what could not be sent.

        Waits for the outcome of every event tracked before the call (``timeout``:
        raise TimeoutError after that many seconds; the events stay in the pipeline).
        """
        target = self._buffer.last_seq
        if target > self._done_seq:
            self._ensure_sender()
            self._flush_seq = max(self._flush_seq, target)
            self._wakeup.set()
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._flushers.append((target, future))
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        self._raise_failures()

    async def close(self) -> None:
        """Send what is buffered, release the transport; raise DeliveryError for what failed.

        Idempotent; ``track`` raises :class:`EmitterClosed` afterwards.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)
        self._raise_failures()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ the sender

    def _ensure_open(self) -> None:
        if self._closed:
            raise EmitterClosed("emitter is closed; event not taken")

    def _ensure_sender(self) -> None:
        sender = self._sender
        if sender is None:
            self._sender = asyncio.ensure_future(self._run())
            self._sender.add_done_callback(self._sender_done)
        elif sender.done() and not sender.cancelled() and sender.exception() is not None:
            raise EmitError("the emitter's sender stopped on an error") from sender.exception()

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        """Wake every flush waiter if the sender ends, so none waits forever on a dead task."""
        error: BaseException | None = None
        if task.cancelled():
            error = EmitError("the emitter's sender was cancelled")
        elif task.exception() is not None:
            error = EmitError(f"the emitter's sender stopped on an error: {task.exception()!r}")
            error.__cause__ = task.exception()
            log.error("emitter sender stopped", exc_info=task.exception())
        for _, future in self._flushers:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        self._flushers.clear()

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                return
            await self._deliver(batch)

    async def _next_batch(self) -> list[Entry]:
        """Wait until a batch is due, then take it; empty once closing and drained."""
        loop = asyncio.get_running_loop()
        buffer = self._buffer
        while True:
            if not buffer:
                if self._closed:
                    return []
                await self._wait(None)
                continue
            oldest = buffer.oldest
            due = oldest.at + self._linger
            now = loop.time()
            if (
                len(buffer) >= self._max_batch
                or self._closed
                or oldest.seq <= self._flush_seq
                or now >= due
            ):
                return buffer.take(self._max_batch)
            await self._wait(due - now)

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _deliver(self, entries: list[Entry]) -> None:
        items = [entry.item for entry in entries]
        self._counts["batches"] += 1
        try:
            result = await self._transport.send(items)
        except Exception as exc:  # a transport bug: report the batch, keep the sender alive
            log.exception("transport failed on a batch of %d events", len(items))
            result = BatchResult()
            result.fail(items, exc)
        finally:
            self._buffer.release(len(entries))
        self._record(result)
        self._done_seq = entries[-1].seq
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._flushers:
            if target <= self._done_seq:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._flushers = still

    def _record(self, result: BatchResult) -> None:
        counts = self._counts
        counts["sent"] += result.sent
        counts["retried"] += result.retried
        counts["rejected"] += len(result.rejected)
        counts["failed"] += len(result.failed)
        for rejected in result.rejected:
            if self._on_rejected is None:
                log.warning(
                    "event %s rejected by the collector (%s): %s",
                    rejected.item.event_id,
                    rejected.code,
                    rejected.reason,
                )
                continue
            try:
                self._on_rejected(rejected.item.event, rejected.code, rejected.reason)
            except Exception:  # the caller's callback must not stop delivery of later batches
                log.exception("on_rejected callback failed for event %s", rejected.item.event_id)
        if result.failed:
            first = result.errors[0] if result.errors else None
            error = DeliveryError(
                f"{len(result.failed)} events not delivered: {first}",
                [item.event for item in result.failed],
                result.errors,
            )
            error.__cause__ = first
            log.error("%s", error)
            self._failures.append(error)
            self._failed_held += len(result.failed)

    def _raise_failures(self) -> None:
        if self._failures:
            failures, self._failures = self._failures, []
            self._failed_held = 0
            raise DeliveryError.combine(failures)

    async def _shutdown(self) -> None:
        self._closed = True
        self._wakeup.set()
        try:
            if self._sender is not None:
                await self._sender
        finally:
            await self._transport.close()


class Emitter:
    """The emitter for sync code: the async core on a background thread with its own loop.

    Thread-safe: any number of threads may ``track`` at once. Validation runs in
    the calling thread, so ``InvalidEvent`` has the caller's traceback; buffering
    and sending run on the emitter's thread. ``on_rejected`` is called on that
    thread. Use as a context manager, or call :meth:`close`; an emitter still
    open at interpreter exit is closed (flushed) by an ``atexit`` hook.
    Do not use it from inside a running event loop (it blocks): use AsyncEmitter.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        channels: Collection[str] = DEFAULT_CHANNELS,
        source: str | None = None,
        max_batch_size: int = 500,
        linger: float = 0.2,
        max_buffer: int = 10_000,
        buffer_timeout: float | None = 5.0,
        on_rejected: RejectedCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = AsyncEmitter(
            transport,
            channels=channels,
            source=source,
            max_batch_size=max_batch_size,
            linger=linger,
            max_buffer=max_buffer,
            buffer_timeout=buffer_timeout,
            on_rejected=on_rejected,
            clock=clock,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="journey-emitter", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        self._submit = threading.Lock()
        self._stopped = False  # the loop is stopping or stopped: no more calls reach it
        # Held until close(): an emitter nobody closed is flushed at exit, not lost.
        atexit.register(self._close_at_exit)

    @property
    def builder(self) -> EventBuilder:
        return self._core.builder

    @property
    def stats(self) -> DeliveryStats:
        return self._core.stats  # plain int reads: safe from any thread

    def start(self) -> None:
        """Connect the transport now, so a wrong address fails here rather than on a flush."""
        self._call(self._core.start())

    def track(
        self,
        event_type: str,
        *,
        channel: str,
        customer_id: str | None = None,
        anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Buffer one event; return its ``event_id`` (see :meth:`AsyncEmitter.track`)."""
        item = self._core.builder.track(
            event_type,
            channel=channel,
            customer_id=customer_id,
            anonymous_id=anonymous_id,
            properties=properties,
            touchpoint=touchpoint,
            occurred_at=occurred_at,
            event_id=event_id,
        )
        self._call(self._core.enqueue(item))
        return item.event_id

    def identify(
        self,
        customer_id: str,
        anonymous_id: str,
        *,
        channel: str,
        properties: Mapping[str, Any] | None = None,
        touchpoint: str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Link a device to a customer (see :meth:`AsyncEmitter.identify`); return the event id."""
        item = self._core.builder.identify(
            customer_id,
            anonymous_id,
            channel=channel,
            properties=properties,
            touchpoint=touchpoint,
            occurred_at=occurred_at,
            event_id=event_id,
        )
        self._call(self._core.enqueue(item))
        return item.event_id

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything tracked so far is sent; raise DeliveryError for failures."""
        self._call(self._core.flush(timeout))

    def close(self) -> None:
        """Flush, release the transport and stop the thread; raise DeliveryError for failures."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            self._call(self._core.close())
        finally:
            with self._submit:
                self._stopped = True
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            # Calls that raced close() reached the loop just before it stopped: finish
            # them (they raise EmitterClosed) so their callers are answered.
            leftover = asyncio.all_tasks(self._loop)
            if leftover:
                self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _close_at_exit(self) -> None:
        """Flush an emitter its owner forgot to close, so buffered events are not lost at exit."""
        try:
            self.close()
        except Exception:
            log.exception("closing the journey emitter at exit failed")

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        # Submitting under the lock that close() takes to stop the loop: every call
        # either reaches the loop before it stops (and close() runs it to the end)
        # or is refused here, so none can wait forever on a stopped loop.
        with self._submit:
            if self._stopped:
                coro.close()
                raise EmitterClosed("emitter is closed; event not taken")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()
