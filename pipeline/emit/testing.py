"""An in-memory transport for testing code that emits events (no broker, no collector).

Ship it with the package: users testing their own instrumentation need it as
much as our tests do. ``fail_with`` and ``gate`` let a test stage an outage or a
slow destination.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from .builder import Outgoing
from .transports import BatchResult, Rejected

__all__ = ["MemoryTransport"]


class MemoryTransport:
    """Records every batch; optionally rejects event types, fails batches, or holds them."""

    def __init__(self, *, reject_types: Mapping[str, str] | None = None) -> None:
        self.batches: list[list[Outgoing]] = []
        self.reject_types = dict(reject_types or {})  # event_type -> reason, rejected as "schema"
        self.fail_with: BaseException | None = None  # every batch fails with this while set
        self.gate: asyncio.Event | None = None  # while set and not open, send() waits on it
        self.started = False
        self.closed = False

    @property
    def events(self) -> list[Mapping[str, Any]]:
        """Every event delivered (or rejected), in order."""
        return [item.event for batch in self.batches for item in batch]

    async def start(self) -> None:
        self.started = True

    async def send(self, batch: Sequence[Outgoing]) -> BatchResult:
        if self.gate is not None:
            await self.gate.wait()
        result = BatchResult()
        if self.fail_with is not None:
            result.fail(batch, self.fail_with)
            return result
        self.batches.append(list(batch))
        for item in batch:
            reason = self.reject_types.get(str(item.event["event_type"]))
            if reason is None:
                result.sent += 1
            else:
                result.rejected.append(Rejected(item, "schema", reason))
        return result

    async def close(self) -> None:
        self.closed = True
