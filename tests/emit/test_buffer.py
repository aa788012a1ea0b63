"""The local buffer is bounded over waiting and in-flight events, and says so when full."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.emit import BufferFull, EventBuilder
from pipeline.emit.buffer import EventBuffer

ITEM = EventBuilder().track("page_view", channel="web", customer_id="c1")


async def test_fifo_with_sequence_numbers() -> None:
    buffer = EventBuffer(10)
    for _ in range(3):
        await buffer.reserve(0)
        buffer.append(ITEM)
    assert [e.seq for e in buffer.take(2)] == [1, 2]
    assert len(buffer) == 1
    assert buffer.held == 3  # taken but not released still counts
    assert buffer.last_seq == 3


async def test_full_buffer_raises_after_the_timeout() -> None:
    buffer = EventBuffer(2)
    for _ in range(2):
        await buffer.reserve(0)
        buffer.append(ITEM)
    started = time.monotonic()
    with pytest.raises(BufferFull, match="max_buffer=2"):
        await buffer.reserve(0.2)
    assert time.monotonic() - started >= 0.19
    with pytest.raises(BufferFull):
        await buffer.reserve(0)  # no wait at all
    assert buffer.held == 2


async def test_in_flight_events_count_until_released() -> None:
    """Taking a batch frees nothing: only release() does, once the batch is done."""
    buffer = EventBuffer(1)
    await buffer.reserve(0)
    buffer.append(ITEM)
    buffer.take(1)
    with pytest.raises(BufferFull):
        await buffer.reserve(0.05)
    waiter = asyncio.ensure_future(buffer.reserve(5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    buffer.release(1)
    await asyncio.wait_for(waiter, 1)
    assert buffer.held == 1


async def test_waiters_get_space_in_arrival_order() -> None:
    buffer = EventBuffer(1)
    await buffer.reserve(0)
    order: list[int] = []

    async def wait(n: int) -> None:
        await buffer.reserve(5)
        order.append(n)

    tasks = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    for _ in range(3):
        buffer.release(1)
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        EventBuffer(0)
