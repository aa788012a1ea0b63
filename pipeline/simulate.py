"""Synthetic omnichannel traffic for the default retail journey (`journey simulate`).

The generator is pure (no clock, no I/O; time and randomness are passed in) so
that the same seed gives the same events, which tests and demos rely on. It
aims at traffic that exercises every path of the worker: cross-channel
customers, skipped stages, browsing back, identity stitching, duplicates,
unmapped event types and advocacy scores on both sides of the thresholds.
Incidents make one channel fail one stage, which the consistency index should
then reveal.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline.producer import produce_batches
from pipeline.settings import KafkaAuth

CHANNEL_MIX: dict[str, float] = {
    "web": 0.40,
    "app": 0.30,
    "store": 0.15,
    "email": 0.07,
    "social": 0.05,
    "call_center": 0.03,
}
CHANNELS: tuple[str, ...] = tuple(CHANNEL_MIX)
STAGES: tuple[str, ...] = ("awareness", "consideration", "purchase", "retention", "advocacy")
# Probability of moving on from each stage to the next one.
CONVERSION: dict[str, float] = {
    "awareness": 0.60,
    "consideration": 0.30,
    "purchase": 0.50,
    "retention": 0.30,
}

P_SWITCH_CHANNEL = 0.3  # chance a stage is done on a freshly drawn channel (~20% really change)
P_WALK_IN = 0.30  # store visitors who buy right away, skipping consideration
P_BROWSE_BACK = 0.15  # customers past purchase who browse again (an earlier-stage event)
P_UNMAPPED = 0.031  # ~3% of all events are types no stage lists
P_DUPLICATE = 0.0101  # ~1% of events are resent with the same event_id
P_ANONYMOUS_ONLY = 0.07  # visitors who never identify themselves
P_LOGS_IN = 0.23  # visitors who start anonymous and later log in (stitching)
P_BOTH_IDS_AFTER_LOGIN = 0.3  # later events that still carry both ids
P_LOW_NPS_SURVEY = 0.25  # retained customers who answer a survey without becoming advocates

# Event-time spacing (seconds): compressed so that a few minutes of live traffic
# show customers moving through the whole funnel.
GAP_IN_STAGE = (2.0, 10.0)  # minimum, plus an exponential with this mean
GAP_BETWEEN_STAGES = (5.0, 30.0)

# Measured mean events per customer with the settings above; turns an event
# rate into a customer arrival rate.
MEAN_EVENTS_PER_CUSTOMER = 3.6

EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# (event_type, touchpoint) a customer may produce for a stage on a channel.
_Choice = tuple[str, str]
STAGE_EVENTS: dict[str, dict[str, list[_Choice]]] = {
    "awareness": {
        "web": [("page_view", "home_page"), ("ad_click", "search_ad")],
        "app": [("app_install", "app_store"), ("page_view", "app_home")],
        "store": [("store_visit", "entrance")],
        "email": [("newsletter_signup", "signup_form")],
        "social": [("social_engagement", "social_post"), ("ad_click", "social_ad")],
        "call_center": [("newsletter_signup", "support_call")],
    },
    "consideration": {
        "web": [
            ("product_view", "product_page"),
            ("search", "search_bar"),
            ("add_to_cart", "cart"),
            ("wishlist_add", "product_page"),
        ],
        "app": [
            ("product_view", "product_page"),
            ("search", "search_bar"),
            ("add_to_cart", "cart"),
            ("wishlist_add", "product_page"),
        ],
        "store": [("store_consultation", "sales_floor"), ("product_view", "shelf")],
        "email": [("product_view", "email_link")],
        "social": [("product_view", "social_shop")],
        "call_center": [("demo_request", "sales_call")],
    },
    "purchase": {
        "web": [("order_completed", "checkout")],
        "app": [("order_completed", "checkout")],
        "store": [("order_completed", "pos")],
        "email": [("order_completed", "email_offer")],
        "social": [("order_completed", "social_shop")],
        "call_center": [("order_completed", "phone_order")],
    },
    "retention": {
        "web": [("repeat_purchase", "checkout"), ("subscription_renewed", "account")],
        "app": [
            ("repeat_purchase", "checkout"),
            ("loyalty_redeemed", "loyalty"),
            ("support_resolved", "in_app_chat"),
        ],
        "store": [("repeat_purchase", "pos"), ("loyalty_redeemed", "pos")],
        "email": [("subscription_renewed", "renewal_email")],
        "social": [("support_resolved", "social_dm")],
        "call_center": [("support_resolved", "support_call"), ("repeat_purchase", "phone_order")],
    },
    "advocacy": {
        "web": [("review_submitted", "product_page"), ("referral_sent", "account")],
        "app": [
            ("review_submitted", "app_review"),
            ("nps_response", "in_app_survey"),
            ("referral_sent", "share_sheet"),
        ],
        "store": [("review_submitted", "receipt_qr")],
        "email": [("nps_response", "survey_email"), ("referral_sent", "referral_email")],
        "social": [("referral_sent", "social_post")],
        "call_center": [("nps_response", "post_call_survey")],
    },
}

# Event types that no stage lists: stored and counted, but they move nobody.
UNMAPPED_EVENTS: dict[str, list[_Choice]] = {
    "web": [("session_start", "home_page"), ("cart_viewed", "cart")],
    "app": [("app_open", "app_home"), ("push_opened", "notification")],
    "store": [("store_wifi_login", "wifi")],
    "email": [("email_open", "inbox"), ("email_click", "inbox")],
    "social": [("social_impression", "feed")],
    "call_center": [("call_started", "ivr"), ("hold_abandoned", "ivr")],
}

# What a customer hits when an incident makes a stage fail on a channel.
FAILURE_EVENTS: dict[str, str] = {
    "awareness": "page_load_failed",
    "consideration": "page_load_failed",
    "purchase": "checkout_failed",
    "retention": "service_failed",
    "advocacy": "form_failed",
}

CAMPAIGNS = ("spring_sale", "new_arrivals", "loyalty_boost", "brand_awareness", "back_in_stock")
CURRENCIES: dict[str, float] = {"EUR": 0.5, "USD": 0.3, "GBP": 0.2}
_CURRENCY_CODES = list(CURRENCIES)
_CURRENCY_WEIGHTS = list(CURRENCIES.values())
_CAMPAIGN_TYPES = frozenset({"ad_click", "social_engagement", "newsletter_signup"})
_ORDER_TYPES = frozenset({"order_completed", "repeat_purchase"})


@dataclass(frozen=True)
class Incident:
    """From `start_after` s on, `failure_rate` of customers entering `stage` on `channel` fail.

    Those customers see an error event instead; most give up, some retry on
    another channel (so the failing channel, not the business, loses them).
    """

    stage: str
    channel: str
    failure_rate: float
    start_after: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        if self.channel not in CHANNELS:
            raise ValueError(
                f"unknown channel {self.channel!r}; expected one of {', '.join(CHANNELS)}"
            )
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure rate must be between 0 and 1, got {self.failure_rate}")
        if self.start_after < 0:
            raise ValueError(f"incident start must not be negative, got {self.start_after}")


_INCIDENT_RE = re.compile(
    r"^\s*(?P<a>[a-z_]+)\s*:\s*(?P<b>[a-z_]+)\s*:\s*(?P<rate>[0-9]*\.?[0-9]+)(?P<pct>%)?"
    r"\s*(?:@\s*(?P<start>[0-9]*\.?[0-9]+)\s*(?P<unit>ms|s|m|h)?)?\s*$"
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_incident(text: str) -> Incident:
    """Parse `CHANNEL:STAGE:RATE[@START]`, e.g. `app:purchase:0.9@60s`, `web:consideration:50%@2m`.

    RATE is a fraction (0.9) or a percentage (90%); START is seconds after the
    simulation starts (units ms, s, m, h; default s, default 0). STAGE:CHANNEL
    order is accepted too. Raises ValueError with a readable reason.
    """
    m = _INCIDENT_RE.match(text.lower())
    if m is None:
        raise ValueError(
            f"cannot parse incident {text!r}: expected CHANNEL:STAGE:RATE[@START], "
            "e.g. app:purchase:0.9@60s"
        )
    channel, stage = m["a"], m["b"]
    if channel in STAGES and stage in CHANNELS:
        channel, stage = stage, channel
    rate = float(m["rate"]) / (100.0 if m["pct"] else 1.0)
    start_after = float(m["start"]) * _UNITS[m["unit"] or "s"] if m["start"] else 0.0
    try:
        return Incident(stage=stage, channel=channel, failure_rate=rate, start_after=start_after)
    except ValueError as exc:
        raise ValueError(f"invalid incident {text!r}: {exc}") from None


def key_of(event: dict[str, Any]) -> str:
    """The partition key: the customer when known, else the anonymous visitor."""
    key = event.get("customer_id") or event.get("anonymous_id")
    if not isinstance(key, str):
        raise ValueError("event has neither customer_id nor anonymous_id")
    return key


def format_time(t: float) -> str:
    """RFC 3339 UTC with millisecond precision and a 'Z' suffix."""
    return (
        datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _weighted(rng: random.Random, mix: dict[str, float]) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def _other_channel(rng: random.Random, channel: str) -> str:
    mix = {c: w for c, w in CHANNEL_MIX.items() if c != channel}
    return _weighted(rng, mix)


def _gap(rng: random.Random, spec: tuple[float, float], scale: float = 1.0) -> float:
    return (spec[0] + rng.expovariate(1.0 / spec[1])) * scale


class _Customer:
    """Builds one customer's events; the identity rules live here."""

    def __init__(
        self,
        rng: random.Random,
        t: float,
        incidents: Sequence[Incident],
        start: float,
        time_scale: float = 1.0,
    ):
        self.rng = rng
        self.time_scale = time_scale
        self.t = t
        self.incidents = incidents
        self.start = start
        self.events: list[tuple[float, dict[str, Any]]] = []
        r = rng.random()
        self.customer_id = f"cust-{rng.getrandbits(40):010x}"
        self.anonymous_id = f"anon-{rng.getrandbits(48):012x}"
        # identity: "anonymous" forever, "login" (anonymous, then stitched), or "known"
        if r < P_ANONYMOUS_ONLY:
            self.identity = "anonymous"
        elif r < P_ANONYMOUS_ONLY + P_LOGS_IN:
            self.identity = "login"
        else:
            self.identity = "known"
        self.logged_in = False
        self.primary = _weighted(rng, CHANNEL_MIX)
        self.currency = rng.choices(_CURRENCY_CODES, weights=_CURRENCY_WEIGHTS)[0]

    # -- identity -------------------------------------------------------------------------
    def _ids(self, stage: str | None) -> dict[str, str]:
        if self.identity == "anonymous":
            return {"anonymous_id": self.anonymous_id}
        if self.identity == "known":
            return {"customer_id": self.customer_id}
        if not self.logged_in:
            # Log in at checkout at the latest; sometimes earlier while browsing.
            wants = stage in ("purchase", "retention", "advocacy") or (
                stage == "consideration" and self.rng.random() < 0.3
            )
            if not wants:
                return {"anonymous_id": self.anonymous_id}
            self.logged_in = True
            return {"customer_id": self.customer_id, "anonymous_id": self.anonymous_id}
        if self.rng.random() < P_BOTH_IDS_AFTER_LOGIN:
            return {"customer_id": self.customer_id, "anonymous_id": self.anonymous_id}
        return {"customer_id": self.customer_id}

    # -- events ---------------------------------------------------------------------------
    def _properties(self, event_type: str, channel: str) -> dict[str, Any]:
        rng = self.rng
        props: dict[str, Any] = {}
        if event_type in _ORDER_TYPES:
            props["order_value"] = round(rng.lognormvariate(4.0, 0.6), 2)
            props["currency"] = self.currency
            props["items"] = 1 + int(rng.expovariate(0.7))
        elif event_type in ("product_view", "add_to_cart", "wishlist_add"):
            props["sku"] = f"SKU-{rng.randrange(1, 5000):05d}"
        elif event_type == "search":
            props["query_length"] = rng.randint(1, 6)
        elif event_type == "support_resolved":
            props["csat"] = rng.choices([1, 2, 3, 4, 5], weights=[5, 8, 17, 35, 35])[0]
        elif event_type == "review_submitted":
            # Mostly happy reviewers; ~15% below the advocacy threshold (rating >= 4).
            props["rating"] = rng.choices([1, 2, 3, 4, 5], weights=[3, 4, 8, 30, 55])[0]
        elif event_type == "nps_response":
            # ~15% below the advocacy threshold (nps >= 9).
            props["nps"] = rng.randint(9, 10) if rng.random() < 0.85 else rng.randint(5, 8)
        if event_type in _CAMPAIGN_TYPES or (channel == "email" and rng.random() < 0.8):
            props["campaign"] = rng.choice(CAMPAIGNS)
        return props

    def emit(
        self,
        event_type: str,
        touchpoint: str,
        channel: str,
        stage: str | None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        rng = self.rng
        event: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "occurred_at": format_time(self.t),
        }
        event.update(self._ids(stage))
        event["channel"] = channel
        event["event_type"] = event_type
        event["touchpoint"] = touchpoint
        props = self._properties(event_type, channel) if properties is None else properties
        if props:
            event["properties"] = props
        event["schema_version"] = 1
        self._push(event)
        if rng.random() < P_UNMAPPED:
            self.t += rng.uniform(0.2, 3.0) * self.time_scale
            noise_type, noise_tp = rng.choice(UNMAPPED_EVENTS[channel])
            self.emit(noise_type, noise_tp, channel, None, properties={})

    def _push(self, event: dict[str, Any]) -> None:
        self.events.append((self.t, event))
        if self.rng.random() < P_DUPLICATE:
            # A client retry: the very same event (same id and time) arrives again.
            self.events.append((self.t, dict(event)))

    def _failed(self, stage: str, channel: str) -> bool:
        """True when an active incident makes this stage attempt fail on this channel."""
        for inc in self.incidents:
            if (
                inc.stage == stage
                and inc.channel == channel
                and self.t >= self.start + inc.start_after
                and self.rng.random() < inc.failure_rate
            ):
                return True
        return False

    def run_stage(self, stage: str, channel: str, count: int) -> bool:
        """Emit `count` events of a stage; False when an incident stopped the customer."""
        rng = self.rng
        while self._failed(stage, channel):
            for _ in range(rng.randint(1, 2)):  # the customer tries again, then...
                self.emit(FAILURE_EVENTS[stage], "error_page", channel, stage, properties={})
                self.t += _gap(rng, GAP_IN_STAGE, self.time_scale)
            if rng.random() >= 0.3:
                return False  # ...gives up
            channel = _other_channel(rng, channel)  # ...or retries elsewhere
        for i in range(count):
            if i:
                self.t += _gap(rng, GAP_IN_STAGE, self.time_scale)
            event_type, touchpoint = rng.choice(STAGE_EVENTS[stage][channel])
            self.emit(event_type, touchpoint, channel, stage)
        return True

    def journey(self) -> list[tuple[float, dict[str, Any]]]:
        rng = self.rng
        stage_i = 0
        while True:
            stage = STAGES[stage_i]
            channel = self.primary
            if rng.random() < P_SWITCH_CHANNEL:
                # Drawn from the whole mix (it may land on the same channel), so the
                # channel mix of events stays the configured one.
                channel = _weighted(rng, CHANNEL_MIX)
                if channel != self.primary and rng.random() < 0.5:
                    self.primary = channel  # the customer moves to the new channel for good
            count = {
                "awareness": rng.randint(1, 2),
                "consideration": rng.randint(1, 4),
                "purchase": 1,
                "retention": rng.randint(1, 3),
                "advocacy": 1,
            }[stage]
            if not self.run_stage(stage, channel, count):
                break
            if stage in ("purchase", "retention") and rng.random() < P_BROWSE_BACK:
                # A loyal customer browsing: an earlier-stage event (a regression).
                self.t += _gap(rng, GAP_IN_STAGE, self.time_scale)
                back = rng.choice(["awareness", "consideration"])
                event_type, touchpoint = rng.choice(STAGE_EVENTS[back][channel])
                self.emit(event_type, touchpoint, channel, back)
            if stage == "advocacy":
                break
            if stage == "retention" and rng.random() < P_LOW_NPS_SURVEY:
                self.t += _gap(rng, GAP_IN_STAGE, self.time_scale)
                # A lukewarm survey answer: below the advocacy threshold, moves nobody.
                self.emit(
                    "nps_response",
                    "survey_email",
                    "email",
                    "retention",
                    properties={"nps": rng.randint(0, 8)},
                )
            if stage == "awareness" and channel == "store" and rng.random() < P_WALK_IN:
                stage_i = STAGES.index("purchase")  # walk-in purchase skips consideration
            elif rng.random() < CONVERSION[stage]:
                stage_i += 1
            else:
                break
            self.t += _gap(rng, GAP_BETWEEN_STAGES, self.time_scale)
        return self.events


def _generate_timed(
    rng: random.Random,
    start: float,
    rate: float,
    duration: float | None,
    incidents: Iterable[Incident] = (),
    customers_per_second: float | None = None,
    time_scale: float = 1.0,
) -> Iterator[tuple[float, dict[str, Any]]]:
    """Yield (event time, event) in event-time order; see `generate`."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    if rate <= 0 and customers_per_second is None:
        raise ValueError(f"rate must be positive, got {rate}")
    cps = rate / MEAN_EVENTS_PER_CUSTOMER
    if customers_per_second is not None:
        cps = customers_per_second
    if cps <= 0:
        raise ValueError(f"customers_per_second must be positive, got {cps}")
    incs = tuple(incidents)
    end = None if duration is None else start + duration
    heap: list[tuple[float, int, dict[str, Any]]] = []
    seq = 0
    next_arrival = start + rng.expovariate(cps)
    while True:
        arrivals_open = end is None or next_arrival <= end
        if heap and (not arrivals_open or heap[0][0] <= next_arrival):
            t, _, event = heapq.heappop(heap)
            if end is not None and t > end:
                return  # everything left is later still
            yield t, event
        elif arrivals_open:
            # Each customer draws from its own stream, so an incident changes only the
            # customers it hits, not everyone who arrives after (comparable runs).
            customer_rng = random.Random(rng.getrandbits(64))
            customer = _Customer(customer_rng, next_arrival, incs, start, time_scale)
            for t, event in customer.journey():
                heapq.heappush(heap, (t, seq, event))
                seq += 1
            next_arrival += rng.expovariate(cps)
        else:
            return


def generate(
    rng: random.Random,
    start: float,
    rate: float,
    duration: float | None,
    incidents: Iterable[Incident] = (),
    customers_per_second: float | None = None,
    time_scale: float = 1.0,
) -> Iterator[dict[str, Any]]:
    """Yield schema-v1 event dicts in event-time order, from epoch `start` for `duration` s.

    About `rate` events per second on average (customers arrive as a Poisson
    process at `customers_per_second`, by default derived from `rate`).
    `duration=None` runs forever. Everything random comes from `rng`.
    `time_scale` multiplies the gaps between one customer's events: 0.2 makes
    customers five times quicker, to rehearse with dwell times of seconds.
    """
    for _, event in _generate_timed(
        rng, start, rate, duration, incidents, customers_per_second, time_scale
    ):
        yield event


async def run_simulation(
    kafka_url: str,
    topic: str,
    rate: float,
    duration: float | None,
    incidents: Iterable[Incident],
    seed: int | None,
    realtime: bool = True,
    on_sent: Callable[[int], None] | None = None,
    time_scale: float = 1.0,
    auth: KafkaAuth | None = None,
    envelope: int = 1,
) -> int:
    """Produce simulated events to Kafka, keyed by customer; return how many were sent.

    With `realtime`, event time starts now and each event is sent when the
    wall clock reaches its event time (live traffic). Otherwise events go as
    fast as the broker takes them and event time covers the `duration` that
    ends now, so a fast run is history, never events from the future (which
    the validator rejects). ``envelope``: events per message, at most
    (:func:`pipeline.producer.produce_batches`).
    """
    if not realtime and duration is None:
        raise ValueError("a run that is not paced to the clock needs a duration")
    rng = random.Random(seed)
    start = time.time() - (0.0 if realtime or duration is None else duration)
    incs = tuple(incidents)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def records() -> AsyncIterator[tuple[bytes | None, bytes]]:
        for t, event in _generate_timed(rng, start, rate, duration, incs, None, time_scale):
            if realtime:
                delay = (t - start) - (loop.time() - t0)
                if delay > 0.002:
                    await asyncio.sleep(delay)
            yield key_of(event).encode(), orjson.dumps(event)

    return await produce_batches(
        kafka_url, topic, records(), on_sent=on_sent, auth=auth, envelope=envelope
    )
