"""Envelopes: what producers pack, and that the worker judges a packed event as a lone one."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.envelope import Outgoing, Packer, encode, packable, partition_for, unpack
from pipeline.events import (
    ENVELOPE_RESOURCE,
    MAX_ENVELOPE_BYTES,
    MAX_ENVELOPE_EVENTS,
    MAX_EVENT_BYTES,
    Event,
    Rejection,
    Validator,
    load_schema,
)
from tests.test_hostile_input import CASES, NOW, base

VALIDATOR = Validator()


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 64))
def test_partition_for_is_kafkas_default_partitioner(key: bytes, partitions: int) -> None:
    every = list(range(partitions))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, every, every)


def test_only_compact_keyed_objects_are_packed() -> None:
    doc = base(NOW, "p-1")
    compact = orjson.dumps(doc)
    assert packable(b"k", compact)
    assert not packable(None, compact)  # nobody's order: sent alone, as it came
    assert not packable(b"k", orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    assert not packable(b"k", b"not json")
    assert not packable(b"k", b"[1, 2]")
    assert not packable(b"k", encode([compact]))  # an envelope travels as it is
    padded = {**doc, "touchpoint": "t" * MAX_EVENT_BYTES}
    assert not packable(b"k", orjson.dumps(padded))


records = st.lists(
    st.tuples(
        st.sampled_from([None, b"alice", b"bob", b"carol", b"dave", b"erin"]),
        st.integers(0, 10_000),
        st.booleans(),  # compact (packable) or indented (alone)
    ),
    max_size=120,
)


def _value(serial: int, key: bytes | None, compact: bool) -> bytes:
    doc = {"n": serial, "customer_id": (key or b"").decode()}
    return orjson.dumps(doc) if compact else orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _unpack(out: Outgoing) -> list[bytes]:
    doc = orjson.loads(out.value)
    if isinstance(doc, dict) and "envelope" in doc:
        return [orjson.dumps(e) for e in doc["events"]]
    return [out.value]


@settings(max_examples=300)
@given(records, st.integers(1, 8), st.integers(1, 5))
def test_packing_keeps_every_event_once_and_each_partition_in_order(
    recs: list[tuple[bytes | None, int, bool]], partitions: int, max_events: int
) -> None:
    packer = Packer(partitions, max_events)
    sent: list[Outgoing] = []
    want: dict[int | None, list[bytes]] = defaultdict(list)
    for serial, (key, _, compact) in enumerate(recs):
        value = _value(serial, key, compact)
        want[None if key is None else partition_for(key, partitions)].append(value)
        sent.extend(packer.add(key, value))
        if serial % 7 == 6:
            sent.extend(packer.due(now=1.0, linger=0.5))
    sent.extend(packer.flush())
    assert packer.waiting == 0
    got: dict[int | None, list[bytes]] = defaultdict(list)
    for out in sent:
        events = _unpack(out)
        assert len(events) == out.events <= max_events
        got[out.partition].extend(
            orjson.dumps(orjson.loads(e)) if out.events > 1 else e for e in events
        )
    normal = {p: [orjson.dumps(orjson.loads(v)) for v in vs] for p, vs in want.items()}
    assert {p: [orjson.dumps(orjson.loads(v)) for v in vs] for p, vs in got.items()} == normal


def test_an_envelope_stays_under_the_message_limit() -> None:
    big = orjson.dumps({**base(NOW, "big"), "touchpoint": "t" * 60_000})
    packer = Packer(1, MAX_ENVELOPE_EVENTS)
    out = [o for _ in range(40) for o in packer.add(b"k", big)] + packer.flush()
    assert sum(o.events for o in out) == 40
    assert all(len(o.value) <= MAX_ENVELOPE_BYTES for o in out)
    assert len(out) == 3  # 16 + 16 + 8 events of ~60 KB


def test_a_buffer_goes_out_after_its_linger() -> None:
    packer = Packer(1, 100)
    assert packer.add(b"k", orjson.dumps(base(NOW, "a")), now=10.0) == []
    assert packer.due(now=10.01, linger=0.02) == []
    [plain] = packer.due(now=10.03, linger=0.02)
    assert (plain.events, plain.key, plain.partition) == (1, b"k", 0)  # one event: plain


# The catalogue, packed: every item that is compact JSON is judged as it was alone.
PACKABLE = [c for c in CASES if packable(b"k", c.raw)]


def _same(a: Event | Rejection, b: Event | Rejection) -> bool:
    if isinstance(a, Event) or isinstance(b, Event):
        return a == b
    return (a.code, a.reason, a.raw) == (b.code, b.reason, b.raw)


def test_the_catalogue_packs_into_one_envelope_with_the_same_verdicts() -> None:
    assert len(PACKABLE) > 100
    decoded = VALIDATOR.decode_message(encode([c.raw for c in PACKABLE]), now=NOW)
    assert [i for i, _ in decoded] == list(range(len(PACKABLE)))
    for case, (_, verdict) in zip(PACKABLE, decoded, strict=True):
        alone = VALIDATOR.decode(case.raw, now=NOW)
        assert _same(verdict, alone), case.name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PACKABLE), min_size=1, max_size=30))
def test_any_envelope_of_catalogue_events_is_judged_item_by_item(picked: list[Any]) -> None:
    decoded = VALIDATOR.decode_message(encode([c.raw for c in picked]), now=NOW)
    assert len(decoded) == len(picked)
    for case, (_, verdict) in zip(picked, decoded, strict=True):
        assert _same(verdict, VALIDATOR.decode(case.raw, now=NOW)), case.name


envelopeish = st.dictionaries(
    st.sampled_from(["envelope", "events", "extra"]),
    st.one_of(
        st.integers(-1, 3),
        st.text(max_size=3),
        st.none(),
        st.lists(st.just({}), max_size=3),
        st.dictionaries(st.text(max_size=2), st.integers(-9, 9), max_size=2),
    ),
)


@settings(max_examples=400)
@given(envelopeish)
def test_the_envelope_check_agrees_with_its_schema(doc: dict[str, Any]) -> None:
    if "envelope" not in doc:
        doc["envelope"] = 1
    schema_says = Draft202012Validator(load_schema(ENVELOPE_RESOURCE)).is_valid(doc)
    [*results] = VALIDATOR.decode_message(orjson.dumps(doc), now=NOW)
    refused_whole = len(results) == 1 and results[0][0] is None
    if schema_says:
        assert [i for i, _ in results] == list(range(len(doc["events"])))
    else:
        assert refused_whole and isinstance(results[0][1], Rejection)
        assert results[0][1].code == "envelope"


@pytest.mark.parametrize("raw", [b"{}", b'{"envelope": true, "events": [{}]}'])
def test_odd_envelope_markers(raw: bytes) -> None:
    [(index, verdict)] = VALIDATOR.decode_message(raw, now=NOW)
    assert index is None and isinstance(verdict, Rejection)


def test_an_item_too_deep_to_write_back_is_refused_with_the_whole_envelope() -> None:
    good = orjson.dumps(base(NOW, "deep-ok"))
    deep = b'{"event_id":"deep","x":' + b"[" * 500 + b"]" * 500 + b"}"
    raw = encode([good, deep])
    [(i, first), (j, second)] = VALIDATOR.decode_message(raw, now=NOW)
    assert (i, j) == (0, 1)
    assert isinstance(first, Event)
    assert isinstance(second, Rejection)
    assert (second.code, second.raw) == ("schema", raw)
    assert "events[1]" in second.reason


def test_unpack_is_encode_backwards_and_none_for_anything_else() -> None:
    events = [orjson.dumps(base(NOW, "u-1")), orjson.dumps(base(NOW, "u-2"))]
    assert unpack(encode(events)) == events
    for other in (events[0], b"not json", b"[1]", b'{"envelope": 1, "events": {}}'):
        assert unpack(other) is None
