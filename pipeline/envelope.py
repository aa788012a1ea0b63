"""Packing events into envelopes (schemas/envelope.v1.json) on the producer side.

A Kafka message costs the worker about as much as the event it carries
(Faust's stream, the consumer, the event loop: bench/throughput.py), so
producers with volume send many events per message. The worker applies an
envelope's events one by one, in order, exactly as if each had come alone.

Two rules keep that true:

- Every event of an envelope belongs to the partition the envelope is sent
  to: the one Kafka's default partitioner picks for the event's own key
  (murmur2), so a customer's events stay in one partition, in order, whether
  they come alone or packed.
- Only an event that would be judged the same inside an envelope as alone is
  packed: a JSON object with a routing key, at most MAX_EVENT_BYTES, already in
  compact form (the worker dead-letters a refused item as its re-serialised
  JSON, so packing such a line keeps its dead letter byte for byte), and not an
  envelope itself. Anything else goes out alone, after whatever its partition
  had waiting, so nothing overtakes an event of the same customer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiokafka.partitioner import murmur2

from pipeline.events import MAX_ENVELOPE_BYTES, MAX_ENVELOPE_EVENTS, MAX_EVENT_BYTES

# What `journey send` and `journey simulate` pack by default: large enough that the
# per-message cost is noise, small enough that one message is a few tens of KiB.
DEFAULT_ENVELOPE_EVENTS: Final = 100
_HEAD: Final = b'{"envelope":1,"events":['
_TAIL: Final = b"]}"
_OVERHEAD: Final = len(_HEAD) + len(_TAIL)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka alike) gives ``key``."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


def packable(key: bytes | None, value: bytes) -> bool:
    """True when ``value`` may travel in an envelope and be judged exactly as if alone."""
    if key is None or len(value) > MAX_EVENT_BYTES or value[:1] != b"{":
        return False
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict) or "envelope" in doc:
        return False
    try:
        return orjson.dumps(doc) == value
    except TypeError:  # nested deeper than orjson writes: it goes alone
        return False


def encode(events: list[bytes]) -> bytes:
    """An envelope of already-serialised events, without parsing them again."""
    return _HEAD + b",".join(events) + _TAIL


def unpack(value: bytes) -> list[bytes] | None:
    """The events of an envelope as compact JSON, in order; None when ``value`` is not one.

    For readers of journey.events other than the worker (tools, tests). The worker
    uses ``Validator.decode_message``, which also says why a bad envelope is refused.
    """
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(doc, dict) and "envelope" in doc and isinstance(doc.get("events"), list)):
        return None
    return [orjson.dumps(event) for event in doc["events"]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send: to ``partition`` (None: let the key decide), holding ``events`` events."""

    partition: int | None
    key: bytes | None
    value: bytes
    events: int


@dataclass
class _Buffer:
    key: bytes  # the first event's: kept when the buffer goes out as a plain message
    since: float
    events: list[bytes] = field(default_factory=list)
    size: int = _OVERHEAD


class Packer:
    """Groups events per partition into envelopes of up to ``max_events``.

    ``add`` returns what is ready to send now, in the order it must be sent;
    ``due`` and ``flush`` empty buffers older than a linger, or all of them.
    """

    def __init__(self, partitions: int, max_events: int = DEFAULT_ENVELOPE_EVENTS) -> None:
        if partitions < 1:
            raise ValueError("a topic has at least one partition")
        if not 1 <= max_events <= MAX_ENVELOPE_EVENTS:
            raise ValueError(f"events per envelope must be 1 to {MAX_ENVELOPE_EVENTS}")
        self.partitions = partitions
        self.max_events = max_events
        self._buffers: dict[int, _Buffer] = {}

    def add(self, key: bytes | None, value: bytes, now: float = 0.0) -> list[Outgoing]:
        if key is None:
            return [Outgoing(None, None, value, 1)]  # nobody's order to keep
        partition = partition_for(key, self.partitions)
        if self.max_events == 1 or not packable(key, value):
            return [*self._take(partition), Outgoing(partition, key, value, 1)]
        out: list[Outgoing] = []
        buffer = self._buffers.get(partition)
        if buffer is not None and buffer.size + len(value) + 1 > MAX_ENVELOPE_BYTES:
            out.extend(self._take(partition))
            buffer = None
        if buffer is None:
            buffer = self._buffers[partition] = _Buffer(key, now)
        buffer.events.append(value)
        buffer.size += len(value) + 1
        if len(buffer.events) >= self.max_events:
            out.extend(self._take(partition))
        return out

    def due(self, now: float, linger: float) -> list[Outgoing]:
        """Envelopes whose first event has waited ``linger`` seconds or more."""
        old = [p for p, b in self._buffers.items() if now - b.since >= linger]
        return [o for p in old for o in self._take(p)]

    def flush(self) -> list[Outgoing]:
        return [o for p in list(self._buffers) for o in self._take(p)]

    @property
    def waiting(self) -> int:
        """Events held in buffers, not yet handed out."""
        return sum(len(b.events) for b in self._buffers.values())

    def _take(self, partition: int) -> Iterator[Outgoing]:
        buffer = self._buffers.pop(partition, None)
        if buffer is None:
            return
        if len(buffer.events) == 1:
            # One event is sent as a plain message: the same to the worker, and readable.
            yield Outgoing(partition, buffer.key, buffer.events[0], 1)
        else:
            yield Outgoing(partition, None, encode(buffer.events), len(buffer.events))
