"""`journey send FILE`: events from a JSON Lines file to Kafka, keyed by customer.

Lines go out byte for byte: validating is the worker's job, and a line that
does not parse must reach the dead-letter path visibly rather than vanish here.
Many lines may share a message (an envelope, pipeline/envelope.py); a line
that could not be judged the same inside one goes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipeline.identity import routing_key
from pipeline.producer import produce_batches
from pipeline.settings import KafkaAuth


@dataclass
class SendSummary:
    """What `send_file` did, for the command's closing line."""

    lines: int = 0  # non-blank lines read
    sent: int = 0  # records the broker acknowledged
    unparseable: int = 0  # lines that are not JSON at all (sent anyway, without a key)
    bytes: int = 0  # payload bytes read from the non-blank lines


def line_key(raw: bytes) -> tuple[bytes | None, bool]:
    """The partition key of a line (customer_id, else anonymous_id) and whether it parsed.

    Placeholder ids ("null", "0"...) are skipped, as the worker skips them.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, False
    if isinstance(doc, dict):
        ids = [doc.get(field) for field in ("customer_id", "anonymous_id")]
        key = routing_key(*(v if isinstance(v, str) else None for v in ids))
        if key is not None:
            return key.encode(), True
    return None, True


def _iter_lines(path: str | Path) -> Iterator[tuple[bytes | None, bytes, bool]]:
    with open(path, "rb") as f:
        for line in f:
            raw = line.removesuffix(b"\n").removesuffix(b"\r")
            if not raw.strip():
                continue
            key, parsed = line_key(raw)
            yield key, raw, parsed


def iter_jsonl(path: str | Path) -> Iterator[tuple[bytes | None, bytes]]:
    """Yield (key, raw line) for each non-blank line; key None when the line has no usable id."""
    for key, raw, _ in _iter_lines(path):
        yield key, raw


async def send_file(
    kafka_url: str,
    topic: str,
    path: str | Path,
    on_sent: Callable[[int], None] | None = None,
    auth: KafkaAuth | None = None,
    envelope: int = 1,
) -> SendSummary:
    """Send every non-blank line of a JSON Lines file; `on_sent(n)` gets acknowledged increments.

    ``envelope`` > 1 packs lines into envelopes (:mod:`pipeline.envelope`).
    """
    summary = SendSummary()

    def records() -> Iterator[tuple[bytes | None, bytes]]:
        for key, raw, parsed in _iter_lines(path):
            summary.lines += 1
            summary.bytes += len(raw)
            if not parsed:
                summary.unparseable += 1
            yield key, raw

    summary.sent = await produce_batches(
        kafka_url, topic, records(), on_sent=on_sent, auth=auth, envelope=envelope
    )
    return summary
