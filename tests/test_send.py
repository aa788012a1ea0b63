"""`journey send` reads lines byte for byte and keys them by customer when it can."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.producer import bootstrap_servers
from pipeline.send import iter_jsonl


def test_iter_jsonl_keys_and_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"event_id":"1","customer_id":"c1","anonymous_id":"a1"}\r\n'
        b'{"event_id":"2", "anonymous_id":"a2"}\n'
        b"\n"
        b"   \r\n"
        b'{"event_id":"3", broken\n'
        b'[{"customer_id":"c9"}]\n'
        b'{"event_id":"4","customer_id":42}\n'
        b'"just a string"\n'
        b'{"event_id":"5","customer_id":"c5"}'  # no trailing newline
    )
    assert list(iter_jsonl(path)) == [
        (b"c1", b'{"event_id":"1","customer_id":"c1","anonymous_id":"a1"}'),
        (b"a2", b'{"event_id":"2", "anonymous_id":"a2"}'),
        (None, b'{"event_id":"3", broken'),
        (None, b'[{"customer_id":"c9"}]'),
        (None, b'{"event_id":"4","customer_id":42}'),
        (None, b'"just a string"'),
        (b"c5", b'{"event_id":"5","customer_id":"c5"}'),
    ]


def test_iter_jsonl_keeps_inner_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'  {"customer_id": "c1"}  \r\n')
    assert list(iter_jsonl(path)) == [(b"c1", b'  {"customer_id": "c1"}  ')]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("kafka://127.0.0.1:9092", "127.0.0.1:9092"),
        ("kafka://a:1,b:2", "a:1,b:2"),
        ("kafka://a:1,kafka://b", "a:1,b:9092"),
        ("broker:19092", "broker:19092"),
        ("kafka://[::1]:9092/", "[::1]:9092"),
    ],
)
def test_bootstrap_servers(url: str, expected: str) -> None:
    assert bootstrap_servers(url) == expected


def test_bootstrap_servers_rejects_empty() -> None:
    with pytest.raises(ValueError, match="no host"):
        bootstrap_servers("kafka://")
