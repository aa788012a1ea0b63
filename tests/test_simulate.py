"""The simulator is pure: same seed, same traffic; and the traffic looks like the design says."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from pipeline.simulate import (
    CHANNEL_MIX,
    CHANNELS,
    Incident,
    format_time,
    generate,
    key_of,
    parse_incident,
)

START = 1_700_000_000.0
EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAPPED = {
    "ad_click",
    "page_view",
    "store_visit",
    "social_engagement",
    "newsletter_signup",
    "app_install",
    "product_view",
    "search",
    "add_to_cart",
    "wishlist_add",
    "store_consultation",
    "demo_request",
    "order_completed",
    "repeat_purchase",
    "subscription_renewed",
    "support_resolved",
    "loyalty_redeemed",
    "review_submitted",
    "nps_response",
    "referral_sent",
}


def events(
    seed: int = 7, rate: float = 50.0, duration: float = 400.0, incidents: tuple[Incident, ...] = ()
) -> list[dict[str, Any]]:
    return list(generate(random.Random(seed), START, rate, duration, incidents))


@pytest.fixture(scope="module")
def many() -> list[dict[str, Any]]:
    evs = events(seed=11, rate=100.0, duration=300.0)
    assert len(evs) >= 20_000
    return evs


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["occurred_at"]).timestamp()


def test_same_seed_same_events() -> None:
    assert events(seed=3, duration=60) == events(seed=3, duration=60)
    assert events(seed=3, duration=60) != events(seed=4, duration=60)


def test_event_time_order_and_bounds(many: list[dict[str, Any]]) -> None:
    times = [when(e) for e in many]
    assert times == sorted(times)
    assert times[0] >= START and times[-1] <= START + 300.0


def test_rate_is_roughly_as_asked(many: list[dict[str, Any]]) -> None:
    assert 0.8 * 100 * 300 <= len(many) <= 1.2 * 100 * 300


def test_every_event_is_schema_shaped(many: list[dict[str, Any]]) -> None:
    for e in many:
        assert isinstance(e["event_id"], str) and 1 <= len(e["event_id"]) <= 128
        assert e["occurred_at"].endswith("Z") or e["occurred_at"].endswith("+00:00")
        datetime.fromisoformat(e["occurred_at"])  # RFC 3339 with offset
        assert isinstance(e.get("customer_id") or e.get("anonymous_id"), str)
        assert e["channel"] in CHANNELS
        assert EVENT_TYPE.match(e["event_type"]), e["event_type"]
        assert isinstance(e.get("touchpoint", ""), str)
        props = e.get("properties", {})
        assert isinstance(props, dict)
        assert all(not isinstance(v, dict | list) for v in props.values())  # flat
        if "csat" in props:
            assert 1 <= props["csat"] <= 5
        if "nps" in props:
            assert 0 <= props["nps"] <= 10
        assert e["schema_version"] == 1
        assert set(e) <= {
            "event_id",
            "occurred_at",
            "customer_id",
            "anonymous_id",
            "channel",
            "event_type",
            "touchpoint",
            "properties",
            "schema_version",
        }
        assert key_of(e) == (e.get("customer_id") or e["anonymous_id"])


def test_channel_mix_roughly_as_configured(many: list[dict[str, Any]]) -> None:
    counts = Counter(e["channel"] for e in many)
    for channel, share in CHANNEL_MIX.items():
        assert abs(counts[channel] / len(many) - share) < 0.03, (channel, counts)


def test_noise_identity_and_scores_present(many: list[dict[str, Any]]) -> None:
    types = Counter(e["event_type"] for e in many)
    unmapped = sum(n for t, n in types.items() if t not in MAPPED)
    assert 0.015 < unmapped / len(many) < 0.06
    assert any("customer_id" not in e for e in many)  # anonymous visitors
    assert any("customer_id" in e and "anonymous_id" in e for e in many)  # stitching
    orders = [e for e in many if e["event_type"] == "order_completed"]
    assert orders and all(
        e["properties"]["order_value"] > 0 and e["properties"]["currency"] for e in orders
    )
    ratings = [e["properties"]["rating"] for e in many if e["event_type"] == "review_submitted"]
    nps = [e["properties"]["nps"] for e in many if e["event_type"] == "nps_response"]
    assert any(r >= 4 for r in ratings) and any(r < 4 for r in ratings)
    assert any(n >= 9 for n in nps) and any(n < 9 for n in nps)
    # a walk-in purchase: a store customer whose order follows awareness directly
    stages: dict[str, list[str]] = {}
    for e in many:
        stages.setdefault(key_of(e), []).append(e["event_type"])
    assert any(seq[:2] == ["store_visit", "order_completed"] for seq in stages.values())


def test_duplicates_at_about_one_percent(many: list[dict[str, Any]]) -> None:
    ids = Counter(e["event_id"] for e in many)
    dups = sum(n - 1 for n in ids.values())
    assert 0.005 < dups / len(many) < 0.02
    by_id: dict[str, dict[str, Any]] = {}
    for e in many:
        if e["event_id"] in by_id:
            assert by_id[e["event_id"]] == e  # a resend is the very same event
        by_id[e["event_id"]] = e


def test_incident_lowers_app_purchases_after_start() -> None:
    incident = Incident("purchase", "app", 0.9, 120.0)

    def app_orders(evs: list[dict[str, Any]]) -> tuple[int, int]:
        before = after = 0
        for e in evs:
            if e["channel"] == "app" and e["event_type"] == "order_completed":
                if when(e) < START + 120.0:
                    before += 1
                else:
                    after += 1
        return before, after

    base_before, base_after = app_orders(events(seed=5, rate=100, duration=480))
    inc_before, inc_after = app_orders(
        events(seed=5, rate=100, duration=480, incidents=(incident,))
    )
    assert inc_before == base_before  # same traffic until the incident starts
    assert base_after > 100
    assert inc_after < 0.3 * base_after
    failed = [
        e
        for e in events(seed=5, rate=100, duration=480, incidents=(incident,))
        if e["event_type"] == "checkout_failed"
    ]
    assert failed and all(e["channel"] == "app" and when(e) >= START + 120 for e in failed)


def test_format_time_is_rfc3339_utc() -> None:
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app:purchase:0.9@60s", Incident("purchase", "app", 0.9, 60.0)),
        ("app:purchase:0.9@60.0s", Incident("purchase", "app", 0.9, 60.0)),
        ("web:consideration:50%@2m", Incident("consideration", "web", 0.5, 120.0)),
        ("store:retention:1", Incident("retention", "store", 1.0, 0.0)),
        ("purchase:call_center:0.25@1h", Incident("purchase", "call_center", 0.25, 3600.0)),
        ("APP:Purchase:0.9@30", Incident("purchase", "app", 0.9, 30.0)),
    ],
)
def test_parse_incident(text: str, expected: Incident) -> None:
    assert parse_incident(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app-purchase-0.9", "expected CHANNEL:STAGE:RATE"),
        ("", "expected CHANNEL:STAGE:RATE"),
        ("fax:purchase:0.9", "unknown channel 'fax'"),
        ("app:checkout:0.9", "unknown stage 'checkout'"),
        ("app:purchase:1.5", "between 0 and 1"),
        ("app:purchase:0.9@soon", "expected CHANNEL:STAGE:RATE"),
    ],
)
def test_parse_incident_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_incident(text)


def test_invalid_rate() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        next(generate(random.Random(1), START, 0.0, 10.0))


def _spans(events: list[dict[str, Any]]) -> list[float]:
    """Seconds between each customer's first and last event."""
    times: dict[str, list[float]] = {}
    for e in events:
        ts = datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00")).timestamp()
        times.setdefault(e.get("customer_id") or e["anonymous_id"], []).append(ts)
    return [max(t) - min(t) for t in times.values() if len(t) > 1]


def test_time_scale_makes_customers_quicker_and_keeps_the_rest() -> None:
    normal = list(generate(random.Random(5), START, 20.0, 600.0))
    quick = list(generate(random.Random(5), START, 20.0, 600.0, time_scale=0.1))
    mean = sum(_spans(normal)) / len(_spans(normal))
    mean_quick = sum(_spans(quick)) / len(_spans(quick))
    assert 0.05 < mean_quick / mean < 0.2
    # Arrivals are not scaled: about the same number of events for the same period.
    assert 0.8 < len(quick) / len(normal) < 1.25
    with pytest.raises(ValueError, match="time_scale"):
        next(generate(random.Random(5), START, 20.0, 10.0, time_scale=0))
