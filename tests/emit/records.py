"""Read back what reached a Kafka topic, keys included, for the emitter's service tests."""

from __future__ import annotations

import time
from collections import Counter

import orjson
from aiokafka import AIOKafkaConsumer

from pipeline.envelope import partition_for, unpack
from pipeline.events import Event, Validator
from pipeline.identity import routing_key
from pipeline.producer import bootstrap_servers

Record = tuple[bytes | None, bytes]


async def read_all(url: str, topic: str, expected: int, timeout: float = 90) -> list[Record]:
    """(key, value) of every event, reading on for a moment past ``expected`` to catch extras.

    Envelopes are opened. An event in one has no Kafka key of its own: it is
    reported under its routing key only if it sits in the partition that key
    picks (what ordering needs), else under None, which no test expects.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers(url),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    settle: float | None = None
    try:
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            batches = await consumer.getmany(timeout_ms=500)
            for tp, batch in batches.items():
                partitions = len(consumer.partitions_for_topic(tp.topic) or ())
                for r in batch:
                    if r.value is not None:
                        records.extend(_opened(r.key, r.value, tp.partition, partitions))
            if settle is None and len(records) >= expected:
                settle = time.monotonic() + 2.0
    finally:
        await consumer.stop()
    return records


def _opened(key: bytes | None, value: bytes, partition: int, partitions: int) -> list[Record]:
    events = unpack(value)
    if events is None:
        return [(key, value)]
    out: list[Record] = []
    for raw in events:
        event = orjson.loads(raw)
        routing = (routing_key(event.get("customer_id"), event.get("anonymous_id")) or "").encode()
        placed = bool(routing) and partition_for(routing, partitions) == partition
        out.append((routing if placed else None, raw))
    return out


def valid_events(records: list[Record]) -> list[tuple[bytes | None, Event]]:
    """The records the worker would accept, with their Kafka keys."""
    validator = Validator()
    out: list[tuple[bytes | None, Event]] = []
    for key, value in records:
        event = validator.decode(value)
        if isinstance(event, Event):
            out.append((key, event))
    return out


def assert_once_with_keys(
    events: list[tuple[bytes | None, Event]], expected: dict[str, bytes]
) -> None:
    """Each expected event exactly once, under the worker's key; nothing else."""
    seen: Counter[str] = Counter()
    for key, event in events:
        assert event.event_id in expected, event
        assert key == event.key.encode() == expected[event.event_id]
        seen[event.event_id] += 1
    assert set(seen) == set(expected)
    assert set(seen.values()) == {1}
