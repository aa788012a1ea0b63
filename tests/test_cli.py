"""The `journey` command's help and its errors for bad input (no services needed)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli


def test_help_lists_every_command() -> None:
    """`journey --help` names the five commands of the design."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ["up", "worker", "simulate", "send", "report"]:
        assert f"  {command}" in result.output


def test_worker_refuses_a_bad_journey_file(tmp_path: Path) -> None:
    """A bad journey file stops start-up with the file, the line and the problem."""
    bad = tmp_path / "journeys.yaml"
    bad.write_text(
        "journeys:\n"
        "  - name: retail\n"
        "    stages:\n"
        "      - name: awareness\n"
        "        events: [page_view]\n"
        "        max_dwell: 7 days\n"
        "      - name: purchase\n"
        "        events: [order_completed]\n"
    )
    result = CliRunner().invoke(cli, ["worker"], env={"JOURNEY_JOURNEYS": str(bad)})
    assert result.exit_code == 1
    assert "journeys.yaml, line 6" in result.output
    assert "max_dwell" in result.output


def test_worker_refuses_a_malformed_setting() -> None:
    """A non-numeric port is named with the variable that holds it."""
    result = CliRunner().invoke(cli, ["worker"], env={"JOURNEY_WEB_PORT": "sixty"})
    assert result.exit_code == 1
    assert "JOURNEY_WEB_PORT='sixty' is not an integer" in result.output


def test_simulate_refuses_a_bad_incident() -> None:
    """A malformed --incident is a usage error, not a traceback."""
    result = CliRunner().invoke(cli, ["simulate", "--incident", "app:nowhere"])
    assert result.exit_code == 2
    assert "--incident" in result.output


def test_send_needs_an_existing_file(tmp_path: Path) -> None:
    """A missing file is reported by name."""
    result = CliRunner().invoke(cli, ["send", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "missing.jsonl" in result.output


def test_fast_simulation_needs_a_duration() -> None:
    """Unpaced traffic without a duration would run into the future; it is refused."""
    result = CliRunner().invoke(cli, ["simulate", "--fast"])
    assert result.exit_code == 2
    assert "--fast needs --duration" in result.output


def test_rules_rehearsal_preset_and_for_durations() -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    runner = CliRunner()
    rehearsal = runner.invoke(cli, ["rules", "--rehearsal"])
    assert rehearsal.exit_code == 0, rehearsal.output
    assert "[30s]" in rehearsal.output and "[5m]" not in rehearsal.output
    custom = runner.invoke(cli, ["rules", "--customer-for", "1m", "--pipeline-for", "30s"])
    assert custom.exit_code == 0, custom.output
    assert "for: 1m" in custom.output and "for: 30s" in custom.output
    bad = runner.invoke(cli, ["rules", "--customer-for", "soon"])
    assert bad.exit_code != 0 and "not a Prometheus duration" in bad.output
