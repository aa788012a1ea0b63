"""The write-out's timing, ordering, back-pressure and failure handling.

Its sink here is an in-memory recorder: what is under test is when rows go and
in what order. tests/test_processor.py drives it against chDB and redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from pipeline.writeout import OutMessage, Owed, WriteOut


class Recorder:
    """Keeps each flush's rows; a flush waits for ``gate`` and may be told to fail."""

    def __init__(self) -> None:
        self.buffered: list[list[Any]] = []
        self.flushes: list[list[list[Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    def add_rows(self, rows: Mapping[str, Sequence[list[Any]]]) -> None:
        for table_rows in rows.values():
            self.buffered.extend(table_rows)

    async def flush(self) -> None:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.flushes.append(self.buffered)
        self.buffered = []


def owed(n: int, first: int = 0, token: str | None = None) -> Owed:
    rows = [[i] for i in range(first, first + n)]
    messages: list[OutMessage] = [("t", None, str(i).encode()) for i in range(first, first + n)]
    return Owed({"events": rows}, messages, None if token is None else (0, token))


def writeout(
    sink: Recorder, max_rows: int = 100, max_seconds: float = 0.2
) -> tuple[WriteOut, list[OutMessage], list[tuple[int, str]]]:
    published: list[OutMessage] = []
    forgotten: list[tuple[int, str]] = []

    async def publish(messages: Sequence[OutMessage]) -> None:
        published.extend(messages)

    async def forget(tokens: list[tuple[int, str]]) -> None:
        forgotten.extend(tokens)

    return WriteOut(sink, publish, forget, max_rows, max_seconds), published, forgotten


async def test_rows_wait_for_the_oldest_to_be_due_then_go_in_one_flush() -> None:
    sink = Recorder()
    out, published, forgotten = writeout(sink, max_seconds=0.3)
    await out.add(owed(3, 0, "a"))
    await asyncio.sleep(0.1)
    await out.add(owed(2, 3, "b"))
    assert sink.flushes == [] and out.owed_rows == 5
    await asyncio.sleep(0.4)  # past the first chunk's 0.3 s: both go together
    assert sink.flushes == [[[0], [1], [2], [3], [4]]]
    assert [m[2] for m in published] == [b"0", b"1", b"2", b"3", b"4"]
    assert forgotten == [(0, "a"), (0, "b")]
    assert out.owed_rows == 0
    await out.close()


async def test_enough_rows_go_at_once_without_waiting_for_the_timer() -> None:
    sink = Recorder()
    out, _, _ = writeout(sink, max_rows=10, max_seconds=60)
    await out.add(owed(10))
    await asyncio.sleep(0.01)
    assert len(sink.flushes) == 1 and len(sink.flushes[0]) == 10
    await out.close()


async def test_chunks_added_during_a_write_go_in_the_next_in_order() -> None:
    sink = Recorder()
    out, published, _ = writeout(sink, max_rows=5, max_seconds=60)
    sink.gate.clear()
    await out.add(owed(5, 0))  # starts a write, held at the gate
    await out.add(owed(2, 5))
    await out.add(owed(2, 7))
    sink.gate.set()
    await out.drain()
    assert [len(f) for f in sink.flushes] == [5, 4]
    assert [int(m[2]) for m in published] == list(range(9))


async def test_add_waits_once_twice_max_rows_are_owed() -> None:
    sink = Recorder()
    out, _, _ = writeout(sink, max_rows=10, max_seconds=60)
    sink.gate.clear()
    await out.add(owed(10))  # being written, held
    await asyncio.wait_for(out.add(owed(19)), 1)  # owed 19 < 20: returns
    blocked = asyncio.create_task(out.add(owed(1)))  # owed 20: waits for the write
    await asyncio.sleep(0.05)
    assert not blocked.done()
    sink.gate.set()
    await asyncio.wait_for(blocked, 1)
    await out.drain()
    assert sum(len(f) for f in sink.flushes) == 30


async def test_a_failed_write_is_raised_by_the_next_add_and_keeps_its_entries() -> None:
    sink = Recorder()
    out, published, forgotten = writeout(sink, max_rows=1, max_seconds=60)
    sink.fail = ValueError("a bug in a row")
    await out.add(owed(1, 0, "a"))
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="writing committed rows out failed") as raised:
        await out.add(owed(1, 1, "b"))
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(RuntimeError):
        await out.drain()
    # Nothing published or forgotten: the outbox entry stays for recovery.
    assert published == [] and forgotten == []


async def test_drain_writes_what_waits_at_once() -> None:
    sink = Recorder()
    out, _, forgotten = writeout(sink, max_rows=1000, max_seconds=60)
    await out.add(owed(2, 0, "a"))
    await asyncio.wait_for(out.drain(), 1)
    assert sink.flushes == [[[0], [1]]] and forgotten == [(0, "a")]
    await out.drain()  # nothing owed: returns
    assert len(sink.flushes) == 1
