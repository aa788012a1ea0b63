"""docker-compose.yml is validated by Compose itself (no Docker engine needed for `config`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import compose

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(compose.__file__).parent / "docker-compose"


def run_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    # Use the binary's exit code: the Python wrapper returns 0 even on errors.
    return subprocess.run(
        [
            str(BINARY),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_compose_file_is_valid_with_the_example_env() -> None:
    """The stack parses with .env.example's values."""
    result = run_config(ROOT / ".env.example")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    """A missing secret stops Compose with a message naming it."""
    empty = tmp_path / ".env"
    empty.write_text("")
    result = run_config(empty)
    assert result.returncode != 0
    assert "CLICKHOUSE_PASSWORD" in result.stderr
