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


def test_kafka_sasl_and_tls_settings_reach_every_client(tmp_path: Path) -> None:
    """The worker's Faust app and every aiokafka producer get the same credentials."""
    from pipeline.producer import client_options
    from pipeline.worker import faust_credentials

    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    env = {
        "JOURNEY_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "JOURNEY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "JOURNEY_KAFKA_USERNAME": "journey",
        "JOURNEY_KAFKA_PASSWORD": "s3cret",
        "JOURNEY_KAFKA_CA_FILE": str(ca),
    }
    settings = Settings.from_env(env)
    assert Settings.from_env(settings.to_env()) == settings
    assert "s3cret" not in repr(settings)  # settings are logged and shown in tracebacks
    options = client_options(settings.kafka_auth)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("journey", "s3cret")
    assert options["ssl_context"].verify_mode.name == "CERT_REQUIRED"
    credentials = faust_credentials(settings.kafka_auth)["broker_credentials"]
    assert credentials.username == "journey" and credentials.ssl_context is not None
    assert client_options(Settings().kafka_auth) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(Settings().kafka_auth) == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOURNEY_KAFKA_SECURITY_PROTOCOL": "TLS"}, "use one of PLAINTEXT, SSL"),
        ({"JOURNEY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs JOURNEY_KAFKA_USERNAME"),
        ({"JOURNEY_KAFKA_SASL_MECHANISM": "GSSAPI"}, "JOURNEY_KAFKA_SASL_MECHANISM"),
    ],
)
def test_bad_kafka_security_settings_say_what_to_set(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


# A self-signed CA certificate, only so that a TLS context can load a CA file.
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUel1x8zvuqYPX59FZqgi2RCnTEwUwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPam91cm5leS10ZXN0LWNhMB4XDTI2MTEyNTE2NTQ0MloXDTM2
MTEyMjE2NTQ0MlowGjEYMBYGA1UEAwwPam91cm5leS10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEHzZLHD3gMxp5ICraZYJKu7vaUCrzZ2kD0a4FwUlX
Q+F7juon66bKw9LdMWC3UTPX3enkJBqQWGiinsaJY9QgcaNTMFEwHQYDVR0OBBYE
FOurG3gLOs0WMQ3CI+bS36ullneYMB8GA1UdIwQYMBaAFOurG3gLOs0WMQ3CI+bS
36ullneYMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAPvHRZCY
BfafGvspTX4OKMpZ0g64/ag7lOoO1hyIcrZGAiBppqz61JukoT1ZDdaBAoJLyaWr
Kw3lgQO2zKJE5Q4QYA==
-----END CERTIFICATE-----
"""


@pytest.mark.parametrize("value", ["0", "1001", "-5"])
def test_collector_envelope_out_of_range_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="JOURNEY_COLLECTOR_ENVELOPE"):
        Settings.from_env({"JOURNEY_COLLECTOR_ENVELOPE": value})


def test_collector_envelope_round_trips() -> None:
    settings = Settings.from_env({"JOURNEY_COLLECTOR_ENVELOPE": "1"})
    assert settings.collector_envelope == 1
    assert Settings.from_env(settings.to_env()) == settings
