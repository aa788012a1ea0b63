"""The bounded local buffer between ``track`` and the sender.

The bound covers events waiting *and* events in flight, so memory stays
bounded while a transport spends its retry budget on a dead collector: a
caller that outruns the destination is made to wait, then told
(:class:`BufferFull`), and never has events dropped behind its back.
Lives on one event loop; not thread-safe by itself (the sync emitter hops
onto that loop).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from .builder import Outgoing
from .errors import BufferFull

__all__ = ["Entry", "EventBuffer"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A buffered event with its place in line and when it arrived (loop time)."""

    seq: int
    at: float
    item: Outgoing


class EventBuffer:
    """FIFO of :class:`Entry`, holding at most ``capacity`` events until they are released."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("max_buffer must be at least 1")
        self.capacity = capacity
        self._slots = asyncio.Semaphore(capacity)  # fair: waiters get space in arrival order
        self._queue: deque[Entry] = deque()
        self._held = 0
        self._seq = 0

    def __len__(self) -> int:
        """Events waiting to be taken (not counting those in flight)."""
        return len(self._queue)

    @property
    def held(self) -> int:
        """Events waiting plus events taken but not released yet: what counts against capacity."""
        return self._held

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest event put (0 before any)."""
        return self._seq

    @property
    def oldest(self) -> Entry:
        return self._queue[0]

    async def reserve(self, timeout: float | None) -> None:
        """Claim space for one event, waiting up to ``timeout`` s; then :meth:`append` it.

        Raises :class:`BufferFull` when no space freed up in time (``timeout=0``
        fails at once; ``None`` waits for as long as it takes). Split from
        ``append`` so a caller can re-check its own state after the wait.
        """
        if self._slots.locked():
            if timeout is not None and timeout <= 0:
                raise self._full(timeout)
            try:
                async with asyncio.timeout(timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise self._full(timeout) from None
        else:
            await self._slots.acquire()  # free space: returns without suspending
        self._held += 1

    def unreserve(self) -> None:
        """Give back space claimed by :meth:`reserve` and not used."""
        self.release(1)

    def append(self, item: Outgoing) -> int:
        """Queue an event into space already reserved; return its sequence number."""
        self._seq += 1
        self._queue.append(Entry(self._seq, asyncio.get_running_loop().time(), item))
        return self._seq

    def take(self, n: int) -> list[Entry]:
        """Remove up to ``n`` of the oldest entries; they still count until :meth:`release`."""
        count = min(n, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    def release(self, n: int) -> None:
        """Free the space of ``n`` taken events (delivered or given up on)."""
        self._held -= n
        for _ in range(n):
            self._slots.release()

    def _full(self, timeout: float | None) -> BufferFull:
        return BufferFull(
            f"local buffer full: {self._held} events waiting or in flight (max_buffer="
            f"{self.capacity}) and no space freed within {timeout} s; the destination is"
            " not keeping up or is down"
        )
