"""Python emitter SDK: send channel events to the journey tracker from any Python system.

``track``/``identify`` build events that pass the worker's own validator, a
bounded buffer batches them, and a transport delivers the batches straight to
Kafka (:class:`KafkaTransport`) or through the HTTP collector
(:class:`HttpTransport`). :class:`AsyncEmitter` is for async code,
:class:`Emitter` for sync code (thread-safe). See the README's "Emitter SDK".
"""

from __future__ import annotations

from .builder import IDENTIFY, EventBuilder, Outgoing, format_time
from .emitter import AsyncEmitter, DeliveryStats, Emitter, RejectedCallback
from .errors import BufferFull, DeliveryError, EmitError, EmitterClosed, InvalidEvent
from .retry import RetryPolicy
from .transports import BatchResult, HttpTransport, KafkaTransport, Rejected, Transport

__all__ = [
    "IDENTIFY",
    "AsyncEmitter",
    "BatchResult",
    "BufferFull",
    "DeliveryError",
    "DeliveryStats",
    "EmitError",
    "Emitter",
    "EmitterClosed",
    "EventBuilder",
    "HttpTransport",
    "InvalidEvent",
    "KafkaTransport",
    "Outgoing",
    "Rejected",
    "RejectedCallback",
    "RetryPolicy",
    "Transport",
    "format_time",
]
