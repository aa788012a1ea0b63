"""API keys of the source systems that post to the collector.

Only SHA-256 hashes of keys are configured, so a leaked config file or
environment does not let anyone post. Keys are 32 random bytes (see
:func:`new_key`), so a plain hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

SOURCE_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "jk_"


class KeysError(ValueError):
    """The key configuration is malformed; the message says where and how to fix it."""


def hash_key(key: str) -> str:
    """The form a key is configured in (hex SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key for one source system."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKeys:
    """Hash → source name. Lookups hash the presented key, so no key is ever stored."""

    by_hash: Mapping[str, str]

    def source_of(self, key: str | None) -> str | None:
        """The source system this key belongs to, or None for a missing or unknown key."""
        if not key:
            return None
        return self.by_hash.get(hash_key(key))

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.by_hash.values())))

    def __len__(self) -> int:
        return len(self.by_hash)


def _entry(source: object, digest: object, where: str) -> tuple[str, str]:
    if not isinstance(source, str) or not SOURCE_PATTERN.match(source):
        raise KeysError(
            f"{where}: source {source!r} must be lower-case letters, digits, '_', '.' or '-' "
            "(starting with a letter, at most 64 characters)"
        )
    if not isinstance(digest, str) or not _HASH_PATTERN.match(digest.lower()):
        raise KeysError(
            f"{where}: the hash for {source!r} must be 64 hex digits (SHA-256 of the key); "
            "`journey collector-key SOURCE` prints a new key with its hash"
        )
    return digest.lower(), source


def parse_env_keys(text: str) -> list[tuple[str, str]]:
    """``source:sha256hex,source:sha256hex`` → [(hash, source)]."""
    entries = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            continue
        source, sep, digest = item.partition(":")
        if not sep:
            raise KeysError(
                f"JOURNEY_COLLECTOR_KEYS item {i + 1}: expected SOURCE:SHA256HEX, "
                f"got {item[:20]!r}…"
            )
        entries.append(
            _entry(source.strip(), digest.strip(), f"JOURNEY_COLLECTOR_KEYS item {i + 1}")
        )
    return entries


def parse_keys_file(path: Path) -> list[tuple[str, str]]:
    """A YAML file ``keys: [{source: web, sha256: <hex>}, …]`` → [(hash, source)]."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysError(f"{path}: cannot read the key file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise KeysError(f"{path}: not valid YAML ({exc})") from None
    items = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise KeysError(f"{path}: expected a top-level 'keys:' list of {{source, sha256}} entries")
    entries = []
    for i, item in enumerate(items):
        where = f"{path}: keys[{i}]"
        if not isinstance(item, dict):
            raise KeysError(f"{where}: expected a mapping with 'source' and 'sha256'")
        entries.append(_entry(item.get("source"), item.get("sha256"), where))
    return entries


def load_keys(env_text: str, path: Path | None) -> ApiKeys:
    """All configured keys; the same hash under two sources is refused (ambiguous)."""
    entries: Iterable[tuple[str, str]] = parse_env_keys(env_text)
    if path is not None:
        entries = [*entries, *parse_keys_file(path)]
    by_hash: dict[str, str] = {}
    for digest, source in entries:
        other = by_hash.setdefault(digest, source)
        if other != source:
            raise KeysError(f"one key hash is configured for both {other!r} and {source!r}")
    return ApiKeys(by_hash)
