"""Per-source token buckets: one source system flooding cannot starve the others.

Pure (the caller passes the clock), so the arithmetic is tested without sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """``rate`` events per second per source, with bursts of up to ``burst`` events."""

    rate: float
    burst: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")

    def take(self, source: str, events: int, now: float) -> float:
        """Spend ``events`` tokens; return 0 if allowed, else the seconds to wait first.

        A request larger than the burst can never pass; the caller checks batch
        size against the burst first so that answer is a 413, not an endless 429.
        """
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        bucket.at = max(bucket.at, now)
        if bucket.tokens >= events:
            bucket.tokens -= events
            return 0.0
        return (events - bucket.tokens) / self.rate
