"""API keys: only hashes are configured; errors say where and how to fix them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.collector.keys import KeysError, hash_key, load_keys, new_key


def test_env_and_file_keys_resolve_to_their_source(tmp_path: Path) -> None:
    web, pos = new_key(), new_key()
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - source: pos-emea\n    sha256: {hash_key(pos)}\n")
    keys = load_keys(f" web:{hash_key(web)} , ", path)
    assert keys.source_of(web) == "web"
    assert keys.source_of(pos) == "pos-emea"
    assert keys.source_of(hash_key(web)) is None  # the hash itself is not a key
    assert keys.source_of("") is None
    assert keys.source_of(None) is None
    assert keys.sources == ("pos-emea", "web")


def test_keys_are_random_and_prefixed() -> None:
    a, b = new_key(), new_key()
    assert a != b
    assert a.startswith("jk_") and len(a) > 40


def test_upper_case_hashes_are_accepted() -> None:
    key = new_key()
    assert load_keys(f"web:{hash_key(key).upper()}", None).source_of(key) == "web"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web", "expected SOURCE:SHA256HEX"),
        ("web:abc", "64 hex digits"),
        (f"Web:{'a' * 64}", "lower-case"),
        (f"web:{'a' * 64},app:{'a' * 64}", "both 'web' and 'app'"),
    ],
)
def test_bad_env_keys(text: str, message: str) -> None:
    with pytest.raises(KeysError, match=message):
        load_keys(text, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("keys: {}", "top-level 'keys:' list"),
        ("keys: [web]", r"keys\[0\]: expected a mapping"),
        ("keys:\n  - source: web\n", r"keys\[0\]: the hash"),
        ("keys: [unclosed", "not valid YAML"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(KeysError, match=message):
        load_keys("", path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="cannot read"):
        load_keys("", tmp_path / "nope.yaml")
