"""What the emitter raises, so callers can catch one family of errors.

Each class answers a different question for the caller: ``InvalidEvent`` — fix
the call; ``BufferFull`` — the destination is not keeping up, slow down or
shed load deliberately; ``DeliveryError`` — these events did not arrive after
the whole retry budget, here they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BufferFull", "DeliveryError", "EmitError", "EmitterClosed", "InvalidEvent"]


class EmitError(Exception):
    """Base of every error the emitter raises on purpose."""


class InvalidEvent(EmitError, ValueError):
    """The event would be rejected by the worker; raised at ``track`` time, never later.

    ``code`` is one of :data:`pipeline.events.REJECTION_CODES`, ``reason`` the
    validator's readable message (``"channel: 'fax' is not a configured channel …"``).
    """

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class BufferFull(EmitError):
    """The bounded local buffer stayed full for the whole wait; the event was not taken."""


class EmitterClosed(EmitError, RuntimeError):
    """``track`` after ``close()``: the event was not taken."""


class DeliveryError(EmitError):
    """Events that could not be delivered: retries exhausted, or a permanent error (401, 400…).

    Raised by ``flush()`` / ``close()``; ``events`` are the undelivered events as
    sent (JSON objects), so the caller can store or resend them (resending is safe:
    the worker deduplicates on ``event_id``). ``errors`` are the underlying causes.
    """

    def __init__(
        self,
        message: str,
        events: Sequence[Mapping[str, Any]] = (),
        errors: Sequence[BaseException] = (),
    ) -> None:
        super().__init__(message)
        self.events: list[Mapping[str, Any]] = list(events)
        self.errors: list[BaseException] = list(errors)

    @classmethod
    def combine(cls, failures: Sequence[DeliveryError]) -> DeliveryError:
        """One error for several failed batches, so ``flush()`` raises once with everything."""
        if len(failures) == 1:
            return failures[0]
        events = [e for f in failures for e in f.events]
        errors = [c for f in failures for c in f.errors]
        first = failures[0]
        error = cls(
            f"{len(events)} events in {len(failures)} batches were not delivered; first: {first}",
            events,
            errors,
        )
        error.__cause__ = first
        return error
