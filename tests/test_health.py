"""What /healthz says about services the worker is waiting for."""

from __future__ import annotations

from pipeline.health import Health


def test_an_outage_is_dated_by_its_first_failure_and_ends_with_a_success() -> None:
    health = Health()
    assert health.up("redis") and health.waiting_for() == {}
    health.failed("redis", ConnectionError("redis://:secret@host refused"), now=10.0)
    health.failed("redis", TimeoutError("later"), now=20.0)
    assert not health.up("redis")
    assert health.waiting_for() == {"redis": {"since": 10.0, "error": "ConnectionError"}}
    health.ok("redis")
    assert health.up("redis") and health.waiting_for() == {}


def test_only_the_error_class_is_kept() -> None:
    """Messages can carry URLs with passwords; /healthz shows none of it."""
    health = Health()
    health.failed("clickhouse", OSError("http://default:s3cret@ch:8123 unreachable"), now=1.0)
    assert "s3cret" not in repr(health.waiting_for())
