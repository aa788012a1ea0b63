"""bench/processor.py: its input is in Kafka order, and --discard-rows really drops the rows."""

from __future__ import annotations

import asyncio

import orjson

from bench.processor import DiscardingSink, messages


def test_messages_are_numbered_per_partition_in_order() -> None:
    out = messages(2_000, partitions=4, envelope=100, seed=1)
    by_partition: dict[int, list[int]] = {}
    for m in out:
        by_partition.setdefault(m.partition, []).append(m.offset)
    assert all(offsets == list(range(len(offsets))) for offsets in by_partition.values())
    events = sum(len(orjson.loads(m.value)["events"]) for m in out)
    assert events == 2_000


def test_the_discarding_sink_encodes_and_empties_its_buffers_without_chdb() -> None:
    sink = DiscardingSink("chdb:///nowhere-that-is-opened")
    sink.add_rows({"events": [["e-1", 1.0]], "transitions": [["j", "c"]]})

    async def run() -> None:
        await sink.flush()
        await sink.close()

    asyncio.run(run())
    assert sink.events == [] and sink.transitions == []
    assert sink._client is None  # never connected
