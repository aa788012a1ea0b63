"""One retry policy for both transports: exponential back-off with jitter, server hints honoured.

A batch gets ``max_attempts`` tries within ``deadline`` seconds; only errors a
transport classes as transient (:class:`Transient`) are retried. When the
budget is spent the batch is reported undelivered — the emitter never waits
forever, and never gives up silently.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
)

__all__ = ["RetryPolicy", "Transient"]

log = logging.getLogger(__name__)


class Transient(Exception):
    """A failure worth retrying (429, 5xx, connection lost); ``retry_after``: the server's hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one batch before reporting it undelivered."""

    max_attempts: int = 10
    deadline: float = 120.0  # seconds from the first attempt; no new attempt starts after it
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    max_retry_after: float = 60.0  # a server's Retry-After is obeyed up to this

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, Transient) and error.retry_after is not None:
            return max(0.0, min(error.retry_after, self.max_retry_after))
        # "equal jitter": half the exponential step fixed, half random, so clients that failed
        # together (a collector restart) do not all come back at the same instant
        step = min(self.max_backoff, self.initial_backoff * 2.0 ** (state.attempt_number - 1))
        return step / 2 + random.uniform(0, step / 2)

    def retrying(self, on_retry: Callable[[BaseException], None] | None = None) -> AsyncRetrying:
        """A tenacity loop over this policy; ``on_retry`` sees each error that will be retried."""

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if error is None:  # pragma: no cover - tenacity only sleeps after a failure
                return
            log.warning(
                "send attempt %d failed (%s); retrying in %.2f s",
                state.attempt_number,
                error,
                state.upcoming_sleep,
            )
            if on_retry is not None:
                on_retry(error)

        return AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.deadline),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
        )
