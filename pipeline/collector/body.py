"""Request bodies → the events they carry. Pure: no I/O, so every case is unit-tested.

A body is one JSON object, a JSON array of objects, or JSON Lines, optionally
gzip-compressed. A body that cannot be split into events is the sender's error
(400/413/415, nothing is forwarded); one bad event inside a good body is only
that event's rejection, answered per event.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

#: A JSON Lines line (validated later, so a bad line is that event's rejection)
#: or an element already parsed out of a JSON array/object.
Item = bytes | Any

_LINES_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
# text/plain is what navigator.sendBeacon sends without a CORS preflight, and
# x-www-form-urlencoded what `curl -d` sends unless told otherwise.
_SNIFFED_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/x-www-form-urlencoded"}
)
_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip"})


@dataclass
class BodyError(Exception):
    """A request the collector refuses as a whole; ``status`` is the HTTP answer."""

    status: int
    error: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, **self.extra}


def too_large(detail: str, limit: int) -> BodyError:
    return BodyError(413, "too_large", detail, {"limit": limit})


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent, unzipped if gzip, never more than ``limit`` bytes (gzip bombs)."""
    encoding = encoding.strip().lower()
    if encoding not in _ENCODINGS:
        raise BodyError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not supported; send gzip or no encoding",
        )
    if encoding in ("", "identity"):
        return body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BodyError(400, "bad_request", f"body is not valid gzip ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise too_large(f"body is over {limit} bytes once decompressed", limit)
    if not inflater.eof:
        raise BodyError(400, "bad_request", "gzip body is truncated")
    return out


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def split_events(body: bytes, content_type: str, max_events: int) -> list[Item]:
    """The events in a body, in order; raises :class:`BodyError` for a body that is not a batch."""
    kind = media_type(content_type)
    if kind not in _LINES_TYPES and kind not in _SNIFFED_TYPES and not kind.endswith("+json"):
        raise BodyError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind!r} is not supported; send application/json (an event or an "
            "array of events) or application/x-ndjson (one event per line)",
        )
    text = body.strip()
    if not text:
        raise BodyError(400, "bad_request", "empty body: send an event, an array or JSON Lines")
    if kind in _LINES_TYPES:
        items: list[Item] = _lines(text)
    elif text[:1] == b"[":
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, "bad_request", f"body is not valid JSON: {exc}") from None
        if not parsed:
            raise BodyError(400, "bad_request", "empty array: nothing to collect")
        items = list(parsed)
    else:
        try:
            items = [orjson.loads(text)]
        except orjson.JSONDecodeError as exc:
            if b"\n" not in text:
                raise BodyError(400, "bad_request", f"body is not valid JSON: {exc}") from None
            items = _lines(text)  # several objects, one per line, sent without a lines type
    if len(items) > max_events:
        raise too_large(
            f"{len(items)} events in one request, over the limit of {max_events}; split the batch",
            max_events,
        )
    return items


def _lines(text: bytes) -> list[Item]:
    return [line for line in (raw.strip() for raw in text.split(b"\n")) if line]
