"""Batching, linger, the bounded buffer, flush/close and failure reporting of the emitter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from pipeline.emit import (
    AsyncEmitter,
    BatchResult,
    BufferFull,
    DeliveryError,
    Emitter,
    EmitterClosed,
    InvalidEvent,
    Outgoing,
)
from pipeline.emit.testing import MemoryTransport


async def track_n(emitter: AsyncEmitter, n: int, prefix: str = "c") -> list[str]:
    return [
        await emitter.track("page_view", channel="web", customer_id=f"{prefix}{i}")
        for i in range(n)
    ]


async def test_batches_by_size_and_keeps_order() -> None:
    transport = MemoryTransport()
    async with AsyncEmitter(transport, max_batch_size=5, linger=60) as emitter:
        ids = await track_n(emitter, 12)
        await emitter.flush()
    assert [len(b) for b in transport.batches] == [5, 5, 2]
    assert [e["event_id"] for e in transport.events] == ids
    assert emitter.stats.sent == 12
    assert emitter.stats.batches == 3


async def test_full_batch_goes_without_waiting_for_linger() -> None:
    transport = MemoryTransport()
    async with AsyncEmitter(transport, max_batch_size=3, linger=60) as emitter:
        await track_n(emitter, 3)
        for _ in range(50):
            if transport.batches:
                break
            await asyncio.sleep(0.01)
        assert [len(b) for b in transport.batches] == [3]


async def test_linger_sends_a_partial_batch() -> None:
    """A lone event waits ``linger`` for company, then goes without any flush."""
    transport = MemoryTransport()
    async with AsyncEmitter(transport, max_batch_size=100, linger=0.3) as emitter:
        started = time.monotonic()
        await track_n(emitter, 2)
        await asyncio.sleep(0.1)
        assert transport.batches == []
        while not transport.batches:
            await asyncio.sleep(0.01)
        assert time.monotonic() - started >= 0.29
        assert [len(b) for b in transport.batches] == [2]


async def test_flush_skips_linger_and_waits_for_delivery() -> None:
    transport = MemoryTransport()
    async with AsyncEmitter(transport, linger=60) as emitter:
        await track_n(emitter, 4)
        await asyncio.wait_for(emitter.flush(), 2)
        assert len(transport.events) == 4
        assert emitter.stats.pending == 0
        await emitter.flush()  # nothing new: returns at once


async def test_close_flushes_and_refuses_later_events() -> None:
    transport = MemoryTransport()
    emitter = AsyncEmitter(transport, linger=60)
    await track_n(emitter, 3)
    await emitter.close()
    assert len(transport.events) == 3
    assert transport.closed
    await emitter.close()  # idempotent
    with pytest.raises(EmitterClosed):
        await emitter.track("page_view", channel="web", customer_id="late")


async def test_full_buffer_makes_track_wait_then_raise() -> None:
    """With the destination stalled, track blocks up to buffer_timeout, then BufferFull."""
    transport = MemoryTransport()
    transport.gate = asyncio.Event()
    emitter = AsyncEmitter(transport, max_batch_size=2, linger=0, max_buffer=3, buffer_timeout=0.2)
    await track_n(emitter, 3)  # two in flight (held at the gate), one waiting
    assert emitter.stats.pending == 3
    started = time.monotonic()
    with pytest.raises(BufferFull, match="max_buffer=3"):
        await emitter.track("page_view", channel="web", customer_id="x")
    assert time.monotonic() - started >= 0.19
    transport.gate.set()
    await emitter.track("page_view", channel="web", customer_id="after")
    await emitter.close()
    assert [e["customer_id"] for e in transport.events] == ["c0", "c1", "c2", "after"]
    assert emitter.stats.tracked == 4


async def test_track_waits_for_space_when_it_frees_in_time() -> None:
    transport = MemoryTransport()
    transport.gate = asyncio.Event()
    emitter = AsyncEmitter(transport, max_batch_size=1, linger=0, max_buffer=1, buffer_timeout=5)
    await track_n(emitter, 1)
    late = asyncio.ensure_future(emitter.track("page_view", channel="web", customer_id="late"))
    await asyncio.sleep(0.1)
    assert not late.done()
    transport.gate.set()
    await asyncio.wait_for(late, 2)
    await emitter.close()
    assert len(transport.events) == 2


async def test_invalid_event_raises_and_is_not_buffered() -> None:
    transport = MemoryTransport()
    async with AsyncEmitter(transport, channels=("web",)) as emitter:
        with pytest.raises(InvalidEvent, match="configured channel"):
            await emitter.track("page_view", channel="app", customer_id="c1")
        assert emitter.stats.tracked == 0
    assert transport.events == []


async def test_failed_batch_surfaces_on_flush_with_its_events() -> None:
    transport = MemoryTransport()
    transport.fail_with = ConnectionError("collector down")
    async with AsyncEmitter(transport, linger=60) as emitter:
        ids = await track_n(emitter, 3)
        with pytest.raises(DeliveryError, match="3 events not delivered") as info:
            await emitter.flush()
        assert [e["event_id"] for e in info.value.events] == ids
        assert isinstance(info.value.errors[0], ConnectionError)
        assert emitter.stats.failed == 3
        transport.fail_with = None
        await track_n(emitter, 1)
        await emitter.flush()  # the failure was reported once; later batches are fine
        assert emitter.stats.sent == 1


async def test_undelivered_events_held_are_bounded_too() -> None:
    """A caller that never flushes gets the failures from track once max_buffer are held."""
    transport = MemoryTransport()
    transport.fail_with = ConnectionError("down")
    emitter = AsyncEmitter(transport, max_batch_size=1, linger=0, max_buffer=3)
    ids = await track_n(emitter, 3)
    while emitter.stats.failed < 3:
        await asyncio.sleep(0.01)
    with pytest.raises(DeliveryError) as info:
        await emitter.track("page_view", channel="web", customer_id="next")
    assert [e["event_id"] for e in info.value.events] == ids
    transport.fail_with = None
    await emitter.track("page_view", channel="web", customer_id="next")
    await emitter.close()
    assert [e["customer_id"] for e in transport.events] == ["next"]


async def test_failures_of_several_batches_raise_once_on_close() -> None:
    transport = MemoryTransport()
    transport.fail_with = ConnectionError("down")
    emitter = AsyncEmitter(transport, max_batch_size=2, linger=60)
    await track_n(emitter, 5)
    with pytest.raises(DeliveryError, match="5 events in 3 batches") as info:
        await emitter.close()
    assert len(info.value.events) == 5


async def test_rejections_reach_the_callback_and_the_counter() -> None:
    seen: list[tuple[str, str, str]] = []

    def on_rejected(event: Mapping[str, Any], code: str, reason: str) -> None:
        seen.append((event["event_type"], code, reason))
        raise RuntimeError("a broken callback must not stop delivery")

    transport = MemoryTransport(reject_types={"search": "search is not allowed here"})
    async with AsyncEmitter(transport, on_rejected=on_rejected, linger=60) as emitter:
        await emitter.track("search", channel="web", customer_id="c1")
        await emitter.track("page_view", channel="web", customer_id="c1")
        await emitter.flush()  # rejections are not delivery errors: they never succeed
        await emitter.track("search", channel="web", customer_id="c2")
    assert seen == [("search", "schema", "search is not allowed here")] * 2
    assert (emitter.stats.rejected, emitter.stats.sent) == (2, 1)


class BrokenTransport(MemoryTransport):
    async def send(self, batch: Sequence[Outgoing]) -> BatchResult:
        raise RuntimeError("bug in transport")


async def test_a_transport_bug_is_a_delivery_error_not_a_dead_sender() -> None:
    emitter = AsyncEmitter(BrokenTransport(), linger=60)
    await track_n(emitter, 2)
    with pytest.raises(DeliveryError, match="bug in transport"):
        await emitter.flush()
    await track_n(emitter, 1)  # the sender is still alive
    with pytest.raises(DeliveryError):
        await emitter.close()


async def test_flush_timeout() -> None:
    transport = MemoryTransport()
    transport.gate = asyncio.Event()
    emitter = AsyncEmitter(transport, linger=0)
    await track_n(emitter, 1)
    with pytest.raises(TimeoutError):
        await emitter.flush(timeout=0.1)
    transport.gate.set()
    await emitter.close()
    assert len(transport.events) == 1


def test_sync_emitter_from_many_threads() -> None:
    """Eight threads tracking at once: every event delivered exactly once."""
    transport = MemoryTransport()
    with Emitter(
        transport, max_batch_size=64, linger=0.01, max_buffer=100, buffer_timeout=10
    ) as emitter:

        def work(t: int) -> None:
            for i in range(250):
                emitter.track("page_view", channel="app", customer_id=f"t{t}-{i}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        emitter.flush()
        assert emitter.stats.sent == 2000
    counts = Counter(e["customer_id"] for e in transport.events)
    assert len(counts) == 2000 and set(counts.values()) == {1}
    assert all(len(b) <= 64 for b in transport.batches)
    # each thread's events keep their order
    for t in range(8):
        mine = [e["customer_id"] for e in transport.events if e["customer_id"].startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(250)]


def test_sync_emitter_errors_reach_the_caller() -> None:
    transport = MemoryTransport()
    transport.fail_with = ConnectionError("down")
    emitter = Emitter(transport, linger=60)
    with pytest.raises(InvalidEvent):
        emitter.track("page_view", channel="web")
    emitter.identify("c1", "a1", channel="web")
    with pytest.raises(DeliveryError) as info:
        emitter.close()
    assert info.value.events[0]["event_type"] == "identify"
    assert transport.closed
    emitter.close()  # idempotent
    with pytest.raises(EmitterClosed):
        emitter.track("page_view", channel="web", customer_id="c1")


def test_sync_emitter_buffer_full() -> None:
    transport = MemoryTransport()
    gate = asyncio.Event()
    transport.gate = gate
    emitter = Emitter(transport, max_batch_size=1, linger=0, max_buffer=2, buffer_timeout=0.1)
    emitter.track("page_view", channel="web", customer_id="c1")
    emitter.track("page_view", channel="web", customer_id="c2")
    with pytest.raises(BufferFull):
        emitter.track("page_view", channel="web", customer_id="c3")
    emitter._loop.call_soon_threadsafe(gate.set)
    emitter.close()
    assert [e["customer_id"] for e in transport.events] == ["c1", "c2"]


def test_sync_flush_timeout_and_close_racing_track() -> None:
    """A sync flush times out like the async one; tracks racing close() never hang."""
    transport = MemoryTransport()
    gate = asyncio.Event()
    transport.gate = gate
    emitter = Emitter(transport, linger=0)
    emitter.track("page_view", channel="web", customer_id="c1")
    with pytest.raises(TimeoutError):
        emitter.flush(timeout=0.1)
    emitter._loop.call_soon_threadsafe(gate.set)
    outcomes: list[str] = []

    def spam() -> None:
        for i in range(500):
            try:
                emitter.track("page_view", channel="web", customer_id=f"s{i}")
            except EmitterClosed:
                outcomes.append("closed")
                return
        outcomes.append("done")

    thread = threading.Thread(target=spam)
    thread.start()
    emitter.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(transport.events) == emitter.stats.tracked  # whatever was taken was sent
