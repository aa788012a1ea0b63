"""Settings from the environment, and what may be logged of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings import Settings, SettingsError, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("http://default:s3cret@clickhouse:8123", "http://default:***@clickhouse:8123"),
        ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
        ("chdb:///var/lib/journey/chdb", "chdb:///var/lib/journey/chdb"),
        ("kafka://127.0.0.1:9092", "kafka://127.0.0.1:9092"),
        ("http://user@host:8123", "http://user@host:8123"),
    ],
)
def test_passwords_never_reach_logs(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_round_trip_through_the_environment() -> None:
    settings = Settings(
        kafka_url="kafka://k:9092",
        allowed_lateness_seconds=5.0,
        consistency_min_exits=7,
        sweep_seconds=0.25,
        collector_keys="web:" + "a" * 64,
        collector_keys_file=Path("/etc/journey/keys.yaml"),
        collector_cors_origins=("https://shop.example", "https://m.shop.example"),
        collector_rate=250.0,
        collector_ack_timeout_seconds=2.5,
    )
    assert Settings.from_env(settings.to_env()) == settings


def test_lists_ignore_blanks() -> None:
    env = {"JOURNEY_CHANNELS": " web, ,app ", "JOURNEY_COLLECTOR_CORS_ORIGINS": ""}
    settings = Settings.from_env(env)
    assert settings.channels == ("web", "app")
    assert settings.collector_cors_origins == ()


def test_bad_numbers_say_which_variable() -> None:
    with pytest.raises(SettingsError, match="JOURNEY_CONSISTENCY_MIN_EXITS"):
        Settings.from_env({"JOURNEY_CONSISTENCY_MIN_EXITS": "many"})
