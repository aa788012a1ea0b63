"""Per-source token buckets, with the clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.collector.ratelimit import RateLimiter


def test_burst_then_wait_then_refill() -> None:
    limiter = RateLimiter(rate=10, burst=20)
    assert limiter.take("web", 20, now=0.0) == 0
    assert limiter.take("web", 5, now=0.0) == pytest.approx(0.5)
    assert limiter.take("web", 5, now=0.5) == 0  # 5 tokens came back in 0.5 s


def test_sources_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate=1, burst=10)
    assert limiter.take("web", 10, now=0.0) == 0
    assert limiter.take("web", 1, now=0.0) > 0
    assert limiter.take("pos", 10, now=0.0) == 0


def test_a_refused_request_spends_nothing() -> None:
    limiter = RateLimiter(rate=1, burst=10)
    assert limiter.take("web", 8, now=0.0) == 0
    assert limiter.take("web", 5, now=0.0) == pytest.approx(3.0)
    assert limiter.take("web", 2, now=0.0) == 0


def test_a_clock_going_back_adds_no_tokens() -> None:
    limiter = RateLimiter(rate=100, burst=10)
    assert limiter.take("web", 10, now=100.0) == 0
    assert limiter.take("web", 1, now=50.0) > 0


@given(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 5)), max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(requests: list[tuple[int, float]]) -> None:
    """Over any run, admitted events ≤ burst + rate × elapsed time."""
    limiter = RateLimiter(rate=20, burst=50)
    now = admitted = 0.0
    for events, gap in requests:
        now += gap
        if limiter.take("web", events, now) == 0:
            admitted += events
        assert admitted <= 50 + 20 * now + 1e-6


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=10)
