"""The producers against a real broker: every record once, each key on its partition, in order."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.embedded import Service, create_topics
from pipeline.envelope import partition_for, unpack
from pipeline.producer import BatchPublisher, bootstrap_servers, produce_batches, start_producer

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

PARTITIONS = 4


async def _read(url: str, topic: str, until: int, timeout: float = 60) -> list[tuple[int, bytes]]:
    """(partition, event) for every event of the topic, envelopes opened, in partition order."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers(url),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < until and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for r in records:
                    assert r.value is not None
                    events = unpack(r.value)
                    out.extend((tp.partition, e) for e in (events or [r.value]))
    finally:
        await consumer.stop()
    return out


def _records(n: int) -> list[tuple[bytes | None, bytes]]:
    rng = random.Random(3)
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(n):
        customer = f"c{rng.randrange(60)}"
        doc = {"event_id": f"p-{i}", "customer_id": customer, "seq": i}
        if i % 17 == 0:  # indented: not compact, so it goes alone, in its place
            out.append((customer.encode(), orjson.dumps(doc, option=orjson.OPT_INDENT_2)))
        elif i % 29 == 0:  # no key: nobody's order to keep
            out.append((None, b"not json %d" % i))
        else:
            out.append((customer.encode(), orjson.dumps(doc)))
    return out


def test_envelopes_carry_every_record_once_in_each_customers_order(
    kafka_service: Service,
) -> None:
    topic = "producer-envelopes"
    create_topics(kafka_service.url, {topic: PARTITIONS})
    records = _records(3000)
    sent = asyncio.run(produce_batches(kafka_service.url, topic, records, envelope=50))
    assert sent == len(records)
    got = asyncio.run(_read(kafka_service.url, topic, len(records)))
    assert len(got) == len(records)
    by_customer: dict[str, list[int]] = defaultdict(list)
    for partition, value in got:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        assert partition == partition_for(doc["customer_id"].encode(), PARTITIONS)
        by_customer[doc["customer_id"]].append(doc["seq"])
    expected: dict[str, list[int]] = defaultdict(list)
    for key, value in records:
        if key is not None:
            expected[key.decode()].append(orjson.loads(value)["seq"])
    assert by_customer == expected
    unkeyed = sorted(v for _, v in got if v.startswith(b"not json"))
    assert unkeyed == sorted(v for k, v in records if k is None)


def test_a_quiet_source_does_not_hold_its_envelope_back(kafka_service: Service) -> None:
    """Events wait at most the linger, even while the source sends nothing more."""
    topic = "producer-linger"
    create_topics(kafka_service.url, {topic: 1})

    async def run() -> None:
        seen = asyncio.Event()

        async def source() -> AsyncIterator[tuple[bytes | None, bytes]]:
            for i in range(3):
                yield b"c1", orjson.dumps({"event_id": f"q-{i}", "customer_id": "c1"})
            # Quiet until a reader has all three: only the linger can send them.
            await asyncio.wait_for(seen.wait(), timeout=30)

        async def reader() -> None:
            assert len(await _read(kafka_service.url, topic, 3, timeout=25)) == 3
            seen.set()

        sending = asyncio.create_task(
            produce_batches(kafka_service.url, topic, source(), linger_ms=50, envelope=100)
        )
        await reader()
        assert await sending == 3

    asyncio.run(run())


def test_batch_publisher_puts_each_key_on_its_partition_in_order(kafka_service: Service) -> None:
    """Record batches split when full (small max_batch_size), keys hashed as the producer does."""
    topics = {"publisher-a": PARTITIONS, "publisher-b": 2}
    create_topics(kafka_service.url, topics)
    messages = [
        (topic, None if key is None else key, value)
        for i, (key, value) in enumerate(_records(2000))
        for topic in ["publisher-a" if i % 3 else "publisher-b"]
    ]

    async def publish() -> None:
        producer = await start_producer(kafka_service.url, 0, max_batch_size=4096)
        try:
            await BatchPublisher(producer)(messages)
        finally:
            await producer.stop()

    asyncio.run(publish())
    for topic, partitions in topics.items():
        sent = [(k, v) for t, k, v in messages if t == topic]
        got = asyncio.run(_read(kafka_service.url, topic, len(sent)))
        assert sorted(v for _, v in got) == sorted(v for _, v in sent)
        keyed = [(k, v) for k, v in sent if k is not None]
        partition_of = {v: p for p, v in got}
        for key, value in keyed:
            assert partition_of[value] == partition_for(key, partitions)
        # Per partition, in the order given.
        order = {v: i for i, (p, v) in enumerate(got)}
        for key in {k for k, _ in keyed}:
            mine = [order[v] for k, v in keyed if k == key]
            assert mine == sorted(mine)
